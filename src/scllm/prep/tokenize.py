"""Rule tokenize_shards: the binned cells as token sequences in ragged shards per split, with
``vocab.json``, ``genes.tsv`` and ``manifest.json`` (the layout: ``scllm.shards``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from scllm.checks import file_sha256
from scllm.config import CHUNK_SIZE
from scllm.errors import CorruptArtifactError
from scllm.files import atomic_path
from scllm.h5ad import open_backed, read_rows, row_chunks
from scllm.prep.split import read_split
from scllm.shards import SHARD_FORMAT_VERSION, write_shard
from scllm.tokens import (
    CLS_TOKEN,
    CLS_VALUE,
    MASK_VALUE,
    PAD_TOKEN,
    PAD_VALUE,
    build_vocab,
    sequences_from_binned,
    vocab_sha256,
    write_vocab,
)

log = logging.getLogger("scllm")


class _ShardBuffer:
    """Collects one split's sequences and flushes a shard file every ``cells_per_shard`` cells."""

    def __init__(self, out_dir: Path, split: str, cells_per_shard: int, attrs: dict):
        self.out_dir, self.split, self.cells_per_shard, self.attrs = (
            out_dir,
            split,
            cells_per_shard,
            attrs,
        )
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_buffered = 0
        self.shards: list[dict] = []

    def add(self, offsets, gene_ids, values, cell_index) -> None:
        lengths = np.diff(offsets)
        start_cell = 0
        while start_cell < len(lengths):
            take = min(self.cells_per_shard - self.n_buffered, len(lengths) - start_cell)
            a, b = offsets[start_cell], offsets[start_cell + take]
            self.parts.append(
                (
                    lengths[start_cell : start_cell + take],
                    gene_ids[a:b],
                    values[a:b],
                    cell_index[start_cell : start_cell + take],
                )
            )
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
            self.out_dir / rel,
            offsets,
            np.concatenate([p[1] for p in self.parts]),
            np.concatenate([p[2] for p in self.parts]),
            np.concatenate([p[3] for p in self.parts]),
            {**self.attrs, "split": self.split},
        )
        self.shards.append(
            {
                "path": rel,
                "n_cells": int(len(lengths)),
                "n_tokens": int(offsets[-1]),
                "max_len": int(lengths.max()),
                "sha256": file_sha256(self.out_dir / rel),
            }
        )
        self.parts, self.n_buffered = [], 0


