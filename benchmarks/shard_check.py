"""Cost of checking a token shard where it is read: sha256 of the file, and the array checks.

Writes one shard of --cells cells (log-normal lengths with mean --mean-length, capped at <cls> +
--genes genes) with scllm.shards.write_shard, then times, each the median of --repeats runs with
the file in the page cache:
  read       the four arrays with h5py (what reading a shard costs anyway)
  check      scllm.shards.check_shard on them (offsets, <cls>, gene id and bin ranges)
  sha256     scllm.checks.file_sha256 of the file
  listed     scllm.shards.read_listed_shard: sha256 + read + check + comparison with the manifest

    python benchmarks/shard_check.py --cells 100000 --mean-length 500 \\
        --out benchmarks/results/shard_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scllm.checks import file_sha256  # noqa: E402
from scllm.shards import Shard, check_shard, read_listed_shard, write_shard  # noqa: E402
from scllm.tokens import CLS_VALUE  # noqa: E402


def synthetic_shard(
    path: Path, n_cells: int, mean_length: int, n_genes: int, n_bins: int, seed: int
) -> dict:
    rng = np.random.default_rng(seed)
    sigma = 0.5
    lengths = rng.lognormal(np.log(mean_length) - sigma**2 / 2, sigma, n_cells).astype(np.int64)
    lengths = np.clip(lengths, 2, n_genes + 1)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gene_ids = rng.integers(0, n_genes, offsets[-1], dtype=np.int32)
    values = rng.integers(1, n_bins, offsets[-1], dtype=np.int16)
    gene_ids[offsets[:-1]], values[offsets[:-1]] = n_genes, CLS_VALUE
    attrs = {
        "n_genes": n_genes,
        "n_bins": n_bins,
        "cls_id": n_genes,
        "pad_id": n_genes + 1,
        "cls_value": CLS_VALUE,
        "vocab_sha256": "synthetic",
        "split": "train",
    }
    write_shard(path, offsets, gene_ids, values, np.arange(n_cells), attrs)
    return attrs


def read_arrays(path: Path) -> Shard:
    with h5py.File(path, "r") as f:
        return Shard(
            f["offsets"][:], f["gene_ids"][:], f["values"][:], f["cell_index"][:], dict(f.attrs)
        )


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--mean-length", type=int, default=500)
    parser.add_argument("--genes", type=int, default=1200)
    parser.add_argument("--bins", type=int, default=51)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train/shard_00000.h5"
        attrs = synthetic_shard(
            path, args.cells, args.mean_length, args.genes, args.bins, args.seed
        )
        shard = read_arrays(path)
        entry = {
            "path": "train/shard_00000.h5",
            "n_cells": shard.n_cells,
            "n_tokens": len(shard.gene_ids),
            "sha256": file_sha256(path),
        }
        manifest = {**attrs, "splits": {"train": [entry]}}
        assert check_shard(shard) is None
        size = path.stat().st_size
        read_s = timed(lambda: read_arrays(path), args.repeats)
        check_s = timed(lambda: check_shard(shard), args.repeats)
        sha_s = timed(lambda: file_sha256(path), args.repeats)
        listed_s = timed(lambda: read_listed_shard(tmp, manifest, entry), args.repeats)
    result = {
        "cells": args.cells,
        "tokens": entry["n_tokens"],
        "mean_length": entry["n_tokens"] / args.cells,
        "file_mb": size / 1e6,
        "read_s": read_s,
        "check_s": check_s,
        "sha256_s": sha_s,
        "listed_s": listed_s,
        "sha256_gb_per_s": size / 1e9 / sha_s,
        "repeats": args.repeats,
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "h5py": h5py.__version__,
            "processor": platform.processor() or platform.machine(),
        },
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
