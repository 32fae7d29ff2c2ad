"""What the test modules share: tiny model and train settings, synthetic token shards and a
synthetic Census source, a copy of the workflow and a config writer, weight comparison, and the
training entry point run in a child process.

Test modules never import each other: they take these as fixtures (``tiny_model``,
``tiny_train``, ``synthetic_shards``, ``synthetic_source``, ``workflow_copy``, ``config_writer``,
``same_weights``, ``flip_bytes``), or import plain values and helpers from here where a
module-level constant or a child process needs them (``from conftest import TINY_MODEL``,
``child_env``, ``train_module_args``, ``snapshot``, ``start_writer``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import yaml

from scllm.checks import file_sha256
from scllm.shards import write_shard
from scllm.tokens import (
    CLS_VALUE,
    MASK_VALUE,
    PAD_VALUE,
    build_vocab,
    sequences_from_binned,
    vocab_sha256,
    write_vocab,
)

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

TINY_MODEL = {"n_layers": 2, "n_heads": 2, "d_model": 32, "d_ff": 64, "dropout": 0.1}
TINY_TRAIN = {
    "epochs": 2,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "checkpoint_every_steps": 3,
    "log_every_steps": 2,
    "bucket_size_batches": 2,
    "num_threads": 1,
    "device": "cpu",
}


def write_synthetic_shards(
    root: Path, n_train=44, n_val=12, n_genes=24, n_bins=51, cells_per_shard=20, seed=0
) -> Path:
    """Shards + vocab.json + genes.tsv + manifest.json in the tokenize_shards layout; returns the
    manifest path.

    Each gene has a typical bin, so there is something to learn; cells express 3..n_genes genes.
    """
    rng = np.random.default_rng(seed)
    feature_ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    vocab = build_vocab(feature_ids)
    write_vocab(vocab, root / "vocab.json")
    (root / "genes.tsv").write_text(
        "feature_id\tfeature_name\trank\n"
        + "".join(f"{g}\tGENE{i}\t{i + 1}\n" for i, g in enumerate(feature_ids))
    )
    sha = vocab_sha256(vocab)
    level = rng.uniform(3, n_bins - 3, n_genes)
    manifest = {
        "n_genes": n_genes,
        "vocab_size": n_genes + 2,
        "cls_id": n_genes,
        "pad_id": n_genes + 1,
        "n_bins": n_bins,
        "cls_value": CLS_VALUE,
        "pad_value": PAD_VALUE,
        "mask_value": MASK_VALUE,
        "vocab_sha256": sha,
        "max_seq_len": n_genes + 1,
        "splits": {},
    }
    for split, n_cells in (("train", n_train), ("validation", n_val)):
        binned = np.zeros((n_cells, n_genes), dtype=np.int16)
        for i in range(n_cells):
            genes = rng.choice(n_genes, rng.integers(3, n_genes + 1), replace=False)
            binned[i, genes] = np.clip(
                np.round(level[genes] + rng.normal(0, 3, len(genes))), 1, n_bins - 1
            )
        entries = []
        for k, start in enumerate(range(0, n_cells, cells_per_shard)):
            block = sp.csr_matrix(binned[start : start + cells_per_shard])
            offsets, gene_ids, values = sequences_from_binned(block, cls_id=n_genes)
            rel = f"{split}/shard_{k:05d}.h5"
            attrs = {
                key: manifest[key]
                for key in (
                    "n_genes",
                    "n_bins",
                    "cls_id",
                    "pad_id",
                    "cls_value",
                    "pad_value",
                    "mask_value",
                    "vocab_sha256",
                )
            }
            write_shard(
                root / rel,
                offsets,
                gene_ids,
                values,
                np.arange(start, start + block.shape[0]),
                {**attrs, "split": split},
            )
            entries.append(
                {
                    "path": rel,
                    "n_cells": block.shape[0],
                    "n_tokens": int(offsets[-1]),
                    "sha256": file_sha256(root / rel),
                }
            )
        manifest["splits"][split] = entries
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root / "manifest.json"


@pytest.fixture(scope="session")
def synthetic_shards():
    """``write_synthetic_shards`` (a function fixture, so module-scoped fixtures can use it)."""
    return write_synthetic_shards


def _flip_bytes(path: Path, dataset: str, n: int = 3) -> None:
    """Invert ``n`` bytes in the middle of a dataset's stored data, as a disk or copy error
    would."""
    with h5py.File(path, "r") as f:
        start, size = f[dataset].id.get_offset(), f[dataset].id.get_storage_size()
    data = bytearray(path.read_bytes())
    for k in range(n):
        data[start + size // 2 + 8 * k + 2] ^= (
            0xFF  # a middle byte of an element: the value changes a lot
        )
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def flip_bytes():
    """``_flip_bytes(path, dataset, n=3)``: damage a dataset's bytes in place."""
    return _flip_bytes


# --- the training entry point in a child process ----------------------------------------------


def child_env(**extra: str) -> dict:
    """This environment with the checkout's src/ first on PYTHONPATH, so that a child process
    imports the scllm under test."""
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": path}


