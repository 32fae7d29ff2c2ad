"""Tokens on disk: ragged HDF5 shards, checked against their manifest, read whole or lazily.

Shards store the token sequences (``scllm.tokens``) ragged, CSR-like, so padding is decided per
batch at training time:

    offsets    int64 [n_cells + 1]   cell i spans tokens offsets[i]:offsets[i+1]
    gene_ids   int32 [n_tokens]      first token of every cell is <cls>
    values     int16 [n_tokens]      bins 1..n_bins-1; <cls> carries CLS_VALUE
    cell_index int64 [n_cells]       row of the cell in the binned h5ad
    attrs: n_genes, n_bins, cls_id, pad_id, cls_value, pad_value, mask_value, vocab_sha256, split

``manifest.json`` lists every shard with its cell and token counts and its sha256; readers check
all three (``read_listed_shard``) and the arrays themselves (``check_shard``) before use.
``ShardDataset`` holds one split's cells and reads their tokens from the shards on demand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from scllm.checks import file_sha256
from scllm.errors import CorruptArtifactError
from scllm.files import atomic_path
from scllm.tokens import CLS_VALUE, RETOKENIZE, read_json, read_vocab, vocab_sha256

SHARD_FORMAT_VERSION = 1


@dataclass
class Shard:
    """One shard held in memory (they are small: a few hundred MB at most).

    Attributes
    ----------
    offsets : numpy.ndarray
        int64, n_cells + 1: cell i spans tokens ``offsets[i]:offsets[i+1]``.
    gene_ids, values : numpy.ndarray
        The tokens' gene ids (int32) and values (int16), every cell starting with ``<cls>``.
    cell_index : numpy.ndarray
        int64, the row of each cell in the binned h5ad.
    attrs : dict
        The shard's HDF5 attributes (n_genes, n_bins, cls_id, ...).
    """

    offsets: np.ndarray
    gene_ids: np.ndarray
    values: np.ndarray
    cell_index: np.ndarray
    attrs: dict

    @property
    def n_cells(self) -> int:
        """The number of cells."""
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per cell (``<cls>`` included)."""
        return np.diff(self.offsets)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell ``i``'s tokens.

        Parameters
        ----------
        i : int
            The cell's position in the shard.

        Returns
        -------
        tuple of numpy.ndarray
            (gene ids, values).
        """
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.gene_ids[start:stop], self.values[start:stop]


def write_shard(path, offsets, gene_ids, values, cell_index, attrs: dict) -> None:
    """Write one shard atomically. No timestamps are stored, so equal inputs give equal bytes.

    Parameters
    ----------
    path : str or Path
        The shard file.
    offsets, gene_ids, values, cell_index : array_like
        The datasets (stored as int64, int32, int16 and int64), laid out as ``Shard`` describes.
    attrs : dict
        The HDF5 attributes (n_genes, n_bins, cls_id, ...); ``format_version`` is added.
    """
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
    """Read a shard and check its structure (``check_shard``).

    Parameters
    ----------
    path : str or Path
        The shard file.

    Returns
    -------
    Shard

    Raises
    ------
    CorruptArtifactError
        The file is truncated, not a shard, or its arrays are damaged (the message names it).
    """
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
    """What is wrong with a shard's arrays, or None.

    Everything the model would trust: offsets start at 0, grow by at least one token per cell
    (its <cls>) and end at the token count; every cell starts with <cls>; gene ids lie in the
    vocabulary and values in the bin range. Vectorised: about as fast as reading the arrays.

    Parameters
    ----------
    shard : Shard
        The arrays and attributes to check.
    first_cell : int, default 0
        Where ``shard`` starts when it is one block of a larger shard (``ShardReader.check``), so
        messages name the cell's number in the file.

    Returns
    -------
    str or None
        The first problem found, or None for a sound shard.
    """
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
    """A shard listed in a manifest, checked against it.

    The checks: the file's sha256 (catches any changed byte, also where the arrays stay
    plausible), its arrays, its cell and token counts, and its vocabulary.

    Parameters
    ----------
    shards_dir : str or Path
        The shards folder (entry paths are relative to it).
    manifest : dict
        The folder's manifest.json.
    entry : dict
        The shard's entry in the manifest.

    Returns
    -------
    Shard

    Raises
    ------
    CorruptArtifactError
        The manifest records no sha256, or the file fails a check.
    """
    path = _check_listed_file(shards_dir, entry)
    shard = read_shard(path)
    _check_against_manifest(
        path, shard.n_cells, len(shard.gene_ids), shard.attrs, shards_dir, manifest, entry
    )
    return shard


def open_listed_shard(shards_dir: str | Path, manifest: dict, entry: dict) -> ShardReader:
    """``read_listed_shard`` without holding the shard in memory.

    The same checks (sha256, arrays, counts, vocabulary), done block by block, and a
    ``ShardReader`` that reads cells on demand.

    Parameters
    ----------
    shards_dir : str or Path
        The shards folder.
    manifest, entry : dict
        The manifest and the shard's entry, as for ``read_listed_shard``.

    Returns
    -------
    ShardReader

    Raises
    ------
    CorruptArtifactError
        As for ``read_listed_shard``.
    """
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
    """One shard file, read on demand: a cell's tokens come from disk when asked for.

    Memory therefore does not grow with the shard. write_shard stores every dataset contiguously
    and uncompressed (h5py's default), so a slice of one is a plain byte range of the file: it is
    read with one ``pread`` at the offset HDF5 reports, with no HDF5 call, no lock and no mapping
    (pages read through an ``mmap`` would stay in the process's resident memory for the whole
    epoch). A dataset stored otherwise (chunked or compressed, e.g. after ``h5repack``) is read
    through h5py instead, which is slower but the same. Opening it checks only that the datasets
    exist; ``check`` checks the arrays.

    Parameters
    ----------
    path : str or Path
        The shard file.

    Attributes
    ----------
    attrs : dict
        The shard's HDF5 attributes.
    n_cells, n_tokens : int
        Cells, and tokens of all cells.

    Raises
    ------
    CorruptArtifactError
        The file is truncated or not a shard.
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
        """Elements ``start:stop`` of a dataset; read-only.

        Parameters
        ----------
        name : str
            One of SHARD_DATASETS.
        start, stop : int
            The elements, ``0 <= start <= stop <=`` the dataset's length.

        Returns
        -------
        numpy.ndarray

        Raises
        ------
        CorruptArtifactError
            The file ends early.
        """
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
        """The cells' token offsets, all n_cells + 1 of them.

        Returns
        -------
        numpy.ndarray
        """
        return self.read("offsets", 0, self.n_cells + 1)

    def cell(self, i: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell ``i``'s (gene ids, values).

        Three preads; this runs for every cell of every batch, hence the plain-Python fast path.

        Parameters
        ----------
        i : int
            The cell's position in the shard.
        length : int
            Its token count (from the offsets).

        Returns
        -------
        tuple of numpy.ndarray
            (gene ids, values).

        Raises
        ------
        CorruptArtifactError
            The file ends early.
        """
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
        """``check_shard`` over the whole file, a block of tokens at a time.

        Parameters
        ----------
        block_tokens : int, default 2**22
            About how many tokens to read a block (at least one cell).

        Returns
        -------
        str or None
            The first problem found, or None for a sound shard.
        """
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
        """Close the file (also done when the reader is deleted)."""
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
    """A shards folder's manifest.json, refused as damaged (as ``read_json``) unless an object.

    Parameters
    ----------
    path : str or Path
        The manifest file.

    Returns
    -------
    dict
    """
    return read_json(path)


class ShardDataset:
    """All cells of one split of a shard manifest, in manifest order, read from the shards.

    Only the cells' lengths (2 bytes a cell) stay in memory: they are all the length-grouped
    sampler needs. ``cells(indices)`` reads a batch's tokens from the shard files when the batch is
    made (``ShardReader``), so a training process's memory does not grow with the corpus. Every
    shard is checked against the manifest (sha256, arrays, counts, vocabulary) when it is opened,
    a block at a time.

    Parameters
    ----------
    manifest_path : str or Path
        The manifest.json of a shards folder (vocab.json lies beside it).
    split : str
        The split, e.g. "train" or "val".

    Attributes
    ----------
    manifest : dict
        The manifest.
    lengths : numpy.ndarray
        Every cell's token count.

    Raises
    ------
    ValueError
        The manifest has no such split.
    CorruptArtifactError
        The vocabulary or a shard does not match the manifest.
    """

    def __init__(self, manifest_path: str | Path, split: str):
        manifest_path = Path(manifest_path)
        self.manifest = manifest = read_manifest(manifest_path)
        if split not in manifest.get("splits", {}):
            raise ValueError(
                f"{manifest_path} has no split {split!r} "
                f"(has {sorted(manifest.get('splits', {}))})"
            )
        check_vocab(manifest, manifest_path.parent / "vocab.json", manifest_path)
        self.split = split
        self.shards = [
            open_listed_shard(manifest_path.parent, manifest, entry)
            for entry in manifest["splits"][split]
        ]
        # cell i of the split is cell i - first_cell[k] of shard k
        self.first_cell = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([s.n_cells for s in self.shards], out=self.first_cell[1:])
        # A cell has at most n_genes + 1 tokens: int16 (2 bytes a cell) unless the vocabulary is
        # huge.
        dtype = np.int16 if int(manifest["n_genes"]) < np.iinfo(np.int16).max else np.int32
        self.lengths = np.empty(
            self.first_cell[-1], dtype=dtype
        )  # filled in place: no second copy
        for shard, start in zip(self.shards, self.first_cell):
            self.lengths[start : start + shard.n_cells] = np.diff(shard.offsets())

    def __len__(self) -> int:
        return len(self.lengths)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell ``i``'s (gene ids, values).

        Parameters
        ----------
        i : int
            The cell's position in the split.

        Returns
        -------
        tuple of numpy.ndarray
        """
        return self.cells([i])[0]

    def cells(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        """(gene ids, values) of each cell, read from its shard.

        Parameters
        ----------
        indices : array_like of int
            Positions in the split.

        Returns
        -------
        list of tuple of numpy.ndarray

        Raises
        ------
        IndexError
            An index outside the split.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"cell indices must lie in 0..{len(self) - 1} (split {self.split!r})")
        shard = np.searchsorted(self.first_cell, indices, side="right") - 1
        local = (indices - self.first_cell[shard]).tolist()  # plain ints: this runs for every cell
        return [
            self.shards[k].cell(i, n)
            for k, i, n in zip(shard.tolist(), local, self.lengths[indices].tolist())
        ]

    def close(self) -> None:
        """Close every shard file."""
        for shard in self.shards:
            shard.close()


def check_vocab(manifest: dict, vocab_path: Path, manifest_path) -> dict[str, int]:
    """Read vocab.json next to the manifest and make sure it is the one the shards were built with.

    Parameters
    ----------
    manifest : dict
        The manifest.
    vocab_path : Path
        Its vocab.json.
    manifest_path : str or Path
        The manifest's path, for the messages.

    Returns
    -------
    dict of str to int
        The vocabulary.

    Raises
    ------
    CorruptArtifactError
        The vocabulary's sha256 or size differ from the manifest's.
    """
    vocab = read_vocab(vocab_path)
    actual = vocab_sha256(vocab)
    if actual != manifest["vocab_sha256"]:
        raise CorruptArtifactError(
            f"vocabulary mismatch: {vocab_path} has sha256 {actual} but {manifest_path} records "
            f"{manifest['vocab_sha256']}. vocab.json and the shards come from different runs. "
            + RETOKENIZE
        )
    if len(vocab) != manifest["vocab_size"]:
        raise CorruptArtifactError(
            f"{vocab_path} has {len(vocab)} entries but {manifest_path} says "
            f"vocab_size={manifest['vocab_size']}. " + RETOKENIZE
        )
    return vocab
