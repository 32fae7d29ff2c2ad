"""Helpers shared by test modules: tiny model settings and synthetic token shards.

New test modules take them as fixtures: ``synthetic_shards`` (write_synthetic_shards), ``flip_bytes``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import h5py
import pytest
import scipy.sparse as sp

from scllm.checks import file_sha256
from scllm.tokens import (CLS_VALUE, MASK_VALUE, PAD_VALUE, build_vocab, sequences_from_binned, vocab_sha256,
                          write_shard, write_vocab)

TINY_MODEL = {"n_layers": 2, "n_heads": 2, "d_model": 32, "d_ff": 64, "dropout": 0.1}
TINY_TRAIN = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "checkpoint_every_steps": 3,
              "log_every_steps": 2, "bucket_size_batches": 2, "num_threads": 1, "device": "cpu"}


def write_synthetic_shards(root: Path, n_train=44, n_val=12, n_genes=24, n_bins=51, cells_per_shard=20, seed=0) -> Path:
    """Shards + vocab.json + genes.tsv + manifest.json in the tokenize_shards layout; returns the manifest path.

    Each gene has a typical bin, so there is something to learn; cells express 3..n_genes genes.
    """
    rng = np.random.default_rng(seed)
    feature_ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    vocab = build_vocab(feature_ids)
    write_vocab(vocab, root / "vocab.json")
    (root / "genes.tsv").write_text("feature_id\tfeature_name\trank\n"
                                    + "".join(f"{g}\tGENE{i}\t{i + 1}\n" for i, g in enumerate(feature_ids)))
    sha = vocab_sha256(vocab)
    level = rng.uniform(3, n_bins - 3, n_genes)
    manifest = {"n_genes": n_genes, "vocab_size": n_genes + 2, "cls_id": n_genes, "pad_id": n_genes + 1,
                "n_bins": n_bins, "cls_value": CLS_VALUE, "pad_value": PAD_VALUE, "mask_value": MASK_VALUE,
                "vocab_sha256": sha, "max_seq_len": n_genes + 1, "splits": {}}
    for split, n_cells in (("train", n_train), ("validation", n_val)):
        binned = np.zeros((n_cells, n_genes), dtype=np.int16)
        for i in range(n_cells):
            genes = rng.choice(n_genes, rng.integers(3, n_genes + 1), replace=False)
            binned[i, genes] = np.clip(np.round(level[genes] + rng.normal(0, 3, len(genes))), 1, n_bins - 1)
        entries = []
        for k, start in enumerate(range(0, n_cells, cells_per_shard)):
            block = sp.csr_matrix(binned[start:start + cells_per_shard])
            offsets, gene_ids, values = sequences_from_binned(block, cls_id=n_genes)
            rel = f"{split}/shard_{k:05d}.h5"
            attrs = {key: manifest[key] for key in ("n_genes", "n_bins", "cls_id", "pad_id", "cls_value",
                                                    "pad_value", "mask_value", "vocab_sha256")}
            write_shard(root / rel, offsets, gene_ids, values, np.arange(start, start + block.shape[0]),
                        {**attrs, "split": split})
            entries.append({"path": rel, "n_cells": block.shape[0], "n_tokens": int(offsets[-1]),
                            "sha256": file_sha256(root / rel)})
        manifest["splits"][split] = entries
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root / "manifest.json"


@pytest.fixture(scope="session")
def synthetic_shards():
    """``write_synthetic_shards`` (a function fixture, so module-scoped fixtures can use it)."""
    return write_synthetic_shards


def _flip_bytes(path: Path, dataset: str, n: int = 3) -> None:
    """Invert ``n`` bytes in the middle of a dataset's stored data, as a disk or copy error would."""
    with h5py.File(path, "r") as f:
        start, size = f[dataset].id.get_offset(), f[dataset].id.get_storage_size()
    data = bytearray(path.read_bytes())
    for k in range(n):
        data[start + size // 2 + 8 * k + 2] ^= 0xFF  # a middle byte of an element: the value changes a lot
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def flip_bytes():
    """``_flip_bytes(path, dataset, n=3)``: damage a dataset's bytes in place."""
    return _flip_bytes
