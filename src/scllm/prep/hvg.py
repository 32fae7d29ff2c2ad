"""Highly variable genes across samples: scanpy's seurat_v3 on raw counts, batch = sample.

scanpy's batched ``seurat_v3`` needs every cell in memory. Its per-batch statistics only depend
on that batch, so we call scanpy on one sample at a time (memory bounded by the largest sample)
and combine the per-sample normalized variances exactly as scanpy does (median rank, number of
batches), giving the same ranked set as scanpy on the whole matrix.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scllm.errors import InputError
from scllm.files import atomic_path
from scllm.h5ad import open_backed, read_rows, require_obs_columns

log = logging.getLogger("scllm")
FLAVORS = ("seurat_v3", "seurat_v3_paper")
# Normalized variances agree to about 15 digits between CPUs; 10 leaves a wide margin.
SIGNIFICANT_DIGITS = 10


def sample_ranges(samples: pd.Series) -> list[tuple[str, int, int]]:
    """(sample, start, stop) row ranges; the data stages keep each sample's cells contiguous.

    Parameters
    ----------
    samples : pandas.Series
        Each cell's sample, in row order.

    Returns
    -------
    list of tuple
        ``(sample, start, stop)`` per sample, in row order, ``stop`` excluded.

    Raises
    ------
    ValueError
        A sample's cells are not contiguous (the file was not written by sample_census).
    """
    values = samples.astype(str).to_numpy()
    if len(values) == 0:
        return []
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    stops = np.r_[starts[1:], len(values)]
    ranges = [(values[a], int(a), int(b)) for a, b in zip(starts, stops)]
    if len({name for name, _, _ in ranges}) != len(ranges):
        raise ValueError(
            "cells of a sample are not contiguous; the file was not written by sample_census"
        )
    return ranges


def sample_normalized_variance(counts, span: float = 0.3) -> np.ndarray:
    """scanpy's seurat_v3 normalized variance of every gene within one sample.

    Parameters
    ----------
    counts : scipy.sparse matrix or numpy.ndarray
        The sample's raw counts, cells x genes.
    span : float, default 0.3
        The LOESS span (scanpy's ``span``).

    Returns
    -------
    numpy.ndarray
        One normalized variance per gene.
    """
    import scanpy as sc

    one = ad.AnnData(X=counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        df = sc.pp.highly_variable_genes(
            one, flavor="seurat_v3", n_top_genes=1, span=span, inplace=False
        )
    return df["variances_norm"].to_numpy()


def round_significant(values: np.ndarray, digits: int) -> np.ndarray:
    """``values`` rounded to ``digits`` significant decimal digits.

    0, NaN, inf and values below 1e-300 in magnitude are kept as they are.

    Parameters
    ----------
    values : numpy.ndarray
        The values.
    digits : int
        Significant digits to keep.

    Returns
    -------
    numpy.ndarray
        float64, shaped as ``values``.
    """
    values = np.asarray(values, dtype=np.float64)
    magnitude = np.abs(values)
    usable = np.isfinite(values) & (magnitude >= 1e-300)
    power = 10.0 ** np.floor(np.log10(np.where(usable, magnitude, 1.0)))
    return np.where(usable, np.round(values / power, digits - 1) * power, values)


def combine_batches(
    norm_vars: np.ndarray, n_top_genes: int, flavor: str, index: pd.Index
) -> pd.DataFrame:
    """scanpy's cross-batch ranking of seurat_v3.

    The per-sample variances carry last-bit noise that depends on the CPU (sums vectorised
    for AVX2 or AVX-512 add in another order). Genes with equal variances (identical count
    columns) would be ordered by that noise, and the vocabulary with them, so the variances
    are rounded to ``SIGNIFICANT_DIGITS`` first and ties go to the earlier gene (stable sort).
    A tie still breaks if its value lies within the noise (~1e-15) of a rounding boundary: rare,
    and the pinned-shards test would show it.

    Parameters
    ----------
    norm_vars : numpy.ndarray
        Normalized variances, batches x genes.
    n_top_genes : int
        Genes to keep.
    flavor : str
        "seurat_v3" (median rank first) or "seurat_v3_paper" (number of batches first).
    index : pandas.Index
        The gene ids.

    Returns
    -------
    pandas.DataFrame
        The ``n_top_genes`` highest-ranked genes in rank order, indexed by gene id, with
        ``highly_variable_nbatches``, ``highly_variable_rank`` and ``variances_norm``.
    """
    norm_vars = round_significant(norm_vars, SIGNIFICANT_DIGITS)
    ranks = np.argsort(np.argsort(-norm_vars, axis=1, kind="stable"), axis=1).astype(np.float32)
    nbatches = np.sum(ranks < n_top_genes, axis=0)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    df = pd.DataFrame(
        {
            "highly_variable_nbatches": nbatches,
            "highly_variable_rank": median_rank,
            "variances_norm": round_significant(norm_vars.mean(axis=0), SIGNIFICANT_DIGITS),
        },
        index=index,
    )
    if flavor == "seurat_v3":
        cols, ascending = ["highly_variable_rank", "highly_variable_nbatches"], [True, False]
    else:
        cols, ascending = ["highly_variable_nbatches", "highly_variable_rank"], [False, True]
    order = df[cols].sort_values(cols, ascending=ascending, na_position="last").index
    return df.loc[order[:n_top_genes]]


def select_hvg(
    in_h5ad: str | Path,
    out_table: str | Path,
    *,
    n_top_genes: int = 1200,
    flavor: str = "seurat_v3",
    span: float = 0.3,
    min_cells_per_sample: int = 50,
) -> pd.DataFrame:
    """Rank ``n_top_genes`` HVGs across samples and write the table (the gene vocabulary).

    Samples with fewer than ``min_cells_per_sample`` cells, or on which the LOESS fit fails,
    are left out of the ranking with a logged reason (their cells stay in the data).

    Parameters
    ----------
    in_h5ad : str or Path
        The filtered cells (raw counts, each sample's cells contiguous, a ``sample`` obs column).
    out_table : str or Path
        The table to write.
    n_top_genes : int, default 1200
        Genes to select.
    flavor : str, default "seurat_v3"
        One of FLAVORS (see ``combine_batches``).
    span : float, default 0.3
        The LOESS span.
    min_cells_per_sample : int, default 50
        Fewest cells of a sample that takes part in the ranking.

    Returns
    -------
    pandas.DataFrame
        The table written: ``feature_id``, ``feature_name``, ``rank`` and the ranking's columns.

    Raises
    ------
    ValueError
        An unknown flavor, or more genes asked for than the data hold.
    InputError
        No sample could be used (the message says why and what to change).
    """
    if flavor not in FLAVORS:
        raise ValueError(f"hvg.flavor={flavor!r} is not supported; use one of {FLAVORS}")
    t0 = time.time()
    adata = open_backed(in_h5ad)
    require_obs_columns(adata, ["sample"], in_h5ad)
    if n_top_genes > adata.n_vars:
        raise ValueError(
            f"hvg.n_top_genes={n_top_genes} exceeds the {adata.n_vars} genes left after QC; "
            "lower it"
        )
    norm_vars, used, failed = [], [], []
    ranges = sample_ranges(adata.obs["sample"])
    for name, start, stop in ranges:
        if stop - start < min_cells_per_sample:
            log.warning(
                "HVG: sample %s left out: %d cells < hvg.min_cells_per_sample=%d",
                name,
                stop - start,
                min_cells_per_sample,
            )
            continue
        counts = read_rows(adata, start, stop)
        try:
            norm_vars.append(sample_normalized_variance(counts, span))
            used.append(name)
        except (
            ValueError,
            RuntimeError,
            ArithmeticError,
        ) as err:  # skmisc's LOESS on degenerate data
            log.warning("HVG: sample %s left out: seurat_v3 LOESS fit failed (%s)", name, err)
            failed.append(err)
            continue
        log.info(
            "HVG: sample %s (%d cells) done (%d/%d)", name, stop - start, len(used), len(ranges)
        )
    if not used:
        raise _no_usable_sample(len(ranges), failed, min_cells_per_sample)
    table = combine_batches(np.vstack(norm_vars), n_top_genes, flavor, adata.var_names)
    table.insert(0, "rank", np.arange(len(table)))
    table.insert(0, "feature_name", adata.var.loc[table.index, "feature_name"].astype(str).values)
    table.insert(0, "feature_id", table.index.astype(str))
    with atomic_path(out_table) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    adata.file.close()
    log.info(
        "select_hvg: %d genes in, %d HVGs out (flavor %s) from %d of %d samples in %.1fs",
        adata.n_vars,
        len(table),
        flavor,
        len(used),
        len(ranges),
        time.time() - t0,
    )
    return table


def _no_usable_sample(n_samples: int, failed: list, min_cells_per_sample: int) -> InputError:
    """Why no sample could be ranked, with the fix for that cause: too few cells, or a LOESS fit
    that failed (it fails when many genes share the same few count values, so that their
    (mean, variance) points coincide: lowering the cell threshold would not help)."""
    small = n_samples - len(failed)
    reasons = []
    if small:
        reasons.append(
            f"{small} have fewer than {min_cells_per_sample} cells: lower "
            "hvg.min_cells_per_sample or sample more cells"
        )
    if failed:
        reasons.append(
            f"on {len(failed)} the seurat_v3 LOESS fit failed ({failed[0]}), which happens when "
            "many genes have the same few counts in every cell: raise qc.min_gene_counts to drop "
            "the genes counted only a few times, or sample more cells per sample"
        )
    return InputError(
        f"no sample could be used for HVG selection: of {n_samples} sample(s), "
        + "; ".join(reasons)
        + "."
    )


def vocabulary_from_model(
    in_h5ad: str | Path, model_dir: str | Path, out_table: str | Path, min_coverage: float = 0.5
) -> pd.DataFrame:
    """The HVG table of a run that continues a trained model (train.init_from).

    The model's genes (its genes.tsv) in token order, ``in_data`` False for those these cells
    lack (they bin as not expressed).

    Parameters
    ----------
    in_h5ad : str or Path
        The filtered cells.
    model_dir : str or Path
        The model folder (its genes.tsv).
    out_table : str or Path
        The table to write.
    min_coverage : float, default 0.5
        Smallest share of the model's genes that must be genes of the data.

    Returns
    -------
    pandas.DataFrame
        The table written: ``feature_id``, ``feature_name``, ``rank`` and ``in_data``.

    Raises
    ------
    InputError
        Fewer than ``min_coverage`` of the model's genes are in the data.
    """
    genes_tsv = Path(model_dir) / "genes.tsv"
    genes = pd.read_csv(genes_tsv, sep="\t", dtype={"feature_id": str, "feature_name": str})
    adata = open_backed(in_h5ad)
    present = genes["feature_id"].isin(adata.var_names).to_numpy()
    adata.file.close()
    coverage = float(present.mean()) if len(present) else 0.0
    if coverage < min_coverage:
        raise InputError(
            f"train.init_from: only {present.sum()} of the {len(genes)} genes of {genes_tsv} "
            f"({coverage:.0%}) are genes of {in_h5ad} after QC; the model would see these cells "
            "through too few of the genes it knows. Check that the data are keyed on the same "
            "Ensembl ids (census.h5ad.gene_id_column), or train a new model (remove "
            "train.init_from)."
        )
    table = pd.DataFrame(
        {
            "feature_id": genes["feature_id"].values,
            "feature_name": genes["feature_name"].fillna("").values,
            "rank": np.arange(len(genes)),
            "in_data": present,
        }
    )
    with atomic_path(out_table) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    log.info(
        "select_hvg: the vocabulary of %s: %d genes, %d of them in %s (%.1f%%); the other %d "
        "never appear in these cells' tokens",
        model_dir,
        len(table),
        int(present.sum()),
        in_h5ad,
        100 * coverage,
        int((~present).sum()),
    )
    return table


def read_hvg_table(path: str | Path) -> pd.DataFrame:
    """The vocabulary in rank (token) order, with ``in_data``.

    ``in_data`` is False for a continued model's genes that these cells lack
    (vocabulary_from_model), True for every gene of a table select_hvg wrote.

    Parameters
    ----------
    path : str or Path
        The table.

    Returns
    -------
    pandas.DataFrame
        Sorted by ``rank``.
    """
    table = pd.read_csv(path, sep="\t", dtype={"feature_id": str, "feature_name": str})
    if "in_data" not in table:
        table["in_data"] = True
    table["in_data"] = table["in_data"].astype(bool)
    return table.sort_values("rank")
