"""Lazily read shards: ShardDataset reads a batch's cells from the files when asked, holds only the
cells' lengths, and gives the same cells, batches and training as holding every shard in memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scllm.train.batches as batches_mod
import scllm.train.loop as train_mod
from scllm.errors import CorruptArtifactError
from scllm.shards import (
    Shard,
    ShardDataset,
    ShardReader,
    check_shard,
    read_listed_shard,
    read_manifest,
    read_shard,
    write_shard,
)
from scllm.tokens import RaggedCells, sequences_from_binned
from scllm.train.batches import LengthGroupedBatchSampler

from conftest import TINY_MODEL, TINY_TRAIN, write_synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(
        tmp_path_factory.mktemp("shards"), n_train=90, n_val=10, cells_per_shard=25
    )


def in_memory(manifest_path: Path, split: str) -> RaggedCells:
    """The split as the in-memory ShardDataset of earlier versions built it: every shard read whole
    and concatenated in manifest order."""
    manifest = read_manifest(manifest_path)
    parts = [
        read_listed_shard(manifest_path.parent, manifest, e) for e in manifest["splits"][split]
    ]
    lengths = np.concatenate([np.diff(p.offsets) for p in parts])
    return RaggedCells(
        np.r_[0, np.cumsum(lengths)],
        np.concatenate([p.gene_ids for p in parts]),
        np.concatenate([p.values for p in parts]),
    )


def reference_batches(lengths, batch_size, seed, bucket_size_batches, epoch, shuffle=True):
    """The length-grouped batches as a list of arrays, written the plain way (earlier versions)."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    batches = []
    for start in range(0, n, batch_size * bucket_size_batches):
        bucket = order[start : start + batch_size * bucket_size_batches]
        bucket = bucket[np.argsort(-lengths[bucket], kind="stable")]
        batches += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def test_cells_read_lazily_equal_the_shards_read_whole(shards):
    for split in ("train", "validation"):
        lazy, whole = ShardDataset(shards, split), in_memory(shards, split)
        assert len(lazy) == len(whole) and np.array_equal(lazy.lengths, whole.lengths)
        order = np.random.default_rng(0).permutation(
            len(whole)
        )  # any order, across shard boundaries
        for (g, v), i in zip(lazy.cells(order), order):
            assert np.array_equal(g, whole.cell(i)[0]) and np.array_equal(v, whole.cell(i)[1])
            assert g.dtype == np.int32 and v.dtype == np.int16
        with pytest.raises(IndexError, match=f"0..{len(whole) - 1}"):
            lazy.cells([len(whole)])


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_batches_equal_the_plain_implementation(shuffle):
    lengths = np.random.default_rng(1).integers(2, 1202, 2_345).astype(np.int32)
    for seed, epoch, world_size in ((0, 0, 1), (3, 2, 2), (7, 5, 3)):
        expected = reference_batches(lengths, 16, seed, 5, epoch, shuffle)
        usable = len(expected) - len(expected) % world_size
        for rank in range(world_size):
            sampler = LengthGroupedBatchSampler(lengths, 16, seed, 5, rank, world_size, shuffle)
            got = sampler.epoch_batches(epoch, skip=2)
            mine = expected[rank:usable:world_size][2:]
            assert len(got) == len(mine) and all(np.array_equal(a, b) for a, b in zip(got, mine))


def test_reading_cells_keeps_no_tokens_in_memory(tmp_path):
    """4,000 cells of ~480 tokens (12 MB of tokens): the lengths cost 4 bytes a cell, and reading
    every cell in batches of 32 keeps nothing and never holds more than a few batches' tokens."""
    rng = np.random.default_rng(0)
    n_cells, n_genes = 4_000, 1_200
    binned = sp.random(
        n_cells, n_genes, density=0.4, format="csr", random_state=1, dtype=np.float32
    )
    binned.data = rng.integers(1, 51, binned.nnz).astype(np.float32)
    offsets, gene_ids, values = sequences_from_binned(binned, cls_id=n_genes)
    write_shard(
        tmp_path / "big.h5",
        offsets,
        gene_ids,
        values,
        np.arange(n_cells),
        {"n_genes": n_genes, "n_bins": 51, "cls_id": n_genes},
    )
    reader = ShardReader(tmp_path / "big.h5")
    assert reader.check() is None and reader.n_tokens == len(gene_ids) > 400 * n_cells
    tracemalloc.start()
    lengths = np.diff(reader.offsets()).astype(np.int32)
    retained = tracemalloc.get_traced_memory()[0]
    for start in range(0, n_cells, 32):
        for i in range(start, min(start + 32, n_cells)):
            g, v = reader.cell(i, int(lengths[i]))
            assert g[0] == n_genes and len(v) == lengths[i]
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert retained < 6 * n_cells and after - retained < 64_000 and peak < 200_000, (
        retained,
        after,
        peak,
    )


