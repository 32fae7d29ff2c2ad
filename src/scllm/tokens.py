"""Token sequences and their on-disk form: ragged HDF5 shards, vocab.json and a manifest.

A cell becomes ``<cls>`` followed by its non-zero highly variable genes, each token a
(gene id, bin) pair. Gene ids 0..G-1 follow the vocabulary order, ``<cls>`` = G, ``<pad>`` = G+1.
Shards store the sequences ragged, CSR-like, so padding is decided per batch at training time:

    offsets    int64 [n_cells + 1]   cell i spans tokens offsets[i]:offsets[i+1]
    gene_ids   int32 [n_tokens]      first token of every cell is <cls>
    values     int16 [n_tokens]      bins 1..n_bins-1; <cls> carries CLS_VALUE
    cell_index int64 [n_cells]       row of the cell in the binned h5ad
    attrs: n_genes, n_bins, cls_id, pad_id, cls_value, pad_value, mask_value, vocab_sha256, split

``manifest.json`` lists every shard with its cell and token counts and its sha256; readers check
all three (``read_listed_shard``) and the arrays themselves (``check_shard``) before use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from scllm.checks import file_sha256
from scllm.errors import CorruptArtifactError
from scllm.files import atomic_path
from scllm.h5ad import open_backed, read_rows, row_chunks
from scllm.prep.split import read_split

log = logging.getLogger("scllm")

CLS_TOKEN = "<cls>"
PAD_TOKEN = "<pad>"
CLS_VALUE = 0
PAD_VALUE = -2
MASK_VALUE = -1
SHARD_FORMAT_VERSION = 1
# The fix for any damaged or mismatched shard artifact. Deleting a file inside shards/ is not
# enough: Snakemake does not rerun a rule whose output directory still exists.
RETOKENIZE = (
    "Rewrite the shards with `snakemake --forcerun tokenize_shards` (plus your usual --cores, "
    "--configfile or --profile options), which also reruns what depends on them; deleting a file "
    "inside the shards folder is not enough, since Snakemake does not rerun a rule whose output "
    "folder exists."
)


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
    return {k: int(v) for k, v in read_json(path).items()}


def read_json(path: str | Path) -> dict:
    """A JSON file written by tokenize_shards (or copied by pretrain), with a clear error if
    damaged."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        data = err
    if not isinstance(data, dict):
        raise CorruptArtifactError(
            f"cannot read {path}: "
            f"{data if isinstance(data, Exception) else 'not a JSON object'}. "
            "The file is truncated or damaged. In a shards folder: "
            + RETOKENIZE
            + " In a model directory: delete the file "
            "and rerun snakemake (pretrain rewrites its missing outputs)."
        )
    return data


def sequences_from_binned(
    binned: sp.csr_matrix, cls_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    """Read a shard and check its structure (``check_shard``): a damaged one is refused, naming
    the file."""
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
                attrs={
                    k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()
                },
            )
    except (OSError, ValueError, KeyError) as err:
        raise CorruptArtifactError(
            f"cannot read shard {path}: {err}. The file is truncated or not a shard. " + RETOKENIZE
        ) from err
    problem = check_shard(shard)
    if problem:
        raise CorruptArtifactError(f"shard {path} is damaged: {problem}. " + RETOKENIZE)
    return shard


