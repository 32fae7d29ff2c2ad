"""Normalization and scGPT's per-cell value binning, vectorised and deterministic.

scGPT bins each cell on its own: over the cell's non-zero values, edges are
``quantile(nonzero, linspace(0, 1, n_bins - 1))``; a value gets ``digitize(value, edges)`` in
1..n_bins-1, zeros stay 0. Where several edges are equal (tied values), scGPT draws a bin
uniformly among the collapsed ones with the global RNG. We draw the same way, but from a hash of
(seed, cell, gene), where the cell is keyed on its own counts (``content_keys``), so a cell's bins
depend only on its counts and the seed: not on chunking, thread scheduling, its row or its file.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scllm.config import CHUNK_SIZE
from scllm.files import atomic_path
from scllm.h5ad import CSRWriter, open_backed, read_rows, row_chunks

log = logging.getLogger("scllm")


@numba.njit(cache=True, inline="always")
def _uniform(seed: np.uint64, cell: np.uint64, gene: np.uint64) -> float:
    """A uniform number in [0, 1) from splitmix64 of (seed, cell, gene)."""
    z = seed * np.uint64(0x9E3779B97F4A7C15) + cell * np.uint64(0xBF58476D1CE4E5B9) + gene
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True, parallel=True)
def _bin_rows(indptr, indices, data, quantiles, row_ids, seed, out):
    n_rows = len(indptr) - 1
    n_edges = len(quantiles)
    for r in numba.prange(n_rows):
        start, stop = indptr[r], indptr[r + 1]
        k = stop - start
        if k == 0:
            continue
        values = data[start:stop]
        ordered = np.sort(values)
        # numpy's default ("linear") quantile, including its two-sided lerp
        edges = np.empty(n_edges, dtype=np.float64)
        for j in range(n_edges):
            virtual = quantiles[j] * (k - 1)
            lo = int(np.floor(virtual))
            hi = min(lo + 1, k - 1)
            gamma = virtual - lo
            a, b = np.float64(ordered[lo]), np.float64(ordered[hi])
            diff = b - a
            edges[j] = b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma
        for i in range(k):
            x = np.float64(values[i])
            left = np.searchsorted(edges, x, side="right")  # == np.digitize(x, edges)
            right = np.searchsorted(edges, x, side="left")  # == np.digitize(x, edges, right=True)
            if left != right:
                u = _uniform(np.uint64(seed), np.uint64(row_ids[r]), np.uint64(indices[start + i]))
                out[start + i] = np.int64(np.ceil(u * (right - left) + left))
            else:
                out[start + i] = left


def content_keys(matrix: sp.csr_matrix) -> np.ndarray:
    """A 63-bit key per cell from its genes and counts (before normalization).

    Equal rows get equal keys. Binning draws tie-breaks from these, so a cell's tokens depend on
    its counts and the seed only, not on where it sits in a file, how files are chunked or what
    else is in them: the pipeline's shards and ``scllm embed`` give the same cell the same tokens.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix
        Counts, cells x genes (explicit zeros do not count).

    Returns
    -------
    numpy.ndarray
        int64, one non-negative key per cell.
    """
    matrix = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    matrix.eliminate_zeros()
    matrix.sort_indices()
    keys = np.empty(matrix.shape[0], dtype=np.int64)
    indptr, indices, data = matrix.indptr, matrix.indices.astype(np.int32), matrix.data
    for r in range(matrix.shape[0]):
        a, b = indptr[r], indptr[r + 1]
        digest = hashlib.blake2b(
            indices[a:b].tobytes() + b"|" + data[a:b].tobytes(), digest_size=8
        ).digest()
        keys[r] = int.from_bytes(digest, "little") >> 1
    return keys


def bin_csr(
    matrix: sp.csr_matrix,
    n_bins: int = 51,
    seed: int = 0,
    row_offset: int = 0,
    row_ids: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Per-cell quantile bins of a CSR matrix's non-zero values (same sparsity, uint8).

    Tie-breaking draws are keyed on (seed, row id, gene). Row ids default to the rows' global
    positions (``row_offset`` + row), so chunked calls equal one whole call; ``row_ids`` gives
    each row its own key instead (e.g. one derived from the cell's content).

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix
        Normalized values, cells x genes.
    n_bins : int, default 51
        Bins including 0 (zeros): values get 1..n_bins-1; 3 to 256.
    seed : int, default 0
        Seed of the tie-breaking draws.
    row_offset : int, default 0
        Global position of the first row, when ``row_ids`` is None.
    row_ids : numpy.ndarray or None, default None
        A key per row (e.g. ``content_keys``).

    Returns
    -------
    scipy.sparse.csr_matrix
        uint8 bins, with the sparsity of ``matrix``.

    Raises
    ------
    ValueError
        ``n_bins`` outside 3..256.
    """
    matrix = sp.csr_matrix(matrix)
    matrix.eliminate_zeros()
    if n_bins < 3 or n_bins > 256:
        raise ValueError(f"n_bins must be in 3..256, got {n_bins}")
    quantiles = np.linspace(0, 1, n_bins - 1)
    out = np.empty(matrix.nnz, dtype=np.int64)
    if row_ids is None:
        row_ids = np.arange(row_offset, row_offset + matrix.shape[0], dtype=np.int64)
    _bin_rows(
        matrix.indptr,
        matrix.indices,
        matrix.data,
        quantiles,
        np.asarray(row_ids, dtype=np.int64),
        np.int64(seed),
        out,
    )
    return sp.csr_matrix(
        (out.astype(np.uint8), matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape
    )


def normalize_total(
    counts: sp.csr_matrix, totals: np.ndarray, target_sum: float, log1p: bool
) -> sp.csr_matrix:
    """scanpy's ``normalize_total`` (with precomputed per-cell totals) and optional ``log1p``.

    Parameters
    ----------
    counts : scipy.sparse.csr_matrix
        Counts, cells x genes.
    totals : numpy.ndarray
        Each cell's total (it may cover more genes than ``counts``); a total of 0 gives zeros.
    target_sum : float
        Each cell's total after scaling.
    log1p : bool
        Apply ``log1p`` after scaling.

    Returns
    -------
    scipy.sparse.csr_matrix
        float32, column indices sorted.
    """
    scale = np.divide(
        target_sum, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0
    )
    out = sp.csr_matrix(sp.diags(scale) @ counts, dtype=np.float32)
    out.sort_indices()  # the product leaves column indices unsorted; readers expect them sorted
    if log1p:
        np.log1p(out.data, out=out.data)
    return out


def normalize_bin(
    in_h5ad: str | Path,
    hvg_table: str | Path,
    out_h5ad: str | Path,
    *,
    target_sum: float = 1e4,
    log1p: bool = False,
    n_bins: int = 51,
    seed: int = 0,
    min_expressed_hvgs: int = 1,
    chunk_size: int = CHUNK_SIZE,
) -> None:
    """Normalize each cell, keep the HVGs in vocabulary order, and bin.

    Cells are normalized to ``target_sum`` over all genes. A vocabulary gene the cells lack (one a
    continued model brings, marked ``in_data`` False) reads as not expressed. Cells expressing
    fewer than ``min_expressed_hvgs`` HVGs are dropped (logged).

    Parameters
    ----------
    in_h5ad : str or Path
        The filtered cells (counts, CSR).
    hvg_table : str or Path
        The HVG table (``read_hvg_table``): the vocabulary's genes in order.
    out_h5ad : str or Path
        The binned cells to write (uint8 X over the HVGs).
    target_sum : float, default 1e4
        Each cell's total after normalization.
    log1p : bool, default False
        Bin log1p-transformed values.
    n_bins : int, default 51
        Bins including 0 (see ``bin_csr``).
    seed : int, default 0
        Seed of the tie-breaking draws.
    min_expressed_hvgs : int, default 1
        Fewest expressed HVGs a kept cell has.
    chunk_size : int, default CHUNK_SIZE
        Cells read at a time.

    Raises
    ------
    ValueError
        An HVG that is no gene of ``in_h5ad`` (the table belongs to another run), or no cell
        expresses enough HVGs.
    """
    from scllm.prep.hvg import read_hvg_table

    t0 = time.time()
    adata = open_backed(in_h5ad)
    hvgs = read_hvg_table(hvg_table)
    columns = adata.var_names.get_indexer(hvgs["feature_id"])
    # A continued model's vocabulary (train.init_from) may hold genes these cells lack: marked
    # in_data False, they read as not expressed. Any other missing gene is a stale table.
    absent = columns < 0
    expected = ~hvgs["in_data"].to_numpy()
    if (absent & ~expected).any():
        missing = hvgs["feature_id"][absent & ~expected]
        raise ValueError(
            f"{len(missing)} HVGs are not genes of {in_h5ad} (e.g. {missing.head(3).tolist()}); "
            "the HVG table belongs to another run: rerun select_hvg"
        )
    columns = np.where(absent, adata.n_vars, columns)  # a zero column, appended per block
    var = pd.DataFrame(
        {"feature_id": hvgs["feature_id"].values, "feature_name": hvgs["feature_name"].values},
        index=pd.Index(hvgs["feature_id"].values),
    )
    uns = dict(adata.uns)
    uns["binning"] = {"n_bins": n_bins, "seed": seed, "target_sum": target_sum, "log1p": log1p}
    n_cells = adata.n_obs
    keep_cells = np.zeros(n_cells, dtype=bool)
    n_expressed = np.zeros(n_cells, dtype=np.int64)
    with atomic_path(out_h5ad) as tmp, CSRWriter(tmp, var=var, uns=uns, dtype=np.uint8) as writer:
        for start, stop in row_chunks(n_cells, chunk_size):
            counts = read_rows(adata, start, stop)
            totals = np.asarray(counts.sum(axis=1)).ravel()
            if absent.any():  # the vocabulary's genes these cells lack: an all-zero column
                counts = sp.hstack([counts, sp.csr_matrix((counts.shape[0], 1))], format="csr")
            hvg_counts = counts[:, columns]
            normalized = normalize_total(hvg_counts, totals, target_sum, log1p)
            binned = bin_csr(
                normalized, n_bins=n_bins, seed=seed, row_ids=content_keys(hvg_counts)
            )
            n_expressed[start:stop] = np.diff(binned.indptr)
            keep = n_expressed[start:stop] >= min_expressed_hvgs
            keep_cells[start:stop] = keep
            writer.append(binned[keep])
            log.info("normalize_bin: %d/%d cells", stop, n_cells)
        if not keep_cells.any():
            raise ValueError(
                "no cell expresses >= normalize_bin.min_expressed_hvgs="
                f"{min_expressed_hvgs} HVGs (the most any "
                f"cell has is {n_expressed.max()}); lower normalize_bin.min_expressed_hvgs"
            )
        obs = adata.obs.loc[keep_cells].copy()
        obs["n_expressed_hvgs"] = n_expressed[keep_cells]
        writer.set_obs(obs)
    adata.file.close()
    log.info(
        "normalize_bin: cells %d -> %d (dropped %d with < %d expressed HVGs), %d HVGs, "
        "%d bins in %.1fs",
        n_cells,
        keep_cells.sum(),
        n_cells - keep_cells.sum(),
        min_expressed_hvgs,
        len(columns),
        n_bins,
        time.time() - t0,
    )
