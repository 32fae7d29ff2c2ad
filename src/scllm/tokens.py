"""Token sequences and their on-disk form: ragged HDF5 shards, vocab.json and a manifest.

A cell becomes ``<cls>`` followed by its non-zero highly variable genes, each token a
(gene id, bin) pair. Gene ids 0..G-1 follow the vocabulary order, ``<cls>`` = G, ``<pad>`` = G+1.
Shards store the sequences ragged, CSR-like, so padding is decided per batch at training time:

    offsets    int64 [n_cells + 1]   cell i spans tokens offsets[i]:offsets[i+1]
    gene_ids   int32 [n_tokens]      first token of every cell is <cls>
    values     int16 [n_tokens]      bins 1..n_bins-1; <cls> carries CLS_VALUE
    cell_index int64 [n_cells]       row of the cell in the binned h5ad
    attrs: n_genes, n_bins, cls_id, pad_id, cls_value, pad_value, mask_value, vocab_sha256, split
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from scllm.io import atomic_path, open_backed, read_rows, row_chunks
from scllm.split import read_split

log = logging.getLogger("scllm")

CLS_TOKEN = "<cls>"
PAD_TOKEN = "<pad>"
CLS_VALUE = 0
PAD_VALUE = -2
MASK_VALUE = -1
SHARD_FORMAT_VERSION = 1


def build_vocab(feature_ids: list[str]) -> dict[str, int]:
    """Gene token ids in the given (HVG rank) order, then ``<cls>`` and ``<pad>``."""
    if len(set(feature_ids)) != len(feature_ids):
        raise ValueError("feature_ids must be unique to form a vocabulary")
    vocab = {gene: i for i, gene in enumerate(feature_ids)}
    vocab[CLS_TOKEN] = len(feature_ids)
    vocab[PAD_TOKEN] = len(feature_ids) + 1
    return vocab


def vocab_sha256(vocab: dict[str, int]) -> str:
    """A fingerprint of the vocabulary, stored in shards and models to catch mismatches."""
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_vocab(vocab: dict[str, int], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(vocab, indent=1) + "\n")


def read_vocab(path: str | Path) -> dict[str, int]:
    return {k: int(v) for k, v in _read_json(path).items()}


def _read_json(path: str | Path) -> dict:
    """A JSON file written by tokenize_shards (or copied by pretrain), with a clear error if damaged."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"cannot read {path}: {err}. The file is truncated or damaged; delete it and rerun the rule "
            "that writes it (tokenize_shards for shards/, pretrain for a model directory)."
        ) from err


def sequences_from_binned(binned: sp.csr_matrix, cls_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ragged token arrays for a block of binned cells (cells x genes in vocabulary order).

    Returns (offsets, gene_ids, values) with one ``<cls>`` token prepended to every cell.
    """
    binned = sp.csr_matrix(binned, copy=True)  # sorted and pruned below: leave the caller's intact
    binned.sort_indices()
    binned.eliminate_zeros()
    n_cells = binned.shape[0]
    lengths = np.diff(binned.indptr) + 1
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    gene_ids = np.empty(offsets[-1], dtype=np.int32)
    values = np.empty(offsets[-1], dtype=np.int16)
    cls_pos = offsets[:-1]
    gene_ids[cls_pos] = cls_id
    values[cls_pos] = CLS_VALUE
    is_gene = np.ones(offsets[-1], dtype=bool)
    is_gene[cls_pos] = False
    gene_ids[is_gene] = binned.indices
    values[is_gene] = binned.data
    return offsets, gene_ids, values


@dataclass
class Shard:
    """One shard held in memory (they are small: a few hundred MB at most)."""

    offsets: np.ndarray
    gene_ids: np.ndarray
    values: np.ndarray
    cell_index: np.ndarray
    attrs: dict

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.gene_ids[start:stop], self.values[start:stop]


def write_shard(path, offsets, gene_ids, values, cell_index, attrs: dict) -> None:
    """Write one shard atomically. No timestamps are stored, so equal inputs give equal bytes."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for name, data in (
            ("offsets", np.asarray(offsets, dtype=np.int64)),
            ("gene_ids", np.asarray(gene_ids, dtype=np.int32)),
            ("values", np.asarray(values, dtype=np.int16)),
            ("cell_index", np.asarray(cell_index, dtype=np.int64)),
        ):
            f.create_dataset(name, data=data, track_times=False)
        f.attrs["format_version"] = SHARD_FORMAT_VERSION
        for key, value in attrs.items():
            f.attrs[key] = value


def read_shard(path: str | Path) -> Shard:
    try:
        with h5py.File(path, "r") as f:
            missing = {"offsets", "gene_ids", "values", "cell_index"} - set(f.keys())
            if missing:
                raise ValueError(f"missing datasets {sorted(missing)}")
            shard = Shard(
                offsets=f["offsets"][:],
                gene_ids=f["gene_ids"][:],
                values=f["values"][:],
                cell_index=f["cell_index"][:],
                attrs={k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()},
            )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"cannot read shard {path}: {err}. The file is truncated or not a shard; "
            "delete it and rerun the tokenize_shards rule."
        ) from err
    if shard.offsets[-1] != len(shard.gene_ids) or len(shard.gene_ids) != len(shard.values):
        raise ValueError(f"shard {path} is inconsistent (offsets do not match token arrays); rerun tokenize_shards")
    return shard


def read_listed_shard(shards_dir: str | Path, manifest: dict, entry: dict) -> Shard:
    """A shard listed in a manifest, checked to share the manifest's vocabulary."""
    shard = read_shard(Path(shards_dir) / entry["path"])
    if shard.attrs.get("vocab_sha256", manifest["vocab_sha256"]) != manifest["vocab_sha256"]:
        raise ValueError(
            f"shard {entry['path']} has vocab_sha256 {shard.attrs['vocab_sha256']} but the manifest in "
            f"{shards_dir} has {manifest['vocab_sha256']}; the shards come from different runs: "
            "rerun tokenize_shards"
        )
    return shard


