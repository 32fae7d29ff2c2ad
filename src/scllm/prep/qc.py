"""Quality control: drop rarely counted genes, then cells with too few expressed genes and,
optionally, cells with too large a mitochondrial fraction of their counts.

Two streaming passes over the counts (gene totals, then filter-and-write), so memory holds one
row chunk plus a few numbers per cell, never the whole matrix.

The cell criteria apply in order: ``min_genes_per_cell``, then ``max_mito_fraction`` on the cells
left, so the cells each one removed (columns of the QC table) add up to the cells removed. Every
per-cell value is measured over the genes kept by ``min_gene_counts``, the matrix written out:
``total_counts`` and ``n_genes_by_counts`` in obs, and the mitochondrial fraction (counts of genes
whose symbol starts with ``MT-``, in any case, over the cell's counts), as in scanpy's usual order
(filter genes, then compute the metrics).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scllm.checks import check_counts
from scllm.config import CHUNK_SIZE
from scllm.errors import InputError
from scllm.files import atomic_path
from scllm.h5ad import CSRWriter, open_backed, read_rows, require_obs_columns, row_chunks

log = logging.getLogger("scllm")

# Mitochondrial genes: symbols (var["feature_name"]) starting with this, compared in upper case
# (human MT-CO1, mouse mt-Co1).
MITO_PREFIX = "MT-"
SYMBOL_COLUMN = "feature_name"
# The per-cell table (qc_cells.tsv.gz), one row per input cell in input order: which cell
# (ID_COLUMNS, to join it with cells.h5ad or plot per sample), then its values (CELL_COLUMNS).
ID_COLUMNS = ("obs_name", "sample")
CELL_COLUMNS = ("total_counts", "n_genes", "mito_fraction", "passed")


@dataclass(frozen=True)
class QCSettings:
    """The ``qc`` section of the config (``max_mito_fraction`` None: no mitochondrial filter)."""

    min_gene_counts: int
    min_genes_per_cell: int
    max_mito_fraction: float | None

    def __post_init__(self):
        limit = self.max_mito_fraction
        is_number = isinstance(limit, (int, float)) and not isinstance(limit, bool)
        if limit is not None and not (is_number and 0 < limit <= 1):
            raise InputError(
                f"qc.max_mito_fraction must be a fraction in (0, 1], or null to switch the "
                f"mitochondrial filter off; not {limit!r}"
            )


@dataclass
class CellQC:
    """Each input cell's QC values (input order), and which criterion removed it."""

    total_counts: np.ndarray  # counts over the kept genes
    n_genes: np.ndarray  # kept genes with a non-zero count
    mito_fraction: np.ndarray  # NaN where not computable (no MT- genes, or no counts)
    too_few_genes: np.ndarray  # removed by min_genes_per_cell
    too_much_mito: np.ndarray  # removed by max_mito_fraction (had enough genes)

    @property
    def passed(self) -> np.ndarray:
        """Cells no criterion removed (a boolean mask)."""
        return ~(self.too_few_genes | self.too_much_mito)

    def table(self) -> pd.DataFrame:
        """The per-cell table of qc_cells.tsv.gz.

        Returns
        -------
        pandas.DataFrame
            One row per input cell, columns ``CELL_COLUMNS``; counts as integers (X holds
            checked raw counts).
        """
        return pd.DataFrame(
            {
                "total_counts": np.rint(self.total_counts).astype(np.int64),
                "n_genes": self.n_genes,
                "mito_fraction": self.mito_fraction,
                "passed": self.passed,
            },
            columns=list(CELL_COLUMNS),
        )