def tokenize_shards(
    binned_h5ad,
    split_tsv,
    out_dir,
    *,
    cells_per_shard: int = 100_000,
    chunk_size: int = CHUNK_SIZE,
) -> dict:
    """Write ragged token shards per split, ``vocab.json``, ``genes.tsv`` and ``manifest.json``.

    The vocabulary is the binned file's genes in order (``build_vocab``); each split's cells go
    to its own shards, in file order. The folder is written atomically.

    Parameters
    ----------
    binned_h5ad : str or Path
        The binned cells (``normalize_bin``).
    split_tsv : str or Path
        The split table (``split_cells``), listing the same cells in the same order.
    out_dir : str or Path
        The shards folder to write.
    cells_per_shard : int, default 100_000
        Cells a shard file holds at the most.
    chunk_size : int, default CHUNK_SIZE
        Cells read at a time.

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    ValueError
        The split table does not list the file's cells in order.
    CorruptArtifactError
        The binned file holds values that are not bins.
    """
    t0 = time.time()
    adata = open_backed(binned_h5ad)
    split = read_split(split_tsv)
    if len(split) != adata.n_obs or not np.array_equal(
        split["cell"].to_numpy(), adata.obs_names.to_numpy()
    ):
        raise ValueError(
            f"{split_tsv} does not list the cells of {binned_h5ad} in order; rerun the split rule"
        )
    n_bins = int(adata.uns["binning"]["n_bins"])
    genes = adata.var[["feature_id", "feature_name"]].reset_index(drop=True)
    vocab = build_vocab(genes["feature_id"].tolist())
    n_genes = len(genes)
    attrs = {
        "n_genes": n_genes,
        "n_bins": n_bins,
        "cls_id": vocab[CLS_TOKEN],
        "pad_id": vocab[PAD_TOKEN],
        "cls_value": CLS_VALUE,
        "pad_value": PAD_VALUE,
        "mask_value": MASK_VALUE,
        "vocab_sha256": vocab_sha256(vocab),
    }
    labels = split["split"].to_numpy()
    with atomic_path(out_dir) as tmp:
        tmp = Path(tmp)
        tmp.mkdir()
        buffers = {
            name: _ShardBuffer(tmp, name, cells_per_shard, attrs) for name in sorted(set(labels))
        }
        _fill_shards(adata, binned_h5ad, labels, buffers, n_bins, attrs["cls_id"], chunk_size)
        write_vocab(vocab, tmp / "vocab.json")
        genes.assign(token_id=np.arange(n_genes)).to_csv(tmp / "genes.tsv", sep="\t", index=False)
        manifest = {
            **attrs,
            "vocab_size": n_genes + 2,
            "format_version": SHARD_FORMAT_VERSION,
            # how values were binned, so a model's users can bin new cells the same way
            "binning": {
                k: (v.item() if hasattr(v, "item") else v) for k, v in adata.uns["binning"].items()
            },
            "max_seq_len": max(
                (s["max_len"] for b in buffers.values() for s in b.shards), default=1
            ),
            "splits": {name: b.shards for name, b in buffers.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    adata.file.close()
    _log_summary(manifest, n_genes, time.time() - t0)
    return manifest


def _fill_shards(
    adata, binned_h5ad, labels, buffers: dict, n_bins: int, cls_id: int, chunk_size: int
) -> None:
    """Stream the binned cells in row chunks into each split's shard buffer, then flush them."""
    for start, stop in row_chunks(adata.n_obs, chunk_size):
        block = read_rows(adata, start, stop)
        _check_bins(block.data, n_bins, binned_h5ad)
        offsets, gene_ids, values = sequences_from_binned(block, cls_id)
        for name, buffer in buffers.items():
            rows = np.flatnonzero(labels[start:stop] == name)
            if rows.size:
                sub_offsets, sub_genes, sub_values = _take_cells(offsets, gene_ids, values, rows)
                buffer.add(sub_offsets, sub_genes, sub_values, rows + start)
        log.info("tokenize_shards: %d/%d cells", stop, adata.n_obs)
    for buffer in buffers.values():
        buffer.flush()


def _log_summary(manifest: dict, n_genes: int, seconds: float) -> None:
    for name, shards in manifest["splits"].items():
        cells = sum(s["n_cells"] for s in shards)
        tokens = sum(s["n_tokens"] for s in shards)
        log.info(
            "tokenize_shards: %s: %d cells, %d tokens (mean length %.0f) in %d shard(s)",
            name,
            cells,
            tokens,
            tokens / max(cells, 1),
            len(shards),
        )
    log.info(
        "tokenize_shards: vocabulary %d genes + <cls> + <pad>, max length %d, %.1fs",
        n_genes,
        manifest["max_seq_len"],
        seconds,
    )


def _check_bins(data: np.ndarray, n_bins: int, path) -> None:
    """Stored non-zeros of a binned matrix are whole bins 1..n_bins-1: anything else is damage and
    would reach the model as a wrong (or out-of-range) value embedding."""
    if data.size and (data.min() < 1 or data.max() > n_bins - 1 or np.any(np.mod(data, 1) != 0)):
        bad = data[(data < 1) | (data > n_bins - 1) | (np.mod(data, 1) != 0)]
        raise CorruptArtifactError(
            f"{path} holds values that are not bins 1..{n_bins - 1} (e.g. {bad[:3].tolist()}): "
            "the file is damaged or not written by normalize_bin. Delete it and rerun snakemake "
            "(Snakemake reruns a rule whose output file is missing)."
        )


def _take_cells(offsets, gene_ids, values, rows):
    """The ragged sub-arrays of the selected cells (rows ascending)."""
    lengths = np.diff(offsets)[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    token_idx = np.repeat(offsets[:-1][rows] - new_offsets[:-1], lengths) + np.arange(
        new_offsets[-1]
    )
    return new_offsets, gene_ids[token_idx], values[token_idx]
