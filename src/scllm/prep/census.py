"""Sampling a CELLxGENE Census: the real one by release, or a local Census-shaped SOMA store
(``scllm.prep.store`` builds one from an h5ad).

A Census goes through ``cellxgene_census.open_soma``: ``census_version=...`` for a published
release, ``uri=...`` for a local store. Whole samples (dataset, donor) are chosen at random under
``max_cells`` and their raw counts streamed into cells.h5ad sample by sample, in row blocks.
(``scllm.prep.h5ad_source`` samples your own h5ad by the same rules, without a store.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scllm.checks import check_counts, check_gene_ids, unique_cell_ids
from scllm.config import SamplingConfig, settings_of
from scllm.files import Progress, atomic_path
from scllm.h5ad import CSRWriter

log = logging.getLogger("scllm")

SAMPLE_KEYS = [
    "dataset_id",
    "donor_id",
]  # the schema has no sample column; donor_id is per dataset
REQUIRED_OBS = [
    "dataset_id",
    "donor_id",
    "observation_joinid",
    "tissue_general",
    "is_primary_data",
]
# Carried into cells.h5ad when the Census has them (labels for evaluation, metadata for users).
OPTIONAL_OBS = [
    "cell_type",
    "cell_type_ontology_term_id",
    "assay",
    "disease",
    "tissue",
    "sex",
    "development_stage",
]
EMBEDDED_DEFAULT_HINT = (
    "To try the pipeline without network access, run the embedded default: "
    "`snakemake --cores 2` (config/demo.yaml), which reads the shipped PBMC 3k h5ad "
    "directly (census.source: h5ad)."
)
# TileDB read buffers per column. cellxgene_census opens with 1 GiB each (three columns for X:
# most of sample_census' 2.2 GB on 300k cells); 128 MiB, which its docs give for small machines,
# holds a 20k-cell chunk of blood cells in one or two reads.
READ_BUFFERS = {"soma.init_buffer_bytes": 128 * 1024**2, "py.init_buffer_bytes": 128 * 1024**2}


class CensusUnavailableError(RuntimeError):
    """The Census cannot be opened: no store at the path, an unknown release, or no network."""

    pass


def open_census(version: str | None = None, uri: str | None = None):
    """Open a Census release (``version``) or a local SOMA store (``uri``) with a clear error.

    Parameters
    ----------
    version : str or None, default None
        A Census release (e.g. "2025-01-30"); used when ``uri`` is None.
    uri : str or None, default None
        A local Census-shaped store (or a remote URI).

    Returns
    -------
    tiledbsoma.Collection
        The opened Census, to use as a context manager.

    Raises
    ------
    CensusUnavailableError
        No store at ``uri``, a version that is not a release, or the Census cannot be reached.
    """
    import cellxgene_census

    if uri is not None:
        if not Path(uri).exists() and "://" not in str(uri):
            raise CensusUnavailableError(
                f"no Census-shaped store at census.uri={uri!r}; "
                "build one with `scllm build-census`"
            )
        return cellxgene_census.open_soma(uri=str(uri), tiledb_config=READ_BUFFERS)
    try:
        return cellxgene_census.open_soma(census_version=version, tiledb_config=READ_BUFFERS)
    except ValueError as err:  # raised for a version the release directory does not list
        raise CensusUnavailableError(
            f"census.census_version={version!r} is not a Census release ({err}). "
            "Pick a dated release "
            "from cellxgene_census.get_census_version_directory(), e.g. '2025-01-30'."
        ) from err
    except OSError as err:  # requests' ConnectionError and friends
        raise CensusUnavailableError(
            f"The CELLxGENE Census cannot be reached (census_version={version!r}): "
            f"{type(err).__name__}. Check network access to the Census, or use a local copy "
            "(census.source: uri, census.uri: PATH). " + EMBEDDED_DEFAULT_HINT
        ) from err


def census_provenance(census) -> dict:
    """Release facts recorded in the Census' ``census_info/summary`` table.

    Parameters
    ----------
    census : tiledbsoma.Collection
        The opened Census.

    Returns
    -------
    dict of str to str
        Label -> value; empty for a store without census_info (still usable).
    """
    try:
        summary = census["census_info"]["summary"].read().concat().to_pandas()
        return {str(k): str(v) for k, v in zip(summary["label"], summary["value"])}
    except Exception:  # a store without census_info: still usable, provenance just thinner
        return {}


def value_filter(tissue_general: str, primary_only: bool, disease: str | None) -> str:
    """The SOMA obs filter of the sampling settings.

    Parameters
    ----------
    tissue_general : str
        The tissue_general the cells have.
    primary_only : bool
        Only primary data (``is_primary_data == True``).
    disease : str or None
        The disease the cells have; None (or "") for any.

    Returns
    -------
    str
        The clauses joined with ``and``.
    """
    clauses = [f"tissue_general == '{tissue_general}'"]
    if primary_only:
        clauses.append("is_primary_data == True")
    if disease:
        clauses.append(f"disease == '{disease}'")
    return " and ".join(clauses)


def choose_samples(cells: pd.DataFrame, max_cells: int, seed: int) -> pd.DataFrame:
    """Pick whole samples at random while the total stays within ``max_cells``.

    Samples are visited in a seeded random order; a sample is kept if it still fits, skipped
    otherwise.

    Parameters
    ----------
    cells : pandas.DataFrame
        The cells that pass the filter, with the SAMPLE_KEYS columns.
    max_cells : int
        The cap on the chosen cells.
    seed : int
        The seed of the order.

    Returns
    -------
    pandas.DataFrame
        One row per sample (SAMPLE_KEYS order) with ``n_cells`` and ``chosen``.

    Raises
    ------
    ValueError
        No cells, or every sample is larger than ``max_cells``.
    """
    samples = cells.groupby(SAMPLE_KEYS, observed=True).size().rename("n_cells").reset_index()
    samples = samples.sort_values(SAMPLE_KEYS, ignore_index=True)  # order independent of the query
    if samples.empty:
        raise ValueError("no cells match the Census filter")
    smallest = int(samples["n_cells"].min())
    if smallest > max_cells:
        raise ValueError(
            f"census.max_cells={max_cells} is smaller than every sample "
            f"(the smallest has {smallest} cells), "
            "so no whole sample fits. Raise census.max_cells."
        )
    order = np.random.default_rng(seed).permutation(len(samples))
    chosen = np.zeros(len(samples), dtype=bool)
    total = 0
    for i in order:
        n = int(samples.at[i, "n_cells"])
        if total + n <= max_cells:
            chosen[i] = True
            total += n
    samples["chosen"] = chosen
    return samples


def select(cells: pd.DataFrame, max_cells: int, seed: int, where: str):
    """Whole samples under the cap (``choose_samples``), their cells in output order, and the obs.

    Parameters
    ----------
    cells : pandas.DataFrame
        The cells that pass the filter (``soma_joinid`` and the obs columns read).
    max_cells : int
        The cap on the chosen cells.
    seed : int
        The seed of the choice.
    where : str
        The Census, for the warning about repeated cell ids.

    Returns
    -------
    samples : pandas.DataFrame
        Every sample, with ``n_cells`` and ``chosen``.
    keep : pandas.DataFrame
        The chosen cells, sample by sample, then by soma_joinid.
    obs : pandas.DataFrame
        The obs of cells.h5ad for ``keep``, in that order, with unique cell ids.
    """
    samples = choose_samples(cells, max_cells, seed)
    chosen = samples[samples["chosen"]]
    log.info(
        "%d samples (dataset, donor) available; chose %d holding %d cells (cap %d, seed %d)",
        len(samples),
        len(chosen),
        int(chosen["n_cells"].sum()),
        max_cells,
        seed,
    )
    too_big = samples[samples["n_cells"] > max_cells]
    for row in too_big.itertuples():
        log.warning(
            "sample %s/%s has %d cells, more than the cap: never chosen",
            row.dataset_id,
            row.donor_id,
            row.n_cells,
        )

    keep = cells.merge(chosen[SAMPLE_KEYS], on=SAMPLE_KEYS, how="inner")
    keep = keep.sort_values(SAMPLE_KEYS + ["soma_joinid"], ignore_index=True)
    obs = _cells_obs(keep)
    obs.index = unique_cell_ids(obs.index, where)
    return samples, keep, obs


def sample_census(
    out_h5ad: str | Path,
    out_samples: str | Path,
    cfg: SamplingConfig | None = None,
    *,
    census_version: str | None = None,
    uri: str | None = None,
    **settings,
) -> ad.AnnData:
    """Sample whole (dataset, donor) samples of a Census; stream their raw counts to ``out_h5ad``.

    Cells are written sample by sample, so every sample is a contiguous block of rows downstream.

    Parameters
    ----------
    out_h5ad : str or Path
        cells.h5ad to write.
    out_samples : str or Path
        samples.tsv to write (``write_samples_tsv``).
    cfg : SamplingConfig or None, default None
        The sampling settings; None to give them as keywords.
    census_version : str or None, default None
        The Census release, when ``uri`` is None.
    uri : str or None, default None
        A local Census-shaped store.
    **settings
        ``SamplingConfig``'s fields, instead of ``cfg``.

    Returns
    -------
    anndata.AnnData
        The obs/var shell of what was written (no X), for logging and tests.

    Raises
    ------
    CensusUnavailableError
        The Census cannot be opened.
    ValueError
        Unknown settings, an organism or obs columns the Census lacks, no cells matching the
        filter, or no sample under the cap.
    InputError
        The store's counts are not raw counts, or its gene ids repeat.
    """
    cfg = settings_of(SamplingConfig, cfg, settings, "census")
    t0 = time.time()
    filt = value_filter(cfg.tissue_general, cfg.primary_only, cfg.disease)
    where = f"the Census at {uri or census_version}"
    with open_census(census_version, uri) as census:
        provenance = census_provenance(census)
        exp = _organism_experiment(census, cfg.organism)
        columns = _obs_columns_to_read(exp, cfg.disease)
        cells = _query_cells(exp, cfg.organism, filt, columns)
        samples, keep, obs = select(cells, cfg.max_cells, cfg.seed, where)
        var = _census_var(exp, where)
        uns = {
            "census": {
                "source": str(uri) if uri else f"census_version={census_version}",
                "census_version": str(
                    census_version or provenance.get("census_build_date", "local")
                ),
                "provenance": provenance,
                "organism": cfg.organism,
                "value_filter": filt,
                "max_cells": int(cfg.max_cells),
                "seed": int(cfg.seed),
                "n_samples_available": int(len(samples)),
                "n_samples_chosen": int(samples["chosen"].sum()),
            }
        }
        _write_sample_by_sample(out_h5ad, exp, keep, obs, var, uns, cfg.chunk_size)
        write_samples_tsv(samples, out_samples)
    log.info(
        "sample_census: wrote %d cells x %d genes in %.1fs",
        obs.shape[0],
        var.shape[0],
        time.time() - t0,
    )
    return ad.AnnData(obs=obs, var=var, uns=uns)


def _organism_experiment(census, organism: str):
    """The Census' experiment for ``organism`` (``census_data/<organism>``), or a clear error
    naming the organisms it has."""
    organisms = list(census["census_data"].keys()) if "census_data" in census else []
    if organism not in organisms:
        raise ValueError(
            f"census.organism={organism!r} is not in this Census (it has {sorted(organisms)}); "
            "set census.organism to one of them"
        )
    return census["census_data"][organism]


def _obs_columns_to_read(exp, disease: str | None) -> list[str]:
    """soma_joinid, the obs columns sampling needs and the optional ones this store has.

    A store lacking a needed column (disease only when filtering on it) fails here, before any
    cell is read, with the way to a store that has them.
    """
    available = set(exp.obs.schema.names)
    missing = [c for c in REQUIRED_OBS + (["disease"] if disease else []) if c not in available]
    if missing:
        raise ValueError(
            f"the Census obs lacks columns {missing}, which sampling needs"
            + (
                " (disease only for the census.disease filter: "
                "set census.disease: null to drop it)"
                if missing == ["disease"]
                else ""
            )
            + ". Build the store with `scllm build-census` (or census.source: h5ad), which fills "
            "in missing Census columns from its options."
        )
    optional = [c for c in OPTIONAL_OBS if c in available and c not in REQUIRED_OBS]
    return ["soma_joinid"] + REQUIRED_OBS + optional


def _query_cells(exp, organism: str, filt: str, columns: list[str]) -> pd.DataFrame:
    """The obs ``columns`` of every cell that passes the filter; an error if none does."""
    log.info("querying %s obs: %s", organism, filt)
    cells = exp.obs.read(value_filter=filt, column_names=columns).concat().to_pandas()
    log.info("%d cells match the filter", len(cells))
    if cells.empty:
        raise ValueError(
            f"no cells match the Census filter [{filt}]; check census.tissue_general/disease"
        )
    for col in cells.columns:  # categoricals span the whole Census: keep only what we hold
        if isinstance(cells[col].dtype, pd.CategoricalDtype):
            cells[col] = cells[col].cat.remove_unused_categories()
    return cells


def _write_sample_by_sample(
    out_h5ad, exp, keep: pd.DataFrame, obs, var, uns, chunk_size: int
) -> None:
    """cells.h5ad: the raw counts of the chosen cells (``keep``), read from the store's X/raw
    one sample at a time, so that every sample is a contiguous block of rows."""
    progress = Progress(0, len(keep))
    X = exp.ms["RNA"].X["raw"]
    with atomic_path(out_h5ad) as tmp, CSRWriter(tmp, var=var, uns=uns) as writer:
        for sample_key, group in keep.groupby(SAMPLE_KEYS, observed=True, sort=False):
            joinids = group["soma_joinid"].to_numpy()
            for block in _read_soma_rows(X, joinids, len(var), chunk_size):
                writer.append(block)
            log.info(
                "sample %s: %d cells (%d/%d written; %s)",
                "/".join(map(str, sample_key)),
                len(joinids),
                writer.rows_written,
                len(keep),
                progress.text(writer.rows_written),
            )
        writer.set_obs(obs)


def write_samples_tsv(samples: pd.DataFrame, out_samples) -> None:
    """samples.tsv: every sample available, its number of cells and whether it was chosen.

    Parameters
    ----------
    samples : pandas.DataFrame
        ``choose_samples``'s table.
    out_samples : str or Path
        The file to write.
    """
    with atomic_path(out_samples) as tmp:
        samples.to_csv(tmp, sep="\t", index=False)


def _census_var(exp, where: str) -> pd.DataFrame:
    """The experiment's genes, in soma_joinid order, as cells.h5ad's var (index and feature_id:
    the Ensembl id; feature_name)."""
    var = (
        exp.ms["RNA"]
        .var.read(column_names=["soma_joinid", "feature_id", "feature_name"])
        .concat()
        .to_pandas()
    )
    var = var.sort_values("soma_joinid", ignore_index=True)
    if not np.array_equal(var["soma_joinid"].to_numpy(), np.arange(len(var))):
        raise ValueError(
            f"{where} numbers its genes (var soma_joinid) with gaps; "
            "a Census numbers them 0..n-1. "
            "Build the store with `scllm build-census`."
        )
    var.index = pd.Index(var["feature_id"].astype(str).values, name=None)
    var = var[["feature_name"]].astype(str)
    check_gene_ids(var.index, f"{where} (var feature_id)")
    var.insert(0, "feature_id", var.index.values)
    return var


def _read_soma_rows(X, joinids: np.ndarray, n_vars: int, chunk_size: int):
    """Yield CSR blocks of raw counts for ``joinids`` (ascending), in that order.

    Reads the SOMA array by cell soma_joinid and builds each CSR block itself. The array's own
    order is asked for (``result_order="auto"``): asking TileDB for row-major order made it
    sort, 16x slower than the read itself; a store from build_local_census is stored in
    (cell, gene) order anyway. ``axis_query(...).X(...).blockwise(...)`` gives the same blocks
    but re-indexes every one with pyarrow, which took 40% of this stage (21 of 55 s for 300k
    cells). A run of consecutive cells (a sample of a local store) is read as one range, not as
    point lookups.
    """
    for start in range(0, len(joinids), chunk_size):
        chunk = joinids[start : start + chunk_size]
        first, last = int(chunk[0]), int(chunk[-1])
        cells = (
            slice(first, last) if last - first + 1 == len(chunk) else chunk
        )  # SOMA slices include the end
        parts = [
            (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy(), t["soma_data"].to_numpy())
            for t in X.read(coords=(cells, slice(None)), result_order="auto").tables()
        ]
        rows, cols, data = (
            np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, dtype)
            for i, dtype in enumerate((np.int64, np.int64, np.float32))
        )
        check_counts(
            data,
            "Census X/raw",
            ": a local store must be built from raw counts (scllm build-census checks them)",
        )
        position = np.searchsorted(chunk, rows)  # each value's row within the block
        if len(rows) and (
            position.max() >= len(chunk) or not np.array_equal(chunk[position], rows)
        ):
            raise RuntimeError("the Census returned counts of cells that were not requested")
        step_row, step_col = np.diff(position), np.diff(cols)
        if np.all(
            (step_row > 0) | ((step_row == 0) & (step_col > 0))
        ):  # already (cell, gene) order
            indptr = np.r_[0, np.cumsum(np.bincount(position, minlength=len(chunk)))]
            block = sp.csr_matrix(
                (data.astype(np.float32, copy=False), cols.astype(np.int32), indptr),
                shape=(len(chunk), n_vars),
            )
        else:
            # a store tiled across genes (the Census): scipy's linear COO -> CSR, then per-row
            # sorts
            block = sp.csr_matrix(
                (data, (position, cols)), shape=(len(chunk), n_vars), dtype=np.float32
            )
            block.sort_indices()
        yield block


def _cells_obs(cells: pd.DataFrame) -> pd.DataFrame:
    obs = cells.drop(columns=["soma_joinid"]).copy()
    for col in obs.columns:
        if obs[col].dtype == object or isinstance(obs[col].dtype, pd.CategoricalDtype):
            obs[col] = pd.Categorical(obs[col].astype(str))
    obs.insert(
        0,
        "sample",
        pd.Categorical(obs["dataset_id"].astype(str) + "/" + obs["donor_id"].astype(str)),
    )
    obs["census_soma_joinid"] = cells["soma_joinid"].to_numpy()  # only valid within this release
    # (dataset_id, observation_joinid) identifies a cell across releases
    obs.index = pd.Index(
        obs["dataset_id"].astype(str) + ":" + obs["observation_joinid"].astype(str)
    )
    return obs
