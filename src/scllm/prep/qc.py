"""Quality control: drop rarely counted genes, then cells with too few expressed genes.

Two streaming passes over the counts (gene totals, then filter-and-write), so memory holds one
row chunk, never the whole matrix.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scllm.checks import check_counts
from scllm.config import CHUNK_SIZE
from scllm.files import atomic_path
from scllm.h5ad import CSRWriter, open_backed, read_rows, require_obs_columns, row_chunks

log = logging.getLogger("scllm")


def filter_qc(
    in_h5ad: str | Path,
    out_h5ad: str | Path,
    out_table: str | Path,
    *,
    min_gene_counts: int = 3,
    min_genes_per_cell: int = 200,
    chunk_size: int = CHUNK_SIZE,
) -> pd.DataFrame:
    """Keep genes with total count >= ``min_gene_counts`` and cells expressing at least
    ``min_genes_per_cell`` of those genes. Adds ``total_counts`` and ``n_genes_by_counts`` to obs.
    Returns the QC table (also written to ``out_table``)."""
    t0 = time.time()
    adata = open_backed(in_h5ad)
    require_obs_columns(adata, ["sample"], in_h5ad)
    n_cells, n_genes = adata.shape

    gene_totals = _gene_totals(adata, in_h5ad, chunk_size)
    keep_genes = gene_totals >= min_gene_counts
    log.info("genes: %d of %d have total count >= %d", keep_genes.sum(), n_genes, min_gene_counts)
    if not keep_genes.any():
        raise ValueError(
            f"no gene has a total count >= qc.min_gene_counts={min_gene_counts} (the largest is "
            f"{gene_totals.max():.0f} over {n_cells} cells); lower qc.min_gene_counts or sample "
            "more cells"
        )
    keep_cells = _write_kept_cells(
        adata, out_h5ad, gene_totals, keep_genes, min_genes_per_cell, chunk_size
    )
    table = _qc_table(adata, keep_cells, keep_genes, min_gene_counts, min_genes_per_cell)
    with atomic_path(out_table) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    adata.file.close()
    log.info(
        "filter_qc: cells %d -> %d, genes %d -> %d in %.1fs",
        n_cells,
        keep_cells.sum(),
        n_genes,
        keep_genes.sum(),
        time.time() - t0,
    )
    return table


def _gene_totals(adata, in_h5ad, chunk_size: int) -> np.ndarray:
    """First pass: every gene's total count, checking on the way that X holds raw counts."""
    n_cells, n_genes = adata.shape
    gene_totals = np.zeros(n_genes, dtype=np.float64)
    for start, stop in row_chunks(n_cells, chunk_size):
        block = read_rows(adata, start, stop)
        check_counts(
            block.data,
            f"X of {in_h5ad}",
            ": sample_census writes it from checked raw counts, so it was changed or damaged "
            "since; rewrite it with `snakemake --forcerun sample_census`",
        )
        gene_totals += np.bincount(block.indices, weights=block.data, minlength=n_genes)
    return gene_totals


def _write_kept_cells(
    adata, out_h5ad, gene_totals, keep_genes, min_genes_per_cell: int, chunk_size: int
) -> np.ndarray:
    """Second pass: write the kept cells over the kept genes, with their QC metrics in obs.
    Returns the kept-cell mask."""
    n_cells = adata.n_obs
    var = adata.var.loc[keep_genes].copy()
    var["total_counts"] = gene_totals[keep_genes]
    keep_cells = np.zeros(n_cells, dtype=bool)
    totals = np.zeros(n_cells, dtype=np.float64)
    n_expressed = np.zeros(n_cells, dtype=np.int64)
    with atomic_path(out_h5ad) as tmp, CSRWriter(tmp, var=var, uns=dict(adata.uns)) as writer:
        for start, stop in row_chunks(n_cells, chunk_size):
            block = read_rows(adata, start, stop)[:, keep_genes]
            block.eliminate_zeros()
            expressed = np.diff(block.indptr)
            keep = expressed >= min_genes_per_cell
            keep_cells[start:stop] = keep
            totals[start:stop] = np.asarray(block.sum(axis=1)).ravel()
            n_expressed[start:stop] = expressed
            writer.append(block[keep])
            log.info(
                "filter_qc: %d/%d cells read, %d kept", stop, n_cells, keep_cells[:stop].sum()
            )
        if not keep_cells.any():
            raise ValueError(
                f"no cell expresses >= qc.min_genes_per_cell={min_genes_per_cell} genes "
                f"(the most any cell has is {n_expressed.max()}); lower qc.min_genes_per_cell"
            )
        obs = adata.obs.loc[keep_cells].copy()
        obs["total_counts"] = totals[keep_cells]
        obs["n_genes_by_counts"] = n_expressed[keep_cells]
        writer.set_obs(obs)
    return keep_cells


def _qc_table(adata, keep_cells, keep_genes, min_gene_counts, min_genes_per_cell) -> pd.DataFrame:
    """Cells in and out overall and per sample, with the gene counts and the thresholds."""
    n_cells, n_genes = adata.shape
    scope = adata.obs["sample"].astype(str).values
    per_sample = pd.DataFrame({"scope": scope, "kept": keep_cells})
    per_sample = (
        per_sample.groupby("scope", sort=True)["kept"]
        .agg(cells_in="size", cells_out="sum")
        .reset_index()
    )
    overall = pd.DataFrame(
        {"scope": ["all"], "cells_in": [n_cells], "cells_out": [int(keep_cells.sum())]}
    )
    return pd.concat([overall, per_sample], ignore_index=True).assign(
        genes_in=n_genes,
        genes_out=int(keep_genes.sum()),
        min_gene_counts=min_gene_counts,
        min_genes_per_cell=min_genes_per_cell,
    )