def filter_qc(
    in_h5ad: str | Path,
    out_h5ad: str | Path,
    out_table: str | Path,
    *,
    min_gene_counts: int = 3,
    min_genes_per_cell: int = 200,
    max_mito_fraction: float | None = None,
    cells_table: str | Path | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> pd.DataFrame:
    """Filter genes, then cells, streaming the counts in row chunks.

    Keeps genes with total count >= ``min_gene_counts``; of the cells, those expressing at least
    ``min_genes_per_cell`` of the kept genes and, if ``max_mito_fraction`` is set, with at most
    that fraction of their counts in mitochondrial genes. Adds ``total_counts`` and
    ``n_genes_by_counts`` to obs of the written file.

    Parameters
    ----------
    in_h5ad
        Raw counts (CSR), with ``obs["sample"]``; ``var["feature_name"]`` (gene symbols) is
        needed when ``max_mito_fraction`` is set.
    out_h5ad
        The kept cells over the kept genes.
    out_table
        The QC table (TSV): cells and genes in and out, overall and per sample, cells removed
        by each criterion, and the thresholds.
    min_gene_counts
        Genes with fewer counts over all cells are dropped.
    min_genes_per_cell
        Cells expressing fewer of the kept genes are dropped.
    max_mito_fraction
        Cells with a larger fraction of their counts in genes whose symbol starts with ``MT-``
        (any case) are dropped; None switches this off. Data without symbols or without MT-
        genes are refused while it is set.
    cells_table
        If given, a gzipped TSV with every input cell's ``obs_name``, ``sample``,
        ``total_counts``, ``n_genes``, ``mito_fraction`` (NaN when not computable) and
        ``passed``, in input order.
    chunk_size
        Cells read at a time (memory only, never the result).

    Returns
    -------
    pandas.DataFrame
        The QC table, as written to ``out_table``.

    Raises
    ------
    InputError
        ``max_mito_fraction`` is not a fraction in (0, 1] or None; X does not hold raw counts;
        or, while ``max_mito_fraction`` is set, no mitochondrial gene can be found (no symbols,
        no MT- symbol) or every one of them is dropped by ``min_gene_counts``.
    ValueError
        ``in_h5ad`` cannot be opened or has no ``obs["sample"]``, or a threshold keeps no gene
        or no cell (the message names the one to relax).
    """
    t0 = time.time()
    settings = QCSettings(min_gene_counts, min_genes_per_cell, max_mito_fraction)
    adata = open_backed(in_h5ad)
    require_obs_columns(adata, ["sample"], in_h5ad)
    n_cells, n_genes = adata.shape
    mito = mito_genes(adata.var, in_h5ad, settings.max_mito_fraction)

    gene_totals = _gene_totals(adata, in_h5ad, chunk_size)
    keep_genes = gene_totals >= min_gene_counts
    log.info("genes: %d of %d have total count >= %d", keep_genes.sum(), n_genes, min_gene_counts)
    if not keep_genes.any():
        raise ValueError(
            f"no gene has a total count >= qc.min_gene_counts={min_gene_counts} (the largest is "
            f"{gene_totals.max():.0f} over {n_cells} cells); lower qc.min_gene_counts or sample "
            "more cells"
        )
    kept_mito = _kept_mito_genes(mito, keep_genes, settings)
    cells = _write_kept_cells(
        adata, out_h5ad, gene_totals, keep_genes, kept_mito, settings, chunk_size
    )
    table = _qc_table(adata, cells, keep_genes, settings)
    with atomic_path(out_table) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    if cells_table is not None:
        ids = {"obs_name": adata.obs_names.to_numpy(), "sample": adata.obs["sample"].to_numpy()}
        write_cells_table(pd.concat([pd.DataFrame(ids), cells.table()], axis=1), cells_table)
    adata.file.close()
    _log_summary(table.iloc[0], settings, time.time() - t0)
    return table


def mito_genes(var: pd.DataFrame, where, max_mito_fraction: float | None = None):
    """Which genes are mitochondrial: symbols in ``var["feature_name"]`` starting with ``MT-``
    (any case).

    Parameters
    ----------
    var
        The genes (one row each), with their symbols in a ``feature_name`` column.
    where
        The file ``var`` comes from, for messages.
    max_mito_fraction
        The filter's setting: when set, data in which no mitochondrial gene can be found are
        refused instead of every fraction going uncomputed (which would filter nothing).

    Returns
    -------
    numpy.ndarray or None
        A boolean mask over the genes, or None when the fraction cannot be computed (no symbol
        column, or no MT- gene) and the filter is off.

    Raises
    ------
    InputError
        ``max_mito_fraction`` is set but ``var`` has no ``feature_name`` column, or none of its
        symbols starts with ``MT-``.
    """
    off = "set qc.max_mito_fraction: null to switch the mitochondrial filter off"
    if SYMBOL_COLUMN not in var.columns:
        if max_mito_fraction is None:
            return None
        raise InputError(
            f"qc.max_mito_fraction={max_mito_fraction} finds mitochondrial genes by their symbols "
            f"(starting with {MITO_PREFIX!r}), but var of {where} has no {SYMBOL_COLUMN!r} column "
            f"(it has {list(var.columns)}). sample_census writes the symbols there: rerun it, or "
            f"{off}"
        )
    symbols = var[SYMBOL_COLUMN].astype(str).str.upper()
    mask = symbols.str.startswith(MITO_PREFIX).to_numpy(dtype=bool)
    if mask.any():
        return mask
    if max_mito_fraction is None:
        return None
    raise InputError(
        f"qc.max_mito_fraction={max_mito_fraction}: none of the {len(var)} gene symbols in "
        f"var[{SYMBOL_COLUMN!r}] of {where} starts with {MITO_PREFIX!r} in any case (e.g. "
        f"{', '.join(var[SYMBOL_COLUMN].astype(str).head(3))}), so no cell's mitochondrial "
        f"fraction can be computed. The data hold no mitochondrial genes (some sources remove "
        f"them) or name genes otherwise: {off}"
    )


def _kept_mito_genes(mito, keep_genes, settings: QCSettings) -> np.ndarray | None:
    """0/1 weights of the mitochondrial genes among the kept genes (None: not computable)."""
    if mito is None:
        return None
    kept = mito[keep_genes]
    if settings.max_mito_fraction is not None and not kept.any():
        raise InputError(
            f"qc.max_mito_fraction={settings.max_mito_fraction}: all {mito.sum()} mitochondrial "
            f"genes have a total count below qc.min_gene_counts={settings.min_gene_counts}, so "
            "every kept cell's mitochondrial fraction would be 0 and the filter would remove "
            "nothing; lower qc.min_gene_counts, or set qc.max_mito_fraction: null"
        )
    return kept.astype(np.float64)


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


def _judge_chunk(block, kept_mito, settings: QCSettings, cells: CellQC, rows: slice) -> np.ndarray:
    """One chunk's QC values into ``cells`` (at ``rows``); returns its kept-cell mask."""
    expressed = np.diff(block.indptr)
    totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    fraction = np.full(len(totals), np.nan)
    if kept_mito is not None:
        # a cell without counts has no fraction, and the mitochondrial filter leaves it be
        np.divide(block @ kept_mito, totals, out=fraction, where=totals > 0)
    too_few = expressed < settings.min_genes_per_cell
    too_much = np.zeros_like(too_few)
    if settings.max_mito_fraction is not None:
        too_much = ~too_few & (fraction > settings.max_mito_fraction)
    cells.total_counts[rows] = totals
    cells.n_genes[rows] = expressed
    cells.mito_fraction[rows] = fraction
    cells.too_few_genes[rows] = too_few
    cells.too_much_mito[rows] = too_much
    return ~(too_few | too_much)


def _write_kept_cells(
    adata, out_h5ad, gene_totals, keep_genes, kept_mito, settings: QCSettings, chunk_size: int
) -> CellQC:
    """Second pass: write the kept cells over the kept genes, with their QC metrics in obs.
    Returns every cell's QC values."""
    n_cells = adata.n_obs
    var = adata.var.loc[keep_genes].copy()
    var["total_counts"] = gene_totals[keep_genes]
    cells = CellQC(
        total_counts=np.zeros(n_cells, dtype=np.float64),
        n_genes=np.zeros(n_cells, dtype=np.int64),
        mito_fraction=np.full(n_cells, np.nan),
        too_few_genes=np.zeros(n_cells, dtype=bool),
        too_much_mito=np.zeros(n_cells, dtype=bool),
    )
    with atomic_path(out_h5ad) as tmp, CSRWriter(tmp, var=var, uns=dict(adata.uns)) as writer:
        for start, stop in row_chunks(n_cells, chunk_size):
            block = read_rows(adata, start, stop)[:, keep_genes]
            block.eliminate_zeros()
            keep = _judge_chunk(block, kept_mito, settings, cells, slice(start, stop))
            writer.append(block[keep])
            log.info(
                "filter_qc: %d/%d cells read, %d kept", stop, n_cells, cells.passed[:stop].sum()
            )
        _require_kept_cells(cells, settings)
        keep_cells = cells.passed
        obs = adata.obs.loc[keep_cells].copy()
        obs["total_counts"] = cells.total_counts[keep_cells]
        obs["n_genes_by_counts"] = cells.n_genes[keep_cells]
        writer.set_obs(obs)
    return cells


def _require_kept_cells(cells: CellQC, settings: QCSettings) -> None:
    """A clear error, naming the criterion to relax, when no cell passes."""
    if cells.passed.any():
        return
    if cells.too_few_genes.all():
        raise ValueError(
            f"no cell expresses >= qc.min_genes_per_cell={settings.min_genes_per_cell} genes "
            f"(the most any cell has is {cells.n_genes.max()}); lower qc.min_genes_per_cell"
        )
    raise ValueError(
        f"no cell passes qc.max_mito_fraction={settings.max_mito_fraction}: the "
        f"{(~cells.too_few_genes).sum()} cells with enough genes have mitochondrial fractions "
        f"from {np.nanmin(cells.mito_fraction[~cells.too_few_genes]):.3g} up; raise "
        "qc.max_mito_fraction, or set it to null"
    )


def _qc_table(adata, cells: CellQC, keep_genes, settings: QCSettings) -> pd.DataFrame:
    """Cells in and out overall and per sample, the cells each criterion removed (in order:
    min_genes_per_cell, then max_mito_fraction), the gene counts and the thresholds."""
    n_genes = adata.n_vars
    per_cell = pd.DataFrame(
        {
            "scope": adata.obs["sample"].astype(str).values,
            "cells_out": cells.passed,
            "removed_by_min_genes_per_cell": cells.too_few_genes,
            "removed_by_max_mito_fraction": cells.too_much_mito,
        }
    )
    counts = {"cells_in": ("cells_out", "size")} | {
        column: (column, "sum") for column in per_cell.columns[1:]
    }
    per_sample = per_cell.groupby("scope", sort=True).agg(**counts).reset_index()
    overall = per_cell.drop(columns="scope").agg("sum").to_frame().T.astype(np.int64)
    overall.insert(0, "scope", "all")
    overall.insert(1, "cells_in", len(per_cell))
    limit = settings.max_mito_fraction
    return pd.concat([overall, per_sample], ignore_index=True).assign(
        genes_in=n_genes,
        genes_out=int(keep_genes.sum()),
        min_gene_counts=settings.min_gene_counts,
        min_genes_per_cell=settings.min_genes_per_cell,
        max_mito_fraction=np.nan if limit is None else float(limit),  # empty in the TSV: off
    )


def write_cells_table(table: pd.DataFrame, path: str | Path) -> None:
    """Write the per-cell QC values as a gzipped TSV (qc_cells.tsv.gz).

    Parameters
    ----------
    table
        One row per cell with the columns ``CELL_COLUMNS``.
    path
        Where to write; replaced only once the whole file is written.
    """
    with atomic_path(path) as tmp:
        # mtime 0: the same cells give the same bytes
        table.to_csv(
            tmp,
            sep="\t",
            index=False,
            float_format="%.6g",
            compression={"method": "gzip", "compresslevel": 6, "mtime": 0},
        )


def _log_summary(overall: pd.Series, settings: QCSettings, seconds: float) -> None:
    limit = settings.max_mito_fraction
    log.info(
        "filter_qc: cells %d -> %d (removed: %d by min_genes_per_cell=%d, %d by "
        "max_mito_fraction=%s), genes %d -> %d (min_gene_counts=%d) in %.1fs",
        overall["cells_in"],
        overall["cells_out"],
        overall["removed_by_min_genes_per_cell"],
        settings.min_genes_per_cell,
        overall["removed_by_max_mito_fraction"],
        "off" if limit is None else f"{limit:g}",
        overall["genes_in"],
        overall["genes_out"],
        settings.min_gene_counts,
        seconds,
    )