def test_a_chunked_compressed_shard_reads_the_same_through_h5py(shards, tmp_path):
    src = shards.parent / "train/shard_00001.h5"
    copy = tmp_path / "chunked.h5"
    with h5py.File(src, "r") as f, h5py.File(copy, "w") as g:
        for name in f:
            g.create_dataset(name, data=f[name][:], chunks=(7,), compression="gzip")
        g.attrs.update(f.attrs)
    whole, lazy = read_shard(src), ShardReader(copy)
    assert lazy.check() is None
    for i in range(whole.n_cells):
        g, v = lazy.cell(i, int(whole.lengths[i]))
        assert np.array_equal(g, whole.cell(i)[0]) and np.array_equal(v, whole.cell(i)[1])


@pytest.mark.parametrize("damage", ["gene", "value", "cls", "offsets"])
def test_block_checks_find_what_a_whole_shard_check_finds(tmp_path, damage):
    """A shard checked a few tokens at a time gives check_shard's message on the whole arrays."""
    manifest = write_synthetic_shards(tmp_path, n_train=20, n_val=2, cells_per_shard=20)
    shard = read_shard(manifest.parent / "train/shard_00000.h5")
    gene_ids, values, offsets = shard.gene_ids.copy(), shard.values.copy(), shard.offsets.copy()
    cell = 13  # in a late block
    at = offsets[cell] + 2
    if damage == "gene":
        gene_ids[at] = 99
    elif damage == "value":
        values[at] = 60
    elif damage == "cls":
        gene_ids[offsets[cell]] = 3
    else:
        offsets[cell + 1] = offsets[cell]  # a cell of no tokens
    write_shard(tmp_path / "bad.h5", offsets, gene_ids, values, shard.cell_index, shard.attrs)
    expected = check_shard(unchecked(tmp_path / "bad.h5"))  # the whole arrays at once
    assert expected
    assert ShardReader(tmp_path / "bad.h5").check(block_tokens=16) == expected


def unchecked(path) -> Shard:
    """A shard's arrays, read whole without any check."""
    with h5py.File(path, "r") as f:
        return Shard(
            f["offsets"][:],
            f["gene_ids"][:],
            f["values"][:],
            f["cell_index"][:],
            {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()},
        )


def test_a_damaged_listed_shard_is_refused_when_opened(tmp_path, flip_bytes):
    manifest = write_synthetic_shards(tmp_path, n_train=30, n_val=4)
    flip_bytes(manifest.parent / "train/shard_00001.h5", "values")
    with pytest.raises(
        CorruptArtifactError,
        match=r"train/shard_00001\.h5 has sha256 .*--forcerun tokenize_shards",
    ):
        ShardDataset(manifest, "train")


def test_training_on_lazy_shards_equals_training_in_memory(shards, tmp_path, monkeypatch):
    """The same run with the split held in memory (as before) ends with the same weights, bit for
    bit."""
    train = {**TINY_TRAIN, "epochs": 2, "gene_emb_init": "pca"}
    lazy = train_mod.pretrain(shards, tmp_path / "lazy", TINY_MODEL, train)

    class InMemoryDataset(RaggedCells):
        def __init__(self, manifest_path, split):
            whole = in_memory(Path(manifest_path), split)
            super().__init__(whole.offsets, whole.gene_ids, whole.values)

    monkeypatch.setattr(batches_mod, "ShardDataset", InMemoryDataset)
    whole = train_mod.pretrain(shards, tmp_path / "whole", TINY_MODEL, train)
    assert lazy == whole
    a = torch.load(tmp_path / "lazy/last_checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "whole/last_checkpoint.pt", weights_only=True)
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["epochs"] == b["epochs"]