def check_shard(shard: Shard, first_cell: int = 0) -> str | None:
    """What is wrong with a shard's arrays, or None. Everything the model would trust: offsets
    start at 0, grow by at least one token per cell (its <cls>) and end at the token count; every
    cell starts with <cls>; gene ids lie in the vocabulary and values in the bin range. Vectorised:
    about as fast as reading the arrays. ``first_cell``: where ``shard`` starts when it is one
    block of a larger shard (``ShardReader.check``), so messages name the cell's number in the
    file."""
    attrs = shard.attrs
    missing = [k for k in ("n_genes", "n_bins", "cls_id") if k not in attrs]
    if missing:
        return f"attributes {missing} are missing"
    n_genes, n_bins, cls_id = int(attrs["n_genes"]), int(attrs["n_bins"]), int(attrs["cls_id"])
    offsets, gene_ids, values = shard.offsets, shard.gene_ids, shard.values
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0:
        return "offsets do not start at 0"
    lengths = np.diff(offsets)
    if lengths.size and lengths.min() < 1:
        return f"offsets decrease or repeat (cell {first_cell + int(np.argmin(lengths))})"
    if offsets[-1] != len(gene_ids) or len(gene_ids) != len(values):
        return (
            f"offsets end at {int(offsets[-1])} but the shard holds {len(gene_ids)} gene ids and "
            f"{len(values)} values"
        )
    if lengths.size and lengths.max() > n_genes + 1:
        return (
            f"cell {first_cell + int(np.argmax(lengths))} has {int(lengths.max())} tokens, "
            f"more than <cls> + {n_genes} genes"
        )
    if len(shard.cell_index) != len(lengths):
        return f"{len(shard.cell_index)} cell_index entries for {len(lengths)} cells"
    if len(shard.cell_index) and shard.cell_index.min() < 0:
        return "cell_index holds negative rows"
    if not lengths.size:
        return None
    first = offsets[:-1]
    cls_value = attrs.get("cls_value", CLS_VALUE)
    if np.any(gene_ids[first] != cls_id) or np.any(values[first] != cls_value):
        return "a cell does not start with the <cls> token"
    # Fast path, no per-token mask: every id in 0..G (<cls> = G) with exactly one <cls> per cell,
    # every value a bin 1..n_bins-1 except the <cls> values (0).
    n_cells = len(first)
    if (
        cls_id == n_genes
        and gene_ids.min() >= 0
        and gene_ids.max() <= cls_id
        and np.count_nonzero(gene_ids == cls_id) == n_cells
        and values.min() >= min(1, cls_value)
        and values.max() <= max(n_bins - 1, cls_value)
        and (1 <= cls_value <= n_bins - 1 or np.count_nonzero(values == cls_value) == n_cells)
    ):
        return None
    is_gene = np.ones(len(gene_ids), dtype=bool)
    is_gene[first] = False
    genes, bins = gene_ids[is_gene], values[is_gene]
    if genes.size and (genes.min() < 0 or genes.max() >= n_genes):
        return (
            f"gene ids outside the vocabulary 0..{n_genes - 1} "
            f"(e.g. {genes[(genes < 0) | (genes >= n_genes)][:3].tolist()})"
        )
    if bins.size and (bins.min() < 1 or bins.max() > n_bins - 1):
        return (
            f"values outside the bins 1..{n_bins - 1} "
            f"(e.g. {bins[(bins < 1) | (bins > n_bins - 1)][:3].tolist()})"
        )
    return None


def read_listed_shard(shards_dir: str | Path, manifest: dict, entry: dict) -> Shard:
    """A shard listed in a manifest, checked against it: the file's sha256 (catches any changed
    byte, also where the arrays stay plausible), its cell and token counts, and its vocabulary."""
    path = _check_listed_file(shards_dir, entry)
    shard = read_shard(path)
    _check_against_manifest(
        path, shard.n_cells, len(shard.gene_ids), shard.attrs, shards_dir, manifest, entry
    )
    return shard


def open_listed_shard(shards_dir: str | Path, manifest: dict, entry: dict) -> ShardReader:
    """``read_listed_shard`` without holding the shard in memory: the same checks (sha256, arrays,
    counts, vocabulary), done block by block, and a ``ShardReader`` that reads cells on demand."""
    path = _check_listed_file(shards_dir, entry)
    reader = ShardReader(path)
    problem = reader.check()
    if problem:
        raise CorruptArtifactError(f"shard {path} is damaged: {problem}. " + RETOKENIZE)
    _check_against_manifest(
        path, reader.n_cells, reader.n_tokens, reader.attrs, shards_dir, manifest, entry
    )
    return reader