def train_module_args(shards, out, params, log_file) -> list[str]:
    """``-m scllm.train ...``: the entry point that rule pretrain and torchrun run."""
    return [
        "-m",
        "scllm.train",
        "--manifest",
        str(shards),
        "--out",
        str(out),
        "--params",
        str(params),
        "--log-file",
        str(log_file),
    ]


# --- what is on disk, and a writer that holds an output ------------------------------------------


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file at or below ``path`` (relative name -> bytes), links followed: compare two
    snapshots to show that nothing there changed, byte for byte."""
    path = Path(path)
    if not path.is_dir():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


_WRITER = """
import sys, time
from pathlib import Path
from scllm.files import atomic_path

target, ready, go = map(Path, sys.argv[1:])
with atomic_path(target) as tmp:
    tmp.write_bytes(b"first half, ")
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    with open(tmp, "ab") as f:
        f.write(b"second half")
"""


def start_writer(target: Path, signals: Path) -> tuple[subprocess.Popen, Path]:
    """A process that writes ``target`` through atomic_path and stops halfway, holding it,
    until the returned path (``go``) exists; then it completes the file
    (``b"first half, second half"``). Returns once the first half is written."""
    signals.mkdir(parents=True, exist_ok=True)
    ready, go = signals / "ready", signals / "go"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target), str(ready), str(go)],
        env=child_env(),
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the writer did not start: {proc.communicate()[1].decode()}")
        time.sleep(0.01)
    return proc, go


# --- trained weights -----------------------------------------------------------------------------


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """A saved model or checkpoint, as pretrain wrote it."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict):
    """Bit-identical tensors under the same names (resume must reproduce a run exactly)."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="session")
def tiny_model() -> dict:
    return dict(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_train() -> dict:
    return dict(TINY_TRAIN)


@pytest.fixture(scope="session")
def same_weights():
    """``assert_same_weights(a, b)``."""
    return assert_same_weights


# --- a synthetic Census source -------------------------------------------------------------------

SOURCE_GENES = 40
# (dataset_id, donor_id, n_cells); donor ids repeat across datasets and must stay separate samples
DONORS = [
    ("dsA", "d1", 40), ("dsA", "d2", 25), ("dsA", "pooled", 12),
    ("dsB", "d1", 30), ("dsB", "d3", 20),
    ("dsC", "d4", 35), ("dsC", "d5", 18), ("dsC", "d1", 10), ("dsC", "d6", 14),
]  # fmt: skip


def synthetic_source(seed=0) -> ad.AnnData:
    """Raw counts of the DONORS' cells with Census obs columns: some non-blood, non-primary or
    diseased cells scattered in, one lung-only and one duplicate-only sample."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        [
            {"dataset_id": dataset, "donor_id": donor}
            for dataset, donor, n in DONORS
            for _ in range(n)
        ]
    )
    n = len(obs)
    obs["tissue_general"] = "blood"
    obs["is_primary_data"] = True
    obs["disease"] = "normal"
    obs.loc[rng.random(n) < 0.1, "tissue_general"] = "lung"  # scattered non-blood cells
    obs.loc[rng.random(n) < 0.1, "is_primary_data"] = False  # scattered duplicates
    obs.loc[rng.random(n) < 0.1, "disease"] = "COVID-19"
    obs.loc[(obs.dataset_id == "dsC") & (obs.donor_id == "d6"), "tissue_general"] = "lung"
    obs.loc[(obs.dataset_id == "dsB") & (obs.donor_id == "d3"), "is_primary_data"] = False
    obs["cell_type"] = rng.choice(["T cell", "B cell", "monocyte"], n)
    obs["observation_joinid"] = [f"j{rng.integers(1e9):09d}_{i}" for i in range(n)]
    obs.index = [f"cell{i}" for i in range(n)]
    # Ensembl ids (some with version suffixes) in var['gene_ids'], symbols as var names
    gene_ids = [f"ENSG{i:011d}" + (".7" if i % 3 == 0 else "") for i in range(SOURCE_GENES)]
    var = pd.DataFrame({"gene_ids": gene_ids}, index=[f"GENE{i}" for i in range(SOURCE_GENES)])
    dense = rng.poisson(rng.gamma(0.5, 2.0, SOURCE_GENES), size=(n, SOURCE_GENES)).astype(
        np.float32
    )
    dense[:, 0] = np.arange(n)  # every cell distinct, so row matching is a real check
    return ad.AnnData(X=sp.csr_matrix(dense), obs=obs, var=var)


@pytest.fixture(name="synthetic_source", scope="session")
def synthetic_source_fixture():
    """``synthetic_source(seed=0)``: a fresh AnnData per call."""
    return synthetic_source


# --- the workflow --------------------------------------------------------------------------------

DATA_OUTPUTS = {  # rule -> an output it writes, in DAG order
    "sample_census": "cells.h5ad",
    "filter_qc": "filtered.h5ad",
    "select_hvg": "hvg.tsv",
    "normalize_bin": "binned.h5ad",
    "split": "split.tsv",
    "tokenize_shards": "shards/manifest.json",
    "pretrain": "model/best_model.pt",
    "embed": "embeddings.h5ad",
    "evaluate": "evaluation/metrics.tsv",
}