def read_manifest(path: str | Path) -> dict:
    return _read_json(path)


class _ShardBuffer:
    """Collects one split's sequences and flushes a shard file every ``cells_per_shard`` cells."""

    def __init__(self, out_dir: Path, split: str, cells_per_shard: int, attrs: dict):
        self.out_dir, self.split, self.cells_per_shard, self.attrs = out_dir, split, cells_per_shard, attrs
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_buffered = 0
        self.shards: list[dict] = []

    def add(self, offsets, gene_ids, values, cell_index) -> None:
        lengths = np.diff(offsets)
        start_cell = 0
        while start_cell < len(lengths):
            take = min(self.cells_per_shard - self.n_buffered, len(lengths) - start_cell)
            a, b = offsets[start_cell], offsets[start_cell + take]
            self.parts.append((lengths[start_cell:start_cell + take], gene_ids[a:b], values[a:b],
                               cell_index[start_cell:start_cell + take]))
            self.n_buffered += take
            start_cell += take
            if self.n_buffered == self.cells_per_shard:
                self.flush()

    def flush(self) -> None:
        if not self.n_buffered:
            return
        lengths = np.concatenate([p[0] for p in self.parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rel = f"{self.split}/shard_{len(self.shards):05d}.h5"
        write_shard(
            self.out_dir / rel, offsets,
            np.concatenate([p[1] for p in self.parts]), np.concatenate([p[2] for p in self.parts]),
            np.concatenate([p[3] for p in self.parts]), {**self.attrs, "split": self.split},
        )
        self.shards.append({"path": rel, "n_cells": int(len(lengths)), "n_tokens": int(offsets[-1]),
                            "max_len": int(lengths.max())})
        self.parts, self.n_buffered = [], 0


def tokenize_shards(binned_h5ad, split_tsv, out_dir, *, cells_per_shard: int = 100_000, chunk_size: int = 20_000) -> dict:
    """Write ragged token shards per split, ``vocab.json``, ``genes.tsv`` and ``manifest.json``."""
    t0 = time.time()
    adata = open_backed(binned_h5ad)
    split = read_split(split_tsv)
    if len(split) != adata.n_obs or not np.array_equal(split["cell"].to_numpy(), adata.obs_names.to_numpy()):
        raise ValueError(f"{split_tsv} does not list the cells of {binned_h5ad} in order; rerun the split rule")
    n_bins = int(adata.uns["binning"]["n_bins"])
    genes = adata.var[["feature_id", "feature_name"]].reset_index(drop=True)
    vocab = build_vocab(genes["feature_id"].tolist())
    n_genes = len(genes)
    attrs = {"n_genes": n_genes, "n_bins": n_bins, "cls_id": vocab[CLS_TOKEN], "pad_id": vocab[PAD_TOKEN],
             "cls_value": CLS_VALUE, "pad_value": PAD_VALUE, "mask_value": MASK_VALUE,
             "vocab_sha256": vocab_sha256(vocab)}
    labels = split["split"].to_numpy()
    with atomic_path(out_dir) as tmp:
        tmp = Path(tmp)
        tmp.mkdir()
        buffers = {name: _ShardBuffer(tmp, name, cells_per_shard, attrs) for name in sorted(set(labels))}
        for start, stop in row_chunks(adata.n_obs, chunk_size):
            offsets, gene_ids, values = sequences_from_binned(read_rows(adata, start, stop), attrs["cls_id"])
            for name, buffer in buffers.items():
                rows = np.flatnonzero(labels[start:stop] == name)
                if rows.size:
                    sub_offsets, sub_genes, sub_values = _take_cells(offsets, gene_ids, values, rows)
                    buffer.add(sub_offsets, sub_genes, sub_values, rows + start)
            log.info("tokenize_shards: %d/%d cells", stop, adata.n_obs)
        for buffer in buffers.values():
            buffer.flush()
        write_vocab(vocab, tmp / "vocab.json")
        genes.assign(token_id=np.arange(n_genes)).to_csv(tmp / "genes.tsv", sep="\t", index=False)
        manifest = {
            **attrs, "vocab_size": n_genes + 2, "format_version": SHARD_FORMAT_VERSION,
            # how values were binned, so a model's users can bin new cells the same way
            "binning": {k: (v.item() if hasattr(v, "item") else v) for k, v in adata.uns["binning"].items()},
            "max_seq_len": max((s["max_len"] for b in buffers.values() for s in b.shards), default=1),
            "splits": {name: b.shards for name, b in buffers.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    adata.file.close()
    summary = {name: (sum(s["n_cells"] for s in shards), sum(s["n_tokens"] for s in shards), len(shards))
               for name, shards in manifest["splits"].items()}
    for name, (cells, tokens, n_shards) in summary.items():
        log.info("tokenize_shards: %s: %d cells, %d tokens (mean length %.0f) in %d shard(s)",
                 name, cells, tokens, tokens / max(cells, 1), n_shards)
    log.info("tokenize_shards: vocabulary %d genes + <cls> + <pad>, max length %d, %.1fs",
             n_genes, manifest["max_seq_len"], time.time() - t0)
    return manifest


def _take_cells(offsets, gene_ids, values, rows):
    """The ragged sub-arrays of the selected cells (rows ascending)."""
    lengths = np.diff(offsets)[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    token_idx = np.repeat(offsets[:-1][rows] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return new_offsets, gene_ids[token_idx], values[token_idx]