def _check_listed_file(shards_dir, entry: dict) -> Path:
    """The shard's path, once its bytes match the sha256 its manifest entry recorded."""
    path = Path(shards_dir) / entry["path"]
    expected = entry.get("sha256")
    if expected is None:
        raise CorruptArtifactError(
            f"{Path(shards_dir) / 'manifest.json'} records no sha256 for {entry['path']} "
            "(written by an older version), so the shard cannot be checked. " + RETOKENIZE
        )
    if path.exists():
        actual = file_sha256(path)
        if actual != expected:
            raise CorruptArtifactError(
                f"shard {path} has sha256 {actual}, but the manifest recorded {expected} "
                "when tokenize_shards wrote it: the file was changed or damaged since. "
                + RETOKENIZE
            )
    return path


def _check_against_manifest(path, n_cells, n_tokens, attrs, shards_dir, manifest, entry) -> None:
    counts = {"n_cells": n_cells, "n_tokens": n_tokens}
    differ = [
        f"{k} {v} (manifest: {entry[k]})"
        for k, v in counts.items()
        if k in entry and entry[k] != v
    ]
    differ += [
        f"{k} {attrs.get(k)} (manifest: {manifest[k]})"
        for k in ("n_genes", "n_bins", "cls_id")
        if k in manifest and attrs.get(k) != manifest[k]
    ]
    if differ:
        raise CorruptArtifactError(
            f"shard {path} does not match {Path(shards_dir) / 'manifest.json'}: "
            f"{', '.join(differ)}. " + RETOKENIZE
        )
    if attrs.get("vocab_sha256", manifest["vocab_sha256"]) != manifest["vocab_sha256"]:
        raise CorruptArtifactError(
            f"shard {entry['path']} has vocab_sha256 {attrs['vocab_sha256']} but the manifest in "
            f"{shards_dir} has {manifest['vocab_sha256']}; the shards come from different runs. "
            + RETOKENIZE
        )


SHARD_DATASETS = ("offsets", "gene_ids", "values", "cell_index")


