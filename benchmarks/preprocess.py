"""Preprocessing benchmark: synthetic Census-like counts through every data stage after sampling,
or (``--ingest``) from a user's h5ad through every data stage.

    .venv/bin/python benchmarks/preprocess.py --cells 100000 \
        --out benchmarks/results/preprocess_100000.json
    .venv/bin/python benchmarks/preprocess.py --ingest h5ad --cells 300000 --genes 12000 \
        --samples 44 --min-expressed 300 --max-expressed 1500 \
        --out benchmarks/results/ingest_h5ad_300000.json

1. Generates ``cells.h5ad`` (raw integer counts, float32 CSR, cells of each sample contiguous)
   streaming with ``scllm.h5ad.CSRWriter``: the whole matrix is never in memory. Not timed as a
   stage. With ``--ingest`` it generates ``input.h5ad`` instead, shaped as a user's file (obs
   ``donor_id``; var ``gene_ids`` with Ensembl ids, symbols as var names).
2. With ``--ingest h5ad``, times sample_census reading input.h5ad directly (``sample_h5ad``, the
   pipeline's ``census.source: h5ad``); with ``--ingest store``, build_local_census then
   sample_census on that store. Then runs filter_qc -> select_hvg -> normalize_bin -> split_cells
   -> tokenize_shards, each stage in its own subprocess (``--_stage``), so the wall time and peak
   RSS belong to one stage. Numba runs with 2 threads.
3. Writes a JSON with per-stage wall time, in-process call time, cells in/out, cells/s, peak RSS,
   non-zero counts and the machine.

Synthetic model (per cell): a cell type (10 programs, each boosting ~150 genes) drawn from a
sample-specific mixture; a number of expressed genes k drawn log-normally in [--min-expressed,
--max-expressed] (3% low-quality cells get 30..300, so QC drops some); genes drawn with replacement
from a heavy-tailed gene distribution (~10% of genes practically never expressed, so QC drops genes
too), duplicates merged; the count of an expressed gene is 1 + a geometric (negative binomial,
r = 1) variate whose mean depends on the gene, the cell's depth, the cell type and a
sample-specific gene effect (batch effect on 10% of the genes).
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

ROOT = Path(__file__).resolve().parents[1]
# With --ingest, the stages that bring a user's h5ad in come first: the pipeline's own
# (census.source: h5ad, read directly) or through a local SOMA store (scllm build-census).
INGEST = {"h5ad": ["sample_census"], "store": ["build_local_census", "sample_census_store"]}
STAGES = ["filter_qc", "select_hvg", "normalize_bin", "split_cells", "tokenize_shards"]
N_TYPES = 10
TABLE_SIZE = 1 << 22
DRAW_FACTOR = 1.6


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------


def sample_sizes(n_cells: int, n_samples: int, rng, max_fraction: float = 0.08) -> np.ndarray:
    """Skewed (log-normal) sample sizes summing to n_cells, none above max_fraction of cells."""
    w = rng.lognormal(0.0, 1.0, n_samples)
    w /= w.sum()
    for _ in range(100):  # cap and redistribute
        over = w > max_fraction
        if not over.any():
            break
        excess = (w[over] - max_fraction).sum()
        w[over] = max_fraction
        w[~over] += excess * w[~over] / w[~over].sum()
    sizes = np.floor(w * n_cells).astype(np.int64)
    sizes[np.argmin(sizes)] += n_cells - sizes.sum()
    return sizes


def gene_model(n_genes: int, rng):
    """Gene draw tables per cell type (for fast weighted sampling) and per-gene mean counts."""
    # heavy-tailed popularity: a few very common genes, a long tail, ~10% practically absent
    popularity = rng.lognormal(0.0, 2.0, n_genes)
    popularity[rng.random(n_genes) < 0.10] = 1e-9
    programs = [rng.choice(n_genes, 150, replace=False) for _ in range(N_TYPES)]
    tables = []
    for t in range(N_TYPES):
        p = popularity.copy()
        p[programs[t]] *= rng.uniform(5, 40, len(programs[t]))
        p /= p.sum()
        expected = p * TABLE_SIZE
        reps = np.floor(expected + rng.random(n_genes)).astype(np.int64)  # stochastic rounding
        tables.append(
            np.repeat(np.arange(n_genes, dtype=np.uint16 if n_genes < 65536 else np.uint32), reps)
        )
    # mean extra count once expressed: rises with popularity (top genes ~tens, median ~0.5)
    rel = popularity / np.median(popularity)
    base_mean = np.clip(0.5 * rel**0.6, 0.05, 200.0)
    type_boost = np.ones((N_TYPES, n_genes), dtype=np.float32)
    for t in range(N_TYPES):
        type_boost[t, programs[t]] = rng.uniform(2, 10, len(programs[t]))
    return tables, base_mean.astype(np.float32), type_boost


def generate_block(n: int, mix, sample_effect, tables, base_mean, type_boost, lo, hi, rng):
    """One block of n cells of one sample as CSR arrays (indptr, indices, data)."""
    import scipy.sparse as sp

    n_genes = base_mean.shape[0]
    types = np.sort(rng.choice(N_TYPES, n, p=mix))
    mid = np.sqrt(lo * hi)
    k = np.clip(np.exp(rng.normal(np.log(mid), 0.25, n)), lo, hi).astype(np.int64)
    bad = rng.random(n) < 0.03
    k[bad] = rng.integers(30, 300, bad.sum())
    depth = rng.lognormal(0.0, 0.3, n).astype(np.float32)
    # draws with replacement; popular genes repeat, so draw ~1.6x k to end near k distinct genes
    k = np.ceil(k * DRAW_FACTOR).astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    genes = np.empty(rows.size, dtype=np.int64)
    starts = np.r_[0, np.cumsum(k)]
    for t in range(N_TYPES):
        cells = np.flatnonzero(types == t)
        if cells.size == 0:
            continue
        a, b = starts[cells[0]], starts[cells[-1] + 1]  # cells of a type are contiguous (sorted)
        table = tables[t]
        genes[a:b] = table[rng.integers(0, table.size, b - a)]
    keys = np.sort(rows * n_genes + genes)
    first = np.r_[True, keys[1:] != keys[:-1]]
    uniq = keys[first]
    multiplicity = np.diff(np.r_[np.flatnonzero(first), keys.size])
    r = uniq // n_genes
    g = uniq - r * n_genes
    lam = base_mean[g] * depth[r] * type_boost[types[r], g] * sample_effect[g]
    u = rng.random(uniq.size, dtype=np.float32)
    u = np.maximum(u, np.float32(1e-12))
    extra = np.floor(np.log(u) / np.log(lam / (1.0 + lam)))
    counts = (multiplicity + np.minimum(extra, 1e5)).astype(np.float32)
    indptr = np.r_[0, np.cumsum(np.bincount(r, minlength=n))]
    return sp.csr_matrix((counts, g.astype(np.int32), indptr), shape=(n, n_genes))


def generate(
    path: Path,
    n_cells: int,
    n_genes: int,
    n_samples: int,
    lo: int,
    hi: int,
    seed: int,
    block_size: int = 10_000,
    user_input: bool = False,
    interleave: int = 0,
) -> dict:
    """Write the synthetic cells to ``path``: as the pipeline's ``cells.h5ad`` (obs 'sample'), or
    with ``user_input`` as a user's h5ad for ``build_local_census`` (obs 'donor_id', 'cell_type';
    var 'gene_ids' holding Ensembl ids, gene symbols as var names). ``interleave``: samples take
    turns in runs of that many cells (a file ordered by something other than donor)."""
    import pandas as pd

    from scllm.files import atomic_path
    from scllm.h5ad import CSRWriter

    rng = np.random.default_rng(seed)
    sizes = sample_sizes(n_cells, n_samples, rng)
    tables, base_mean, type_boost = gene_model(n_genes, rng)
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    if user_input:
        var = pd.DataFrame({"gene_ids": ids}, index=pd.Index([f"GENE{i}" for i in range(n_genes)]))
    else:
        var = pd.DataFrame(
            {"feature_id": ids, "feature_name": [f"GENE{i}" for i in range(n_genes)]},
            index=pd.Index(ids),
        )
    samples, nnz = [], 0
    t0 = time.time()

    def sample_model():
        mix = rng.dirichlet(np.full(N_TYPES, 0.7))
        effect = np.ones(n_genes, dtype=np.float32)
        hit = rng.random(n_genes) < 0.10
        effect[hit] = rng.lognormal(0.0, 0.7, hit.sum())
        effect *= np.float32(rng.lognormal(0.0, 0.2))  # sample-wide depth
        return mix, effect

    with (
        atomic_path(path) as tmp,
        CSRWriter(tmp, var=var, uns={"synthetic": {"seed": seed}}) as writer,
    ):
        if interleave:  # each sample's cells in runs of `interleave` rows, samples taking turns
            models, left = [sample_model() for _ in sizes], sizes.copy()
            while left.sum():
                for s in np.flatnonzero(left):
                    n = int(min(interleave, left[s]))
                    block = generate_block(
                        n, *models[s], tables, base_mean, type_boost, lo, hi, rng
                    )
                    writer.append(block)
                    nnz += block.nnz
                    left[s] -= n
                    samples += [f"sample_{s:02d}"] * n
                print(
                    f"generate: {writer.rows_written} cells, {nnz / 1e6:.0f}M nnz, "
                    f"{time.time() - t0:.0f}s",
                    flush=True,
                )
            sizes_done = []
        else:
            sizes_done = sizes
        for s, size in enumerate(sizes_done):
            mix, effect = sample_model()
            done = 0
            while done < size:
                n = int(min(block_size, size - done))
                block = generate_block(n, mix, effect, tables, base_mean, type_boost, lo, hi, rng)
                writer.append(block)
                nnz += block.nnz
                done += n
            samples += [f"sample_{s:02d}"] * int(size)
            print(
                f"generate: sample {s + 1}/{len(sizes)} ({size} cells), "
                f"{writer.rows_written} cells, "
                f"{nnz / 1e6:.0f}M nnz, {time.time() - t0:.0f}s",
                flush=True,
            )
        column = "donor_id" if user_input else "sample"
        obs = pd.DataFrame(
            {column: pd.Categorical(samples)}, index=pd.Index([f"cell{i}" for i in range(n_cells)])
        )
        writer.set_obs(obs)
    return {
        "cells": n_cells,
        "genes": n_genes,
        "nnz": int(nnz),
        "n_samples": int(n_samples),
        "sample_sizes": sorted((int(x) for x in sizes), reverse=True),
        "largest_sample_fraction": float(sizes.max() / n_cells),
        "expressed_per_cell_range": [lo, hi],
        "seconds": round(time.time() - t0, 1),
        "bytes": path.stat().st_size,
    }


# --------------------------------------------------------------------------------------------
# stages (each runs in its own process)
# --------------------------------------------------------------------------------------------


def paths(workdir: Path) -> dict[str, Path]:
    return {
        "input": workdir / "input.h5ad",
        "store": workdir / "census_store",
        "samples": workdir / "samples.tsv",
        "cells": workdir / "cells.h5ad",
        "filtered": workdir / "filtered.h5ad",
        "qc": workdir / "qc.tsv",
        "hvg": workdir / "hvg.tsv",
        "binned": workdir / "binned.h5ad",
        "split": workdir / "split.tsv",
        "shards": workdir / "shards",
    }


def h5ad_shape(path: Path) -> tuple[int, int, int]:
    import h5py

    with h5py.File(path, "r") as f:
        x = f["X"]
        return int(x["indptr"].shape[0] - 1), int(x.attrs["shape"][1]), int(x["data"].shape[0])


def store_shape(store: Path) -> tuple[int, int, int]:
    """Cells, genes and stored values of a local Census built by build_local_census."""
    import tiledbsoma as soma

    with soma.Experiment.open(str(store / "census_data" / "homo_sapiens")) as exp:
        X = exp.ms["RNA"].X["raw"]
        return int(exp.obs.count), int(exp.ms["RNA"].var.count), int(X.nnz)


def run_stage(name: str, workdir: Path) -> None:
    """Child process: run one stage, report its in-process time and cells in/out on stdout."""
    from scllm.files import setup_logging

    setup_logging()
    p = paths(workdir)
    t0 = time.perf_counter()
    if name == "build_local_census":
        from scllm.prep.store import build_local_census

        build_local_census(p["input"], p["store"], dataset_id="synthetic")
    elif name == "sample_census":  # every cell: a cap of all cells keeps every sample
        from scllm.prep.h5ad_source import sample_h5ad

        sample_h5ad(
            p["input"],
            p["cells"],
            p["samples"],
            dataset_id="synthetic",
            max_cells=h5ad_shape(p["input"])[0],
        )
    elif name == "sample_census_store":
        from scllm.prep.census import sample_census

        sample_census(
            p["cells"], p["samples"], uri=str(p["store"]), max_cells=h5ad_shape(p["input"])[0]
        )
    elif name == "filter_qc":
        from scllm.prep.qc import filter_qc

        filter_qc(p["cells"], p["filtered"], p["qc"])
    elif name == "select_hvg":
        from scllm.prep.hvg import select_hvg

        select_hvg(p["filtered"], p["hvg"])
    elif name == "normalize_bin":
        from scllm.prep.binning import normalize_bin

        normalize_bin(p["filtered"], p["hvg"], p["binned"])
    elif name == "split_cells":
        from scllm.prep.split import split_cells

        split_cells(p["binned"], p["split"])
    elif name == "tokenize_shards":
        from scllm.prep.tokenize import tokenize_shards

        tokenize_shards(p["binned"], p["split"], p["shards"])
    elif name == "scgpt_style":
        scgpt_style_inmemory(p["cells"])
    elif name == "warmup":  # compile numba kernels into the cache; not timed
        import scipy.sparse as sp

        from scllm.prep.binning import bin_csr

        bin_csr(sp.random(10, 10, density=0.5, format="csr", dtype=np.float32, random_state=0))
    else:
        raise ValueError(name)
    print("STAGE_SECONDS", time.perf_counter() - t0, flush=True)
    print("STAGE_PEAK_RSS_KB", peak_rss_kb(), flush=True)


def peak_rss_kb() -> int:
    """This process's own peak resident set (VmHWM). Unlike the parent's wait4/RUSAGE_CHILDREN
    ru_maxrss, it does not include the RSS of the process that forked us: Linux carries the
    parent's high-water mark into the child's ru_maxrss across fork+exec."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def scgpt_style_inmemory(cells_h5ad: Path, n_bins: int = 51, n_hvg: int = 1200) -> None:
    """The steps of scGPT's ``Preprocessor`` as its pretraining tutorial configures it (filter
    genes by counts >= 3, normalize_total 1e4, log1p, 1200 seurat_v3 HVGs by sample on raw counts,
    subset, per-cell loop of np.quantile/np.digitize over a densified HVG matrix), re-implemented
    with the same scanpy/numpy calls (scGPT itself is not a dependency) on the whole matrix in
    memory, writing nothing. For comparison only."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    adata = ad.read_h5ad(cells_h5ad)
    sc.pp.filter_genes(adata, min_counts=3)
    sc.pp.filter_cells(adata, min_genes=200)  # our QC's cell filter, for equal cell counts
    adata.layers["X_normed"] = sc.pp.normalize_total(adata, target_sum=1e4, inplace=False)["X"]
    adata.layers["X_log1p"] = adata.layers["X_normed"].copy()
    sc.pp.log1p(adata, layer="X_log1p")
    sc.pp.highly_variable_genes(
        adata, layer=None, n_top_genes=n_hvg, batch_key="sample", flavor="seurat_v3", subset=True
    )
    layer = adata.layers["X_log1p"]
    layer = layer.toarray() if sp.issparse(layer) else layer
    binned_rows, bin_edges = [], []
    for row in layer:
        non_zero_ids = row.nonzero()
        non_zero_row = row[non_zero_ids]
        if non_zero_row.size == 0:
            binned_rows.append(np.zeros_like(row, dtype=np.int64))
            bin_edges.append(np.array([0] * n_bins))
            continue
        bins = np.quantile(non_zero_row, np.linspace(0, 1, n_bins - 1))
        left = np.digitize(non_zero_row, bins)
        right = np.digitize(non_zero_row, bins, right=True)
        rands = np.random.rand(len(non_zero_row))  # scGPT's tie spreading (global RNG)
        digits = np.ceil(rands * (right - left) + left).astype(np.int64)
        binned_row = np.zeros_like(row, dtype=np.int64)
        binned_row[non_zero_ids] = digits
        binned_rows.append(binned_row)
        bin_edges.append(np.concatenate([[0], bins]))
    adata.layers["X_binned"] = np.stack(binned_rows)
    adata.obsm["bin_edges"] = np.stack(bin_edges)
    print(f"scgpt_style: {adata.n_obs} cells x {adata.n_vars} HVGs binned", flush=True)


def stage_io(name: str, workdir: Path) -> dict:
    """Cells (and non-zeros) in and out of a finished stage, read from its artifacts."""
    p = paths(workdir)
    matrices = {  # stage: the matrix it reads, the matrix it writes
        "build_local_census": ("input", "store"),
        "sample_census": ("input", "cells"),
        "sample_census_store": ("store", "cells"),
        "filter_qc": ("cells", "filtered"),
    }
    if name in matrices:
        (cin, gin, nin), (cout, gout, nout) = (
            store_shape(p[k]) if k == "store" else h5ad_shape(p[k]) for k in matrices[name]
        )
        return {
            "cells_in": cin,
            "cells_out": cout,
            "genes_in": gin,
            "genes_out": gout,
            "nnz_in": nin,
            "nnz_out": nout,
        }
    if name == "select_hvg":
        cin, gin, nin = h5ad_shape(p["filtered"])
        n_hvg = sum(1 for _ in open(p["hvg"])) - 1
        return {
            "cells_in": cin,
            "cells_out": cin,
            "genes_in": gin,
            "genes_out": n_hvg,
            "nnz_in": nin,
        }
    if name == "normalize_bin":
        cin, gin, nin = h5ad_shape(p["filtered"])
        cout, gout, nout = h5ad_shape(p["binned"])
        return {
            "cells_in": cin,
            "cells_out": cout,
            "genes_in": gin,
            "genes_out": gout,
            "nnz_in": nin,
            "nnz_out": nout,
        }
    if name == "split_cells":
        cin, _, _ = h5ad_shape(p["binned"])
        return {"cells_in": cin, "cells_out": sum(1 for _ in open(p["split"])) - 1}
    if name == "tokenize_shards":
        cin, _, nin = h5ad_shape(p["binned"])
        manifest = json.loads((p["shards"] / "manifest.json").read_text())
        cells = {k: sum(s["n_cells"] for s in v) for k, v in manifest["splits"].items()}
        tokens = sum(s["n_tokens"] for v in manifest["splits"].values() for s in v)
        return {
            "cells_in": cin,
            "cells_out": sum(cells.values()),
            "cells_per_split": cells,
            "tokens_out": tokens,
            "nnz_in": nin,
            "max_seq_len": manifest["max_seq_len"],
        }
    raise ValueError(name)


def child_env(workdir: Path, threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "NUMBA_NUM_THREADS": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "NUMBA_CACHE_DIR": str(workdir / "numba_cache"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def spawn(name: str, workdir: Path, threads: int, log_path: Path, extra=()) -> dict:
    """Run one stage in a child; wall time and that child's own peak RSS."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_stage",
        name,
        "--workdir",
        str(workdir),
        *extra,
    ]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(workdir, threads)
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(
            f"stage {name} failed (exit {proc.returncode}); log {log_path}:\n{text[-3000:]}"
        )
    seconds = [
        float(line.split()[1]) for line in text.splitlines() if line.startswith("STAGE_SECONDS")
    ]
    hwm = [
        int(line.split()[1]) for line in text.splitlines() if line.startswith("STAGE_PEAK_RSS_KB")
    ]
    return {
        "wall_s": round(wall, 2),
        "call_s": round(seconds[-1], 2) if seconds else None,
        "peak_rss_mb": round(hwm[-1] / 1024, 1) if hwm else None,  # the child's own VmHWM
        # wait4 rusage of the child; an upper bound: includes this (small) parent's RSS at fork
        "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
        "user_s": round(usage.ru_utime, 1),
        "sys_s": round(usage.ru_stime, 1),
    }


