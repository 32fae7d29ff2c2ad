"""A cell as tokens: the vocabulary, the special tokens and values, token arrays from binned
cells, and cells kept ragged in memory until a batch pads them.

A cell becomes ``<cls>`` followed by its non-zero highly variable genes, each token a
(gene id, bin) pair. Gene ids 0..G-1 follow the vocabulary order, ``<cls>`` = G, ``<pad>`` = G+1.
``<cls>`` carries the value CLS_VALUE, padding PAD_VALUE and masked tokens MASK_VALUE. Padding
belongs to the batch (``collate``): cells are stored and kept ragged, CSR-like.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from scllm.errors import CorruptArtifactError
from scllm.files import atomic_path

if TYPE_CHECKING:
    import torch

CLS_TOKEN = "<cls>"
PAD_TOKEN = "<pad>"
CLS_VALUE = 0
PAD_VALUE = -2
MASK_VALUE = -1
# The fix for any damaged or mismatched shard artifact. Deleting a file inside shards/ is not
# enough: Snakemake does not rerun a rule whose output directory still exists.
RETOKENIZE = (
    "Rewrite the shards with `snakemake --forcerun tokenize_shards` (plus your usual --cores, "
    "--configfile or --profile options), which also reruns what depends on them; deleting a file "
    "inside the shards folder is not enough, since Snakemake does not rerun a rule whose output "
    "folder exists."
)


def build_vocab(feature_ids: list[str]) -> dict[str, int]:
    """Gene token ids in the given (HVG rank) order, then ``<cls>`` and ``<pad>``.

    Parameters
    ----------
    feature_ids : list of str
        The vocabulary's genes (Ensembl ids), in order.

    Returns
    -------
    dict of str to int
        Gene -> 0..G-1, ``<cls>`` -> G, ``<pad>`` -> G+1.

    Raises
    ------
    ValueError
        A gene occurs twice.
    """
    if len(set(feature_ids)) != len(feature_ids):
        raise ValueError("feature_ids must be unique to form a vocabulary")
    vocab = {gene: i for i, gene in enumerate(feature_ids)}
    vocab[CLS_TOKEN] = len(feature_ids)
    vocab[PAD_TOKEN] = len(feature_ids) + 1
    return vocab


def vocab_sha256(vocab: dict[str, int]) -> str:
    """A fingerprint of the vocabulary, stored in shards and models to catch mismatches.

    Parameters
    ----------
    vocab : dict of str to int
        The vocabulary.

    Returns
    -------
    str
        The hex sha256 of its entries in token id order.
    """
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_vocab(vocab: dict[str, int], path: str | Path) -> None:
    """Write a vocabulary as JSON, atomically.

    Parameters
    ----------
    vocab : dict of str to int
        The vocabulary.
    path : str or Path
        The file (vocab.json).
    """
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(vocab, indent=1) + "\n")


def read_vocab(path: str | Path) -> dict[str, int]:
    """Read a vocabulary written by ``write_vocab``.

    Parameters
    ----------
    path : str or Path
        The file (vocab.json).

    Returns
    -------
    dict of str to int

    Raises
    ------
    CorruptArtifactError
        The file is not a JSON object.
    """
    return {k: int(v) for k, v in read_json(path).items()}


def read_json(path: str | Path) -> dict:
    """A JSON file written by tokenize_shards (or copied by pretrain), refused clearly if damaged.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    dict

    Raises
    ------
    CorruptArtifactError
        The file is not a JSON object (truncated or damaged); the message says how to rewrite it.
    """
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
    """Ragged token arrays for a block of binned cells, a ``<cls>`` token before every cell.

    Parameters
    ----------
    binned : scipy.sparse.csr_matrix
        Binned cells x genes in vocabulary order (left unchanged; explicit zeros are no tokens).
    cls_id : int
        The ``<cls>`` token id.

    Returns
    -------
    offsets : numpy.ndarray
        int64, n_cells + 1: cell i spans tokens ``offsets[i]:offsets[i+1]``.
    gene_ids : numpy.ndarray
        int32 token ids, genes in column order after each cell's ``<cls>``.
    values : numpy.ndarray
        int16 bins, CLS_VALUE for ``<cls>``.
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


class RaggedCells:
    """Cells as CSR-like ragged arrays: cell i is tokens ``offsets[i]:offsets[i+1]``.

    Parameters
    ----------
    offsets : numpy.ndarray
        n_cells + 1 token offsets.
    gene_ids, values : numpy.ndarray
        The tokens' gene ids and values.

    Attributes
    ----------
    lengths : numpy.ndarray
        Tokens per cell.

    Raises
    ------
    ValueError
        The offsets do not end at the token count, or the token arrays differ in length.
    """

    def __init__(self, offsets: np.ndarray, gene_ids: np.ndarray, values: np.ndarray):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.gene_ids = np.asarray(gene_ids)
        self.values = np.asarray(values)
        if self.offsets[-1] != len(self.gene_ids) or len(self.gene_ids) != len(self.values):
            raise ValueError("offsets do not match the token arrays")
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell ``i``'s tokens.

        Parameters
        ----------
        i : int
            The cell's position.

        Returns
        -------
        tuple of numpy.ndarray
            (gene ids, values).
        """
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.gene_ids[start:stop], self.values[start:stop]

    def cells(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several cells' tokens.

        Parameters
        ----------
        indices : iterable of int
            The cells' positions.

        Returns
        -------
        list of tuple of numpy.ndarray
            (gene ids, values) of each cell.
        """
        return [self.cell(i) for i in indices]


def collate(cells: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest cell: the model's input tensors.

    Gene ids are padded with ``pad_id``, values with PAD_VALUE. torch loads here, not with the
    module: the data stages run without it.

    Parameters
    ----------
    cells : list of tuple of numpy.ndarray
        (gene ids, values) of each cell.
    pad_id : int
        The ``<pad>`` token id.

    Returns
    -------
    dict of str to torch.Tensor
        ``gene_ids`` and ``values`` (int64, cells x longest cell) and ``padding_mask`` (True at
        padding).
    """
    import torch

    max_len = max(len(g) for g, _ in cells)
    gene_ids = np.full((len(cells), max_len), pad_id, dtype=np.int64)
    values = np.full((len(cells), max_len), PAD_VALUE, dtype=np.int64)
    for row, (g, v) in enumerate(cells):
        gene_ids[row, : len(g)] = g
        values[row, : len(v)] = v
    gene_ids, values = torch.from_numpy(gene_ids), torch.from_numpy(values)
    return {"gene_ids": gene_ids, "values": values, "padding_mask": values == PAD_VALUE}
