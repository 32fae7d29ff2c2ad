"""Memory and speed of the training data path with lazily read shards, against holding every
shard in memory (the ShardDataset of earlier versions), on synthetic shards of N cells.

    python benchmarks/lazy_shards.py --cells 100000 --workdir /tmp/scllm_lazy \\
        --out results/lazy_100000.json

Writes the shards directly (no pipeline run): N training cells in 100k-cell shards, lengths from
a log-normal (mean --mean-length tokens) capped at --max-length, random gene ids and bins. The
cap is there for the memory comparison: a training step's activation memory follows its longest
batch, and with 7% of the cells at the cap every run's first steps include a batch of that
length (``longest_batch_tokens`` records it), so runs at different N differ only in their data.
Then, each in a fresh process whose own peak RSS (VmHWM) is recorded:

- ``train_lazy`` / ``train_in_memory``: ``python -m scllm.train`` for --steps steps (model
  --model, batch 32) on the shards, reading them lazily / as before.
- ``data_lazy`` / ``data_in_memory``: the data path alone: open the split, then build --batches
  training batches of epoch 0 (read the cells, collate, mask: ``training_batch``) in one thread,
  timed; cells/s is the most one training process can be fed.
- ``before``: both, in memory, with the scllm of another checkout (``--before-src``, e.g. the
  commit before lazy reading: ``git archive COMMIT src | tar -x -C /tmp/before``): today's rate.

See benchmarks/README.md for the results and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

N_GENES, N_BINS, CELLS_PER_SHARD = 1200, 51, 100_000
# the default model (config/config.yaml) and a small one, where memory outside the data is least
MODELS = {
    "default": {},
    # dropout 0: on the CPU attention dropout makes SDPA fall back to its slow unfused kernel
    "small": {"n_layers": 2, "n_heads": 2, "d_model": 64, "d_ff": 64, "dropout": 0.0},
}


def write_corpus(
    root: Path, n_cells: int, n_validation: int, mean_length: float, max_length: int, seed: int
) -> Path:
    """Shards + vocab.json + genes.tsv + manifest.json in the tokenize_shards layout."""
    from scllm.checks import file_sha256
    from scllm.shards import write_shard
    from scllm.tokens import (
        CLS_VALUE,
        MASK_VALUE,
        PAD_VALUE,
        build_vocab,
        vocab_sha256,
        write_vocab,
    )

    root.mkdir(parents=True, exist_ok=True)
    feature_ids = [f"ENSG{i:011d}" for i in range(N_GENES)]
    vocab = build_vocab(feature_ids)
    write_vocab(vocab, root / "vocab.json")
    (root / "genes.tsv").write_text(
        "feature_id\tfeature_name\ttoken_id\n"
        + "".join(f"{g}\tG{i}\t{i}\n" for i, g in enumerate(feature_ids))
    )
    attrs = {
        "n_genes": N_GENES,
        "n_bins": N_BINS,
        "cls_id": N_GENES,
        "pad_id": N_GENES + 1,
        "cls_value": CLS_VALUE,
        "pad_value": PAD_VALUE,
        "mask_value": MASK_VALUE,
        "vocab_sha256": vocab_sha256(vocab),
    }
    manifest = {
        **attrs,
        "vocab_size": N_GENES + 2,
        "format_version": 1,
        "max_seq_len": N_GENES + 1,
        "binning": {"n_bins": N_BINS},
        "splits": {},
    }
    rng = np.random.default_rng(seed)
    sigma = 0.6  # log-normal spread of cell lengths
    for split, n in (("train", n_cells), ("validation", n_validation)):
        entries = []
        for k, start in enumerate(range(0, n, CELLS_PER_SHARD)):
            m = min(CELLS_PER_SHARD, n - start)
            lengths = np.clip(
                rng.lognormal(np.log(mean_length) - sigma**2 / 2, sigma, m), 2, max_length
            )
            lengths = lengths.astype(np.int64)
            offsets = np.zeros(m + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            gene_ids = rng.integers(0, N_GENES, offsets[-1], dtype=np.int32)
            values = rng.integers(1, N_BINS, offsets[-1], dtype=np.int16)
            gene_ids[offsets[:-1]], values[offsets[:-1]] = N_GENES, CLS_VALUE
            rel = f"{split}/shard_{k:05d}.h5"
            write_shard(
                root / rel,
                offsets,
                gene_ids,
                values,
                np.arange(start, start + m),
                {**attrs, "split": split},
            )
            entries.append(
                {
                    "path": rel,
                    "n_cells": m,
                    "n_tokens": int(offsets[-1]),
                    "max_len": int(lengths.max()),
                    "sha256": file_sha256(root / rel),
                }
            )
        manifest["splits"][split] = entries
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return root / "manifest.json"


def in_memory_dataset():
    """The ShardDataset of earlier versions: every shard of the split read whole and
    concatenated."""
    from scllm.shards import check_vocab, read_listed_shard, read_manifest
    from scllm.tokens import RaggedCells

    class InMemoryShardDataset(RaggedCells):
        def __init__(self, manifest_path, split):
            manifest_path = Path(manifest_path)
            manifest = read_manifest(manifest_path)
            check_vocab(manifest, manifest_path.parent / "vocab.json", manifest_path)
            parts = [
                read_listed_shard(manifest_path.parent, manifest, e)
                for e in manifest["splits"][split]
            ]
            lengths = np.concatenate([np.diff(p.offsets) for p in parts])
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            super().__init__(
                offsets,
                np.concatenate([p.gene_ids for p in parts]),
                np.concatenate([p.values for p in parts]),
            )

    return InMemoryShardDataset


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the measured processes ---------------------------------------------------------------------


def child_train(args) -> dict:
    import scllm.train.batches as batches_mod
    from scllm.train.loop import pretrain

    if args.mode in ("in_memory", "before"):
        batches_mod.ShardDataset = in_memory_dataset()
    out = Path(args.workdir) / f"run_{args.mode}"
    shutil.rmtree(out, ignore_errors=True)
    train = {
        "batch_size": 32,
        "max_steps": args.steps,
        "checkpoint_every_steps": 10**9,
        "log_every_steps": 5,
        "num_threads": args.threads,
        "device": "cpu",
        "warmup_steps": 10,
    }
    t0 = time.perf_counter()
    pretrain(args.manifest, out, MODELS[args.model], train)
    seconds = time.perf_counter() - t0
    metrics = [line.split("\t") for line in (out / "metrics.tsv").read_text().splitlines()]
    col = metrics[0].index("cells_per_s")
    rates = [float(row[col]) for row in metrics[2:]]  # the first window includes warm-up
    return {"wall_s": seconds, "train_cells_per_s": float(np.median(rates)) if rates else None}


def child_data(args) -> dict:
    import torch

    from scllm.shards import ShardDataset
    from scllm.train.batches import LengthGroupedBatchSampler, training_batch

    torch.set_num_threads(1)
    dataset_cls = ShardDataset if args.mode == "lazy" else in_memory_dataset()
    t0 = time.perf_counter()
    ds = dataset_cls(args.manifest, "train")
    open_s = time.perf_counter() - t0
    batches = LengthGroupedBatchSampler(ds.lengths, 32, seed=0).epoch_batches(0)
    pad_id = N_GENES + 1
    n = min(args.batches, len(batches))
    t0 = time.perf_counter()
    cells = tokens = 0
    for b in range(n):
        gen = torch.Generator().manual_seed(b)
        batch = training_batch(ds.cells(batches[b]), pad_id, [0.25, 0.5, 0.75], gen)
        cells += len(batch["lengths"])
        tokens += int(batch["lengths"].sum())
    seconds = time.perf_counter() - t0
    return {
        "open_s": open_s,
        "batches": n,
        "cells": cells,
        "cells_per_s": cells / seconds,
        "tokens_per_s": tokens / seconds,
    }


def longest_batch(manifest_path: Path, steps: int) -> int:
    """Tokens of the longest batch among the first ``steps`` training steps (batch 32, seed 0).
    Activation memory follows it, so runs at different sizes compare only where it is the same."""
    import h5py

    from scllm.train.batches import LengthGroupedBatchSampler

    entries = json.loads(manifest_path.read_text())["splits"]["train"]
    lengths = []
    for entry in entries:
        with h5py.File(manifest_path.parent / entry["path"], "r") as f:
            lengths.append(np.diff(f["offsets"][:]))
    lengths = np.concatenate(lengths)
    return max(
        int(lengths[b].max())
        for b in LengthGroupedBatchSampler(lengths, 32, 0, 100).epoch_batches(0)[:steps]
    )


def run_child(kind: str, mode: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_child",
        kind,
        "--_mode",
        mode,
        "--_manifest",
        str(args.manifest),
        "--workdir",
        str(args.workdir),
        "--steps",
        str(args.steps),
        "--batches",
        str(args.batches),
        "--model",
        args.model,
        "--threads",
        str(args.threads),
    ]
    if mode == "before":
        if not args.before_src:
            raise SystemExit(
                "--modes before needs --before-src (the src folder of another checkout)"
            )
        cmd += ["--_src", str(args.before_src)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{kind} {mode} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"{kind:5s} {mode:9s}: "
        + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
        ),
        flush=True,
    )
    return result


def machine() -> dict:
    import h5py
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "h5py": h5py.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--validation-cells", type=int, default=3_000)
    parser.add_argument("--mean-length", type=float, default=400, help="before the cap")
    parser.add_argument("--max-length", type=int, default=800, help="at most N_GENES + 1 = 1201")
    parser.add_argument(
        "--steps", type=int, default=30, help="training steps per training process"
    )
    parser.add_argument(
        "--batches", type=int, default=1_000, help="batches timed in the data-path processes"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="data-path runs per mode (median reported)"
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--modes", default="lazy,in_memory", help="comma-separated: lazy, in_memory, before"
    )
    parser.add_argument(
        "--before-src", type=Path, help="src folder of the scllm to time as 'before'"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scllm_lazy"))
    parser.add_argument(
        "--keep", action="store_true", help="keep the shards (reused when --cells matches)"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_mode", help=argparse.SUPPRESS)
    parser.add_argument("--_manifest", help=argparse.SUPPRESS)
    parser.add_argument("--_src", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        if args._src:  # another checkout's scllm, imported instead of this one's
            sys.path.insert(0, args._src)
        args.mode, args.manifest = args._mode, args._manifest
        result = (child_train if args._child == "train" else child_data)(args)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    if not 2 <= args.max_length <= N_GENES + 1:
        raise SystemExit(f"--max-length must lie in 2..{N_GENES + 1}")
    corpus = args.workdir / f"shards_{args.cells}_{args.mean_length:g}_{args.max_length}"
    args.manifest = corpus / "manifest.json"
    if not args.manifest.exists():
        t0 = time.perf_counter()
        write_corpus(
            corpus, args.cells, args.validation_cells, args.mean_length, args.max_length, args.seed
        )
        print(f"wrote {args.cells} cells in {time.perf_counter() - t0:.0f}s", flush=True)
    manifest = json.loads(args.manifest.read_text())
    n_tokens = sum(e["n_tokens"] for e in manifest["splits"]["train"])
    result = {
        "cells": args.cells,
        "tokens": n_tokens,
        "mean_length": n_tokens / args.cells,
        "shard_bytes": sum(
            (corpus / e["path"]).stat().st_size for e in manifest["splits"]["train"]
        ),
        "model": args.model,
        "steps": args.steps,
        "threads": args.threads,
        "longest_batch_tokens": longest_batch(args.manifest, args.steps),
        "machine": machine(),
    }
    modes = args.modes.split(",")
    # The data path is timed --repeats times, the modes taking turns, so a busy machine slows all
    # of them alike; the result keeps every run and the median.
    runs = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            runs[mode].append(run_child("data", mode, args))
    for mode in modes:
        result[f"data_{mode}"] = {
            **runs[mode][0],
            "cells_per_s": float(np.median([r["cells_per_s"] for r in runs[mode]])),
            "cells_per_s_runs": [r["cells_per_s"] for r in runs[mode]],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[mode]),
        }
    for mode in modes:
        result[f"train_{mode}"] = run_child("train", mode, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(corpus)


if __name__ == "__main__":
    main()