def machine(threads: int) -> dict:
    from importlib.metadata import version

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        "?",
    )
    mem_kb = next(
        int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")
    )
    pkgs = {}
    for name in ("numpy", "scipy", "scanpy", "anndata", "h5py", "numba", "pandas", "scikit-misc"):
        try:
            pkgs[name] = version(name)
        except Exception:
            pkgs[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "numba_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": pkgs,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=30_000)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument(
        "--min-expressed", type=int, default=1000, help="lower bound of expressed genes per cell"
    )
    ap.add_argument(
        "--max-expressed", type=int, default=3000, help="upper bound of expressed genes per cell"
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch directory (default /tmp/scllm_bench_<cells>)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="numba/BLAS threads per stage")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--ingest",
        choices=sorted(INGEST),
        default=None,
        help="start from a user's h5ad (input.h5ad): 'h5ad' times sample_census reading it "
        "directly (the pipeline's census.source: h5ad), 'store' build_local_census then "
        "sample_census on that store",
    )
    ap.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="samples take turns in the generated file in runs of this many cells "
        "(default: one block each)",
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the workdir (default: delete it at the end)"
    )
    ap.add_argument(
        "--compare-scgpt-style",
        action="store_true",
        help="also time scGPT-style in-memory Preprocessor steps on the same cells.h5ad "
        "(untested; needs RAM ~ 50 bytes per non-zero)",
    )
    ap.add_argument("--_stage", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(f"/tmp/scllm_bench_{args.cells}")

    if args._stage == "generate":
        sys.path.insert(0, str(ROOT / "src"))
        info = generate(
            paths(workdir)["input" if args.ingest else "cells"],
            args.cells,
            args.genes,
            args.samples,
            args.min_expressed,
            args.max_expressed,
            args.seed,
            user_input=bool(args.ingest),
            interleave=args.interleave,
        )
        info["peak_rss_mb"] = round(peak_rss_kb() / 1024, 1)
        (workdir / "input.json").write_text(json.dumps(info, indent=1) + "\n")
        return
    if args._stage:
        sys.path.insert(0, str(ROOT / "src"))
        run_stage(args._stage, workdir)
        return

    sys.path.insert(0, str(ROOT / "src"))
    out = args.out or ROOT / "benchmarks" / "results" / f"preprocess_{args.cells}.json"
    workdir.mkdir(parents=True, exist_ok=True)
    p = paths(workdir)
    result = {
        "benchmark": "preprocess",
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k != "_stage"
        },
        "machine": machine(args.threads),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        target = p["input" if args.ingest else "cells"]
        print(
            f"generating {args.cells} cells x {args.genes} genes into {target} "
            "(log: generate.log)",
            flush=True,
        )
        spawn(
            "generate",
            workdir,
            args.threads,
            workdir / "generate.log",
            extra=[
                "--cells",
                str(args.cells),
                "--genes",
                str(args.genes),
                "--samples",
                str(args.samples),
                "--min-expressed",
                str(args.min_expressed),
                "--max-expressed",
                str(args.max_expressed),
                "--seed",
                str(args.seed),
                "--interleave",
                str(args.interleave),
            ]
            + (["--ingest", args.ingest] if args.ingest else []),
        )
        result["input"] = json.loads((workdir / "input.json").read_text())
        gi = result["input"]
        print(
            f"generated: {gi['nnz'] / 1e6:.0f}M nnz ({gi['nnz'] / gi['cells']:.0f}/cell), "
            f"{gi['bytes'] / 1e9:.2f} GB in {gi['seconds']}s",
            flush=True,
        )
        spawn("warmup", workdir, args.threads, workdir / "warmup.log")
        stages, total = {}, 0.0
        for name in (INGEST[args.ingest] if args.ingest else []) + STAGES:
            rec = spawn(name, workdir, args.threads, workdir / f"{name}.log")
            rec.update(stage_io(name, workdir))
            rec["cells_per_s"] = round(rec["cells_in"] / rec["wall_s"], 1)
            stages[name] = rec
            total += rec["wall_s"]
            print(
                f"{name}: {rec['wall_s']:.1f}s wall, {rec['cells_per_s']:.0f} cells/s, "
                f"peak RSS {rec['peak_rss_mb']:.0f} MB, cells {rec['cells_in']} -> "
                f"{rec['cells_out']}",
                flush=True,
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps({**result, "stages": stages}, indent=1) + "\n"
            )  # partial results
        result["stages"] = stages
        if args.compare_scgpt_style:
            rec = spawn("scgpt_style", workdir, args.threads, workdir / "scgpt_style.log")
            rec["cells_in"] = result["input"]["cells"]
            rec["cells_per_s"] = round(rec["cells_in"] / rec["wall_s"], 1)
            result["scgpt_style_inmemory"] = rec
            print(
                f"scgpt-style in-memory: {rec['wall_s']:.1f}s wall, "
                f"peak RSS {rec['peak_rss_mb']:.0f} MB",
                flush=True,
            )
        result["total_wall_s"] = round(total, 1)
        result["total_cells_per_s"] = round(args.cells / total, 1)
        result["max_peak_rss_mb"] = max(s["peak_rss_mb"] for s in stages.values())
        sizes = {
            k: (
                v.stat().st_size
                if v.is_file()
                else sum(f.stat().st_size for f in v.rglob("*") if f.is_file())
            )
            for k, v in p.items()
            if v.exists()
        }
        result["artifact_bytes"] = sizes
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"total {total:.1f}s; wrote {out}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