def run_output(workdir: Path, rule: str, run: str = "demo") -> Path:
    """The DATA_OUTPUTS file of ``rule`` in run ``run``: in the shared data folder run.json
    names for a data stage, in results/<run>/ for the others."""
    results = workdir / "results" / run
    folder = json.loads((results / "run.json").read_text())["data"].get(rule)
    return (workdir / folder if folder else results) / DATA_OUTPUTS[rule]


def run_log(workdir: Path, rule: str, run: str = "demo") -> Path:
    """The log of ``rule`` in run ``run`` (a data stage logs in its data folder)."""
    results = workdir / "results" / run
    folder = json.loads((results / "run.json").read_text())["data"].get(rule)
    return workdir / folder / f"{rule}.log" if folder else results / "logs" / f"{rule}.log"


# run: demo, so that workflow tests share (and check) the embedded default's results folder.
TINY_TRAINING = {
    "run": "demo",
    "model": {"n_layers": 1, "n_heads": 2, "d_model": 16, "d_ff": 32, "dropout": 0.0},
    "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 2},
}


def copy_workflow(dest: Path) -> Path:
    """The workflow's files (no results) copied to ``dest``, to run Snakemake there."""
    for name in (
        "Snakefile",
        "rules",
        "workflow",
        "config",
        "envs",
        "profiles",
        "resources",
        "src",
    ):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def write_config(workdir: Path, name: str, overrides: dict) -> str:
    """config/<name> in ``workdir`` holding ``overrides``; returns its path for --configfile."""
    path = workdir / "config" / name
    path.write_text(yaml.safe_dump(overrides))
    return f"config/{name}"


@pytest.fixture
def workflow_copy(tmp_path) -> Path:
    """A fresh copy of the workflow in a temporary directory."""
    dest = tmp_path / "workflow"
    dest.mkdir()
    return copy_workflow(dest)


@pytest.fixture(scope="session")
def config_writer():
    """``write_config(workdir, name, overrides)``."""
    return write_config


# --- a model and cells it never saw -------------------------------------------------------------


def write_heldout_files(root, training_pca: bool = True):
    """A random-initialised model over 30 genes and an h5ad of 90 new cells of 3 types (each type
    expresses its own block of vocabulary genes), plus 10 genes outside the vocabulary and 6
    cells labelled 'unknown'. The model folder holds a training PCA (fitted on other cells of the
    same types) unless ``training_pca`` is False."""
    import json
    from dataclasses import asdict

    import torch

    from scllm.model import CellTransformer, ModelConfig
    from scllm.tokens import build_vocab, vocab_sha256, write_vocab

    ids = [f"ENSG{i:011d}" for i in range(30)]
    model_dir = root / "model"
    model_dir.mkdir()
    vocab = build_vocab(ids)
    write_vocab(vocab, model_dir / "vocab.json")
    pd.DataFrame(
        {"feature_id": ids, "feature_name": [f"G{i}" for i in range(30)], "token_id": range(30)}
    ).to_csv(model_dir / "genes.tsv", sep="\t", index=False)
    cfg = ModelConfig(
        vocab_size=32, n_bins=11, n_layers=1, n_heads=2, d_model=16, d_ff=32, dropout=0.0
    )
    torch.manual_seed(0)
    torch.save(CellTransformer(cfg).state_dict(), model_dir / "best_model.pt")
    (model_dir / "args.json").write_text(
        json.dumps({"model": asdict(cfg), "data": {"vocab_sha256": vocab_sha256(vocab)}})
    )

    rng = np.random.default_rng(0)

    def cells_of_three_types():
        types = np.repeat(["B", "T", "NK"], 32)
        counts = rng.poisson(0.3, (96, 40)).astype(np.float32)
        for t, block in zip(["B", "T", "NK"], [range(0, 10), range(10, 20), range(20, 30)]):
            counts[np.ix_(types == t, list(block))] += rng.poisson(5, ((types == t).sum(), 10))
        return types, counts

    types, counts = cells_of_three_types()
    labels = types.astype(object)
    labels[::16] = "unknown"
    # The file's genes: vocabulary genes in another order (columns shuffled), then 10 others.
    order = rng.permutation(40)
    var_ids = ids + [f"ENSG9{i:010d}" for i in range(10)]
    obs = pd.DataFrame({"cell_type": labels, "donor": "d1"}, index=[f"new{i}" for i in range(96)])
    var = pd.DataFrame(index=np.asarray(var_ids)[order])
    h5ad = root / "new cells.h5ad"
    ad.AnnData(X=sp.csr_matrix(counts[:, order]), obs=obs, var=var).write_h5ad(h5ad)
    if training_pca:
        from scllm.eval.baselines import fit_training_pca

        _, train = cells_of_three_types()  # other cells, as the model's training cells
        log_normalized = np.log1p(1e4 * train[:, :30] / train.sum(1, keepdims=True))
        pca = fit_training_pca(sp.csr_matrix(log_normalized), ids, n_pcs=5)
        pca.save(model_dir / "training_pca.npz")
    return model_dir, h5ad, counts, labels