class ShardReader:
    """One shard file, read on demand: a cell's tokens come from disk when asked for, so memory
    does not grow with the shard.

    write_shard stores every dataset contiguously and uncompressed (h5py's default), so a slice of
    one is a plain byte range of the file: it is read with one ``pread`` at the offset HDF5
    reports, with no HDF5 call, no lock and no mapping (pages read through an ``mmap`` would stay
    in the process's resident memory for the whole epoch). A dataset stored otherwise (chunked or
    compressed, e.g. after ``h5repack``) is read through h5py instead, which is slower but the
    same.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                missing = set(SHARD_DATASETS) - set(f.keys())
                if missing:
                    raise ValueError(f"missing datasets {sorted(missing)}")
                if any(f[name].ndim != 1 for name in SHARD_DATASETS):
                    raise ValueError("its datasets are not one-dimensional")
                self.attrs = {
                    k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()
                }
                self.n_cells = len(f["offsets"]) - 1
                self.n_tokens = len(f["gene_ids"])
                self.lengths_stored = {name: len(f[name]) for name in SHARD_DATASETS}
                # name -> (byte offset in the file, dtype), or None where only h5py can read it
                self._layout = {name: _byte_range(f[name]) for name in SHARD_DATASETS}
        except (OSError, ValueError, KeyError) as err:
            raise CorruptArtifactError(
                f"cannot read shard {path}: {err}. The file is truncated or not a shard. "
                + RETOKENIZE
            ) from err
        self._fd = os.open(self.path, os.O_RDONLY)
        self._h5 = h5py.File(self.path, "r") if None in self._layout.values() else None

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``start:stop`` of a dataset (0 <= start <= stop <= its length); read-only."""
        layout = self._layout[name]
        if layout is None:
            return self._h5[name][start:stop]
        offset, dtype = layout
        size = (stop - start) * dtype.itemsize
        data = os.pread(self._fd, size, offset + start * dtype.itemsize)
        if len(data) != size:  # a regular file returns all at once unless it ends early
            raise CorruptArtifactError(
                f"shard {self.path} ended early (reading {name}). " + RETOKENIZE
            )
        return np.frombuffer(data, dtype=dtype)  # no copy: the array uses the bytes pread returned

    def offsets(self) -> np.ndarray:
        return self.read("offsets", 0, self.n_cells + 1)

    def cell(self, i: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell ``i``'s (gene ids, values); ``length`` is its token count (from the offsets).
        Three preads; this runs for every cell of every batch, hence the plain-Python fast path."""
        fd, layout = self._fd, self._layout
        if layout["offsets"] is None or layout["gene_ids"] is None or layout["values"] is None:
            start = int(self.read("offsets", i, i + 1)[0])
            return self.read("gene_ids", start, start + length), self.read(
                "values", start, start + length
            )
        (o_at, _), (g_at, g_type), (v_at, v_type) = (
            layout["offsets"],
            layout["gene_ids"],
            layout["values"],
        )
        start = int.from_bytes(
            os.pread(fd, 8, o_at + 8 * i), "little", signed=True
        )  # "<i8" (_byte_range)
        genes = os.pread(fd, length * g_type.itemsize, g_at + start * g_type.itemsize)
        values = os.pread(fd, length * v_type.itemsize, v_at + start * v_type.itemsize)
        if len(genes) != length * g_type.itemsize or len(values) != length * v_type.itemsize:
            raise CorruptArtifactError(
                f"shard {self.path} ended early (reading cell {i}). " + RETOKENIZE
            )
        return np.frombuffer(genes, dtype=g_type), np.frombuffer(values, dtype=v_type)

    def check(self, block_tokens: int = 1 << 22) -> str | None:
        """``check_shard`` over the whole file, reading about ``block_tokens`` tokens at a time."""
        stored = self.lengths_stored
        empty = np.zeros(0, dtype=np.int64)
        problem = check_shard(
            Shard(np.zeros(1, dtype=np.int64), empty, empty, empty, self.attrs)
        )  # attributes
        if problem or stored["offsets"] < 1:
            return problem or "offsets do not start at 0"
        offsets = self.offsets()
        if offsets[0] != 0:
            return "offsets do not start at 0"
        if offsets[-1] != stored["gene_ids"] or stored["gene_ids"] != stored["values"]:
            return (
                f"offsets end at {int(offsets[-1])} but the shard holds "
                f"{stored['gene_ids']} gene ids and {stored['values']} values"
            )
        if stored["cell_index"] != self.n_cells:
            return f"{stored['cell_index']} cell_index entries for {self.n_cells} cells"
        if np.any(np.diff(offsets) < 1):  # before the blocks: their token ranges must be valid
            return f"offsets decrease or repeat (cell {int(np.argmin(np.diff(offsets)))})"
        first = 0
        while first < self.n_cells:
            # the cells whose tokens start within the next block_tokens (at least one cell)
            last = max(
                first + 1,
                int(np.searchsorted(offsets, offsets[first] + block_tokens, side="right")) - 1,
            )
            last = min(last, self.n_cells)
            a, b = int(offsets[first]), int(offsets[last])
            block = Shard(
                offsets[first : last + 1] - a,
                self.read("gene_ids", a, b),
                self.read("values", a, b),
                self.read("cell_index", first, last),
                self.attrs,
            )
            problem = check_shard(block, first_cell=first)
            if problem:
                return problem
            first = last
        return None

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_h5", None) is not None:
            self._h5.close()
            self._h5 = None

    def __del__(self):
        self.close()


def _byte_range(dataset: h5py.Dataset):
    """(byte offset, dtype) of a dataset stored as one contiguous uncompressed block, else None."""
    offset = dataset.id.get_offset()
    if dataset.chunks is not None or dataset.compression is not None or offset is None:
        return None
    if dataset.name == "/offsets" and dataset.dtype != np.dtype(
        "<i8"
    ):  # cell() reads them as int64
        return None
    return offset, dataset.dtype


def read_manifest(path: str | Path) -> dict:
    return read_json(path)


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
    binned_h5ad, split_tsv, out_dir, *, cells_per_shard: int = 100_000, chunk_size: int = 20_000
) -> dict:
    """Write ragged token shards per split, ``vocab.json``, ``genes.tsv`` and ``manifest.json``."""
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
