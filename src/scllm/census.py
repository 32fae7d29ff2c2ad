"""Read cells from a CELLxGENE Census (the real one by release, or a local Census-shaped store),
or straight from your own h5ad with the same sampling rules.

A Census goes through ``cellxgene_census.open_soma``: ``census_version=...`` for a published
release, ``uri=...`` for a local SOMA store such as the one ``build_local_census`` writes from an
h5ad. ``sample_h5ad`` reads an h5ad directly (``census.source: h5ad``); both stream in blocks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from scllm.checks import check_counts, check_gene_ids, require_cells, unique_cell_ids
from scllm.errors import InputError, UnsafeOutputError
from scllm.ingest import H5adInput
from scllm.io import (
    CSRWriter,
    Progress,
    atomic_path,
    lies_within,
    sibling_name,
    temporary_sibling,
)

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
    "`snakemake --cores 2` (config/demo.yaml), which reads a local Census-shaped store "
    "built from the shipped PBMC 3k data."
)


INGEST_BLOCK_NNZ = 8_000_000  # stored values per block written into a local store (~160 MB as COO)
# TileDB read buffers per column. cellxgene_census opens with 1 GiB each (three columns for X:
# most of sample_census' 2.2 GB on 300k cells); 128 MiB, which its docs give for small machines,
# holds a 20k-cell chunk of blood cells in one or two reads.
READ_BUFFERS = {"soma.init_buffer_bytes": 128 * 1024**2, "py.init_buffer_bytes": 128 * 1024**2}
ROW_TILE = 2048  # cells per TileDB space tile of a local store's X (tiledbsoma's default extent)


class CensusUnavailableError(RuntimeError):
    pass


def open_census(version: str | None = None, uri: str | None = None):
    """Open a Census release (``version``) or a local SOMA store (``uri``) with a clear error."""
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
    """Release facts recorded in the Census' ``census_info/summary`` table."""
    try:
        summary = census["census_info"]["summary"].read().concat().to_pandas()
        return {str(k): str(v) for k, v in zip(summary["label"], summary["value"])}
    except Exception:  # a store without census_info: still usable, provenance just thinner
        return {}


def value_filter(tissue_general: str, primary_only: bool, disease: str | None) -> str:
    clauses = [f"tissue_general == '{tissue_general}'"]
    if primary_only:
        clauses.append("is_primary_data == True")
    if disease:
        clauses.append(f"disease == '{disease}'")
    return " and ".join(clauses)


def choose_samples(cells: pd.DataFrame, max_cells: int, seed: int) -> pd.DataFrame:
    """Pick whole samples at random while the total stays within ``max_cells``.

    Samples are visited in a seeded random order; a sample is kept if it still fits, skipped
    otherwise. Returns one row per sample with ``n_cells`` and ``chosen``.
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


def _select(cells: pd.DataFrame, max_cells: int, seed: int, where: str):
    """Whole samples under the cap (``choose_samples``), their cells in output order (sample by
    sample, then soma_joinid) and the obs of cells.h5ad."""
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
    *,
    census_version: str | None = None,
    uri: str | None = None,
    organism: str = "homo_sapiens",
    tissue_general: str = "blood",
    primary_only: bool = True,
    disease: str | None = None,
    max_cells: int = 300_000,
    seed: int = 0,
    chunk_size: int = 20_000,
) -> ad.AnnData:
    """Sample whole (dataset, donor) samples and stream their raw counts to ``out_h5ad``.

    Cells are written sample by sample, so every sample is a contiguous block of rows downstream.
    Returns the backed-free obs/var shell (no X) for logging and tests.
    """
    t0 = time.time()
    filt = value_filter(tissue_general, primary_only, disease)
    where = f"the Census at {uri or census_version}"
    with open_census(census_version, uri) as census:
        provenance = census_provenance(census)
        exp = _organism_experiment(census, organism)
        columns = _obs_columns_to_read(exp, disease)
        cells = _query_cells(exp, organism, filt, columns)
        samples, keep, obs = _select(cells, max_cells, seed, where)
        var = _census_var(exp, where)
        uns = {
            "census": {
                "source": str(uri) if uri else f"census_version={census_version}",
                "census_version": str(
                    census_version or provenance.get("census_build_date", "local")
                ),
                "provenance": provenance,
                "organism": organism,
                "value_filter": filt,
                "max_cells": int(max_cells),
                "seed": int(seed),
                "n_samples_available": int(len(samples)),
                "n_samples_chosen": int(samples["chosen"].sum()),
            }
        }
        _write_sample_by_sample(out_h5ad, exp, keep, obs, var, uns, chunk_size)
        _write_samples_tsv(samples, out_samples)
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
            for block in _read_rows(X, joinids, len(var), chunk_size):
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


def _write_samples_tsv(samples: pd.DataFrame, out_samples) -> None:
    """samples.tsv: every sample available, its number of cells and whether it was chosen."""
    with atomic_path(out_samples) as tmp:
        samples.to_csv(tmp, sep="\t", index=False)


def sample_h5ad(
    h5ad_path: str | Path,
    out_h5ad: str | Path,
    out_samples: str | Path,
    *,
    dataset_id: str | None = None,
    donor_id: str | None = None,
    donor_column: str | None = None,
    cell_type_column: str | None = None,
    gene_id_column: str | None = None,
    counts_layer: str | None = None,
    organism: str = "homo_sapiens",
    tissue_general: str = "blood",
    primary_only: bool = True,
    disease: str | None = None,
    max_cells: int = 300_000,
    seed: int = 0,
    chunk_size: int = 20_000,
    block_nnz: int = INGEST_BLOCK_NNZ,
) -> ad.AnnData:
    """``sample_census`` on your own h5ad, read directly: the same cells.h5ad and samples.tsv as
    building a local Census from it (``build_local_census``, with the same settings; missing
    tissue_general/disease filled from the filter) and sampling that, in one pass over the file.

    The input is read once, in row blocks of at most ``chunk_size`` cells and ``block_nnz``
    values; each block's chosen cells go straight to their rows in cells.h5ad, whose layout
    (sample by sample) is known from the row lengths before any value is read. Memory: obs, var
    and one block. A CSC matrix cannot be read by rows; it goes through a temporary local Census
    instead (slower, same memory bound).
    """
    # One pass gives what two steps would: build_local_census on the file (as primary data;
    # tissue_general and disease filled in from the filter where the file lacks them), then
    # sample_census on that store. These are their settings; a CSC input takes the two steps.
    build = dict(
        dataset_id=dataset_id,
        donor_id=donor_id,
        donor_column=donor_column,
        cell_type_column=cell_type_column,
        gene_id_column=gene_id_column,
        counts_layer=counts_layer,
        tissue_general=tissue_general,
        disease=disease or "normal",
        organism=organism,
        block_nnz=block_nnz,
    )
    sample = dict(
        organism=organism,
        tissue_general=tissue_general,
        primary_only=primary_only,
        disease=disease,
        max_cells=max_cells,
        seed=seed,
        chunk_size=chunk_size,
    )
    return _sample_in_one_pass(h5ad_path, out_h5ad, out_samples, build, sample)


def _sample_in_one_pass(h5ad_path, out_h5ad, out_samples, build: dict, sample: dict) -> ad.AnnData:
    """``sample_h5ad`` with its settings grouped as the two steps it stands for take them
    (``build``: build_local_census', ``sample``: sample_census'). obs and var are shaped as such
    a store would hold them, the cells chosen on them, and their counts copied in one pass."""
    t0 = time.time()
    where = f"the input h5ad {h5ad_path}"
    filt = value_filter(sample["tissue_general"], sample["primary_only"], sample["disease"])
    with H5adInput(h5ad_path) as source:
        shaped, var_in, matrix = _census_shaped(
            source,
            Path(h5ad_path).stem,
            build["dataset_id"],
            build["donor_id"],
            build["donor_column"],
            build["cell_type_column"],
            build["gene_id_column"],
            build["counts_layer"],
            build["tissue_general"],
            True,  # is_primary_data
            build["disease"],
            where,
        )
        if matrix.layout == "csc":
            log.info(
                "%s stores %s column by column (CSC), which cannot be read by cells: "
                "going through a temporary local Census "
                "(write your h5ad as CSR to skip this step)",
                h5ad_path,
                matrix.name,
            )
            source.close()
            return _sample_through_store(h5ad_path, out_h5ad, out_samples, build, sample)
        samples, obs, chosen = _choose_input_rows(
            h5ad_path, source, matrix, shaped, filt, where, sample
        )
        # Before writing, drop the input's shaped obs (a million cells' worth); the filtered and
        # chosen copies went with _choose_input_rows: only cells.h5ad's obs stays.
        del shaped
        var = var_in[["feature_name"]].astype(str)
        var.insert(0, "feature_id", var.index.values)
        uns = _input_uns(h5ad_path, source.n_obs, filt, samples, sample)
        _write_chosen_rows(
            out_h5ad,
            h5ad_path,
            source,
            matrix,
            chosen,
            obs,
            var,
            uns,
            build["block_nnz"],
            sample["chunk_size"],
        )
        _write_samples_tsv(samples, out_samples)
    log.info(
        "sample_census: %d cells x %d genes in, wrote %d cells x %d genes in %.1fs",
        source.n_obs,
        source.n_vars,
        obs.shape[0],
        var.shape[0],
        time.time() - t0,
    )
    return ad.AnnData(obs=obs, var=var, uns=uns)


def _choose_input_rows(
    h5ad_path, source, matrix, shaped: pd.DataFrame, filt: str, where: str, sample: dict
):
    """The samples (all, and which were chosen), cells.h5ad's obs and the input rows of the chosen
    cells in cells.h5ad's order. Its copies of obs (matching cells, chosen cells) go on return."""
    log.info(
        "reading %s: %d cells x %d genes (%s, %s); filter: %s",
        h5ad_path,
        source.n_obs,
        source.n_vars,
        matrix.name,
        matrix.layout,
        filt,
    )
    cells = _matching_cells(
        shaped, sample["tissue_general"], sample["primary_only"], sample["disease"], filt
    )
    samples, keep, obs = _select(cells, sample["max_cells"], sample["seed"], where)
    return samples, obs, keep["soma_joinid"].to_numpy()


def _input_uns(h5ad_path, n_obs: int, filt: str, samples: pd.DataFrame, sample: dict) -> dict:
    """cells.h5ad's uns["census"] for cells sampled straight from an h5ad."""
    return {
        "census": {
            "source": str(h5ad_path),
            "census_version": "local",
            "organism": sample["organism"],
            "value_filter": filt,
            "provenance": {"source_h5ad": Path(h5ad_path).name, "total_cell_count": str(n_obs)},
            "max_cells": int(sample["max_cells"]),
            "seed": int(sample["seed"]),
            "n_samples_available": int(len(samples)),
            "n_samples_chosen": int(samples["chosen"].sum()),
        }
    }


def _write_chosen_rows(
    out_h5ad, h5ad_path, source, matrix, chosen, obs, var, uns, block_nnz, chunk_size
) -> None:
    """cells.h5ad from the input rows ``chosen`` (in output order), in one pass over the input.

    X is laid out from the stored row lengths before any value is read. A row that stores zeros
    or repeated genes is shorter once written: then every row's values are counted first and
    the file is written again.
    """
    # Where each input row goes in cells.h5ad (-1: not chosen).
    out_row = np.full(source.n_obs, -1, dtype=np.int64)
    out_row[chosen] = np.arange(len(chosen))
    try:
        _write_cells(
            out_h5ad,
            matrix.row_nnz(block_nnz)[chosen],
            matrix,
            out_row,
            var,
            uns,
            obs,
            block_nnz,
            chunk_size,
            source,
        )
    except _RowLengthsChanged:
        log.info(
            "%s of %s stores zeros or repeated genes; counting every row's values first",
            matrix.name,
            h5ad_path,
        )
        _write_cells(
            out_h5ad,
            matrix.row_nnz(block_nnz, canonical=True)[chosen],
            matrix,
            out_row,
            var,
            uns,
            obs,
            block_nnz,
            chunk_size,
            source,
        )


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


def _matching_cells(
    shaped: pd.DataFrame, tissue_general: str, primary_only: bool, disease: str | None, filt: str
) -> pd.DataFrame:
    """The cells of a Census-shaped obs that pass the filter, numbered by input row (soma_joinid),
    as a store built from the same file would number them."""
    match = shaped["tissue_general"].astype(str) == tissue_general
    if primary_only:
        match &= shaped["is_primary_data"].astype(bool)
    if disease:
        match &= shaped["disease"].astype(str) == disease
    columns = REQUIRED_OBS + [c for c in OPTIONAL_OBS if c in shaped and c not in REQUIRED_OBS]
    cells = shaped.loc[match.to_numpy(), columns].reset_index(drop=True)
    cells.insert(0, "soma_joinid", np.flatnonzero(match.to_numpy()))
    log.info("%d cells match the filter", len(cells))
    if cells.empty:
        raise ValueError(
            f"no cells match the Census filter [{filt}]; check census.tissue_general/disease"
        )
    return cells


class _RowLengthsChanged(Exception):
    """A row held stored zeros or repeated genes: its length in cells.h5ad is not its stored
    one."""


def _write_cells(
    out_h5ad, row_nnz, matrix, out_row, var, uns, obs, block_nnz, chunk_size, source
) -> None:
    """cells.h5ad with X sized for ``row_nnz`` values per row, filled in one pass over the
    input."""
    with atomic_path(out_h5ad) as tmp, CSRWriter(tmp, var=var, uns=uns) as writer:
        writer.reserve(row_nnz)
        _scatter_rows(matrix, out_row, writer, block_nnz, chunk_size, source)
        writer.set_obs(obs)


def _scatter_rows(
    matrix, out_row: np.ndarray, writer: CSRWriter, block_nnz: int, chunk_size: int, source
) -> None:
    """One pass over the input in row blocks: each block's chosen rows, checked, into their place.
    Within a block the rows of one sample are consecutive in the output, so a block costs one
    write per sample it holds."""
    fix = _counts_fix(source)
    progress, last_log, total, written = (
        Progress(0, matrix.n_obs),
        0.0,
        int((out_row >= 0).sum()),
        0,
    )
    for done, block, first in matrix.row_blocks(block_nnz, chunk_size):
        targets = out_row[first:done]
        local = np.flatnonzero(targets >= 0)
        written += local.size
        if local.size:
            block = block[local]
            check_counts(block.data, f"{matrix.name} of the input h5ad", fix)
            block = _canonical(block)
            order = np.argsort(targets[local], kind="stable")
            rows = targets[local][order]
            block = block[order]
            if not np.array_equal(np.diff(block.indptr), np.diff(writer.reserved)[rows]):
                raise _RowLengthsChanged
            cuts = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive output rows
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
                writer.write_at(int(rows[a]), block[a:b])
        if (
            time.perf_counter() - last_log > 10 or done == matrix.n_obs
        ):  # a line every 10 s at most
            last_log = time.perf_counter()
            log.info(
                "ingest: read %d/%d cells of the input, wrote %d/%d chosen cells (%s)",
                done,
                matrix.n_obs,
                written,
                total,
                progress.text(done),
            )


def _canonical(block: sp.csr_matrix) -> sp.csr_matrix:
    """Rows as a Census stores them: genes in order, each once, no stored zeros."""
    block = sp.csr_matrix(block)
    if not block.has_canonical_format:
        block.sum_duplicates()  # also sorts each row's genes
    if block.nnz and not block.data.all():
        block.eliminate_zeros()
    return block


def _sample_through_store(
    h5ad_path, out_h5ad, out_samples, build: dict, sample: dict
) -> ad.AnnData:
    """sample_census on a local Census built from the h5ad in a temporary folder beside the
    output, removed afterwards (and on the next run, if a killed run left it)."""
    with temporary_sibling(Path(out_h5ad).parent / "census_store") as store:
        build_local_census(h5ad_path, store, **build)
        return sample_census(out_h5ad, out_samples, uri=str(store), **sample)


def _read_rows(X, joinids: np.ndarray, n_vars: int, chunk_size: int):
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


# ---------------------------------------------------------------------------------------------
# A local Census-shaped store from any h5ad of raw counts
# ---------------------------------------------------------------------------------------------


def build_local_census(
    h5ad_path: str | Path,
    uri: str | Path,
    *,
    dataset_id: str | None = None,
    dataset_title: str = "",
    donor_id: str | None = None,
    donor_column: str | None = None,
    cell_type_column: str | None = None,
    gene_id_column: str | None = None,
    counts_layer: str | None = None,
    tissue_general: str = "blood",
    is_primary_data: bool = True,
    disease: str = "normal",
    citation: str = "",
    organism: str = "homo_sapiens",
    block_nnz: int = INGEST_BLOCK_NNZ,
    overwrite: bool = False,
) -> None:
    """Write a SOMA store with the Census layout (``census_info``, ``census_data/<organism>``).

    Census obs columns already present in the h5ad (dataset_id, donor_id, tissue_general, ...)
    are kept; missing ones are filled from the arguments. Genes are keyed on Ensembl ids.
    The counts stream from the h5ad into the store's ``X/raw`` in blocks of at most
    ``block_nnz`` values, so memory holds obs, var and one block, whatever the number of cells.
    ``uri`` must not exist, or (with ``overwrite``) hold a store this function built: see
    ``check_store_output``, which refuses it before any work.
    """
    import tiledbsoma as soma
    import tiledbsoma.io  # makes soma.io available: _write_experiment ingests obs and var with it

    t0 = time.time()
    check_store_output(h5ad_path, uri, overwrite)
    with H5adInput(h5ad_path) as source:
        where = f"the input h5ad {h5ad_path}"
        obs, var, matrix = _census_shaped(
            source,
            Path(h5ad_path).stem,
            dataset_id,
            donor_id,
            donor_column,
            cell_type_column,
            gene_id_column,
            counts_layer,
            tissue_general,
            is_primary_data,
            disease,
            where,
        )
        log.info(
            "building a local Census at %s from %s: %d cells x %d genes (%s, %s)",
            uri,
            h5ad_path,
            len(obs),
            len(var),
            matrix.name,
            matrix.layout,
        )
        datasets = obs.groupby("dataset_id", observed=True).size()
        with atomic_path(uri) as tmp:
            check_store_output(h5ad_path, uri, overwrite)  # what appeared meanwhile
            tmp = str(Path(tmp).resolve())  # tiledbsoma relates member URIs on absolute paths
            _write_census_info(tmp, h5ad_path, len(obs), datasets, dataset_title, citation, soma)
            nnz = _write_experiment(tmp, organism, obs, var, matrix, block_nnz, source, soma)
    log.info(
        "build_local_census: %d cells x %d genes in, %d cells x %d genes (%d non-zeros) "
        "in the store, %.1fs",
        source.n_obs,
        source.n_vars,
        len(obs),
        len(var),
        nnz,
        time.time() - t0,
    )


def check_store_output(h5ad_path, uri, overwrite: bool = False) -> None:
    """Refuse (UnsafeOutputError) a store folder for ``build_local_census`` that would replace
    what the command did not write: a file, a folder holding the input, or any existing folder
    but a store it built earlier, which ``overwrite`` allows it to replace."""
    uri = Path(uri)
    example = sibling_name(uri, "_store")
    if (uri.exists() or uri.is_symlink()) and not uri.is_dir():
        raise UnsafeOutputError(
            f"the output {uri} is a file, not a store folder; scllm build-census writes a folder "
            f"and never replaces a file. Nothing was written: give a folder path that does not "
            f"exist yet, e.g. {example}."
        )
    if lies_within(h5ad_path, uri):
        raise UnsafeOutputError(
            f"the input {h5ad_path} lies inside the output folder {uri}: the store would replace "
            "that folder, deleting the input and everything else in it. Nothing was written: "
            f"give a folder path outside it that does not exist yet, e.g. {example}."
        )
    if not uri.is_dir():
        return
    source = _built_from(uri)
    if source is None:
        raise UnsafeOutputError(
            f"the output {uri} is a folder that is not a store scllm build-census built, so it "
            "is left alone (--overwrite replaces only such a store). Nothing was written: give a "
            f"folder path that does not exist yet, e.g. {example}."
        )
    if not overwrite:
        raise UnsafeOutputError(
            f"the output {uri} holds a store scllm build-census built earlier (from {source}). "
            "Nothing was written: pass --overwrite (overwrite=True in Python) to replace it, or "
            f"give a folder path that does not exist yet, e.g. {example}."
        )


def _built_from(uri: Path) -> str | None:
    """The input file name a store of build_local_census records (census_info's summary row
    ``source_h5ad``, which a CELLxGENE Census does not have), or None for any other folder."""
    import tiledbsoma as soma

    if not (uri / "census_info" / "summary").is_dir():
        return None
    try:
        with soma.DataFrame.open(str((uri / "census_info" / "summary").resolve())) as summary:
            table = summary.read().concat().to_pandas()
        values = dict(zip(table["label"], table["value"]))
    except Exception:  # not a SOMA dataframe, or not this layout
        return None
    return values.get("source_h5ad")


def _write_census_info(
    root_uri: str,
    h5ad_path,
    n_cells: int,
    datasets: pd.Series,
    dataset_title: str,
    citation: str,
    soma,
) -> None:
    """The store's root collection, holding census_info (the summary and datasets tables of a
    Census release) and census_data, still empty."""
    soma.Collection.create(root_uri).close()
    with soma.Collection.open(root_uri, "w") as root:
        info = root.add_new_collection("census_info")
        root.add_new_collection("census_data")
        _write_table(
            info,
            "summary",
            {
                "label": [
                    "census_schema_version",
                    "census_build_date",
                    "dataset_schema_version",
                    "total_cell_count",
                    "source_h5ad",
                ],
                "value": [
                    "2.1.0",
                    time.strftime("%Y-%m-%d"),
                    "5.2.0",
                    str(n_cells),
                    Path(h5ad_path).name,
                ],
            },
            soma,
        )
        _write_table(
            info,
            "datasets",
            {
                "dataset_id": [str(d) for d in datasets.index],
                "dataset_title": [dataset_title] * len(datasets),
                "citation": [citation] * len(datasets),
                "dataset_total_cell_count": [int(n) for n in datasets.values],
            },
            soma,
        )


def _write_experiment(
    root_uri: str, organism: str, obs, var, matrix, block_nnz: int, source, soma
) -> int:
    """census_data/<organism> of the store at ``root_uri``: obs, var and the counts in X/raw.
    Returns the number of non-zeros written."""
    experiment = f"{root_uri}/census_data/{organism}"
    # obs and var through tiledbsoma's own ingestion (an AnnData without X: nothing big);
    # the counts below, block by block, into an X layer of the same shape.
    obs.index = obs.index.astype(str)  # AnnData wants string cell names
    soma.io.from_anndata(experiment, ad.AnnData(obs=obs, var=var), measurement_name="RNA")
    log.info("writing %d cells x %d genes into the store", len(obs), len(var))
    with soma.Experiment.open(experiment, "w") as exp:
        # One tile spans all genes, so (cell, gene) order is TileDB's global order: blocks
        # of a CSR file go in as they are read, without TileDB sorting them (4x faster),
        # and a row range of cells reads from consecutive tiles.
        X = exp.ms["RNA"].X.add_new_sparse_ndarray(
            "raw",
            type=pa.float32(),
            shape=(len(obs), len(var)),
            platform_config={
                "tiledb": {
                    "create": {
                        "dims": {
                            "soma_dim_0": {"tile": ROW_TILE},
                            "soma_dim_1": {"tile": max(len(var), 1)},
                        }
                    }
                }
            },
        )
        nnz = _write_counts(X, matrix, block_nnz, source, soma)
    with soma.Collection.open(root_uri, "w") as root:
        root["census_data"].set(organism, soma.Experiment.open(experiment), use_relative_uri=True)
    return nnz


def _write_counts(X, matrix, block_nnz: int, source, soma) -> int:
    """Copy the count matrix into the SOMA array ``X`` block by block, checking every block.

    Each block is one TileDB write (one fragment), handed over in (cell, gene) order, the
    array's global order. Blocks may overlap in cells (CSC input arrives gene by gene); TileDB
    merges fragments when it reads.
    """
    fix = _counts_fix(source)
    label = f"{matrix.name} of the input h5ad"
    unit = "genes (CSC: read column by column)" if matrix.layout == "csc" else "cells"
    progress, last_log, nnz = Progress(0, matrix.n_major), 0.0, 0
    for done, rows, cols, values in matrix.blocks(block_nnz):
        check_counts(values, label, fix)
        if len(values) == 0:  # rows (or genes) without a count: nothing to store
            continue
        rows, cols, values = _in_cell_gene_order(rows, cols, values)
        X.write(
            pa.Table.from_pydict(
                {
                    "soma_dim_0": pa.array(rows),
                    "soma_dim_1": pa.array(cols),
                    "soma_data": pa.array(values.astype(np.float32, copy=False)),
                }
            ),
            platform_config=soma.TileDBWriteOptions(sort_coords=False),
        )
        nnz += len(values)
        if (
            time.perf_counter() - last_log > 10 or done == matrix.n_major
        ):  # a line every 10 s at most
            last_log = time.perf_counter()
            log.info(
                "ingest: %d/%d %s, %d non-zeros written (%s)",
                done,
                matrix.n_major,
                unit,
                nnz,
                progress.text(done),
            )
    return nnz


def _counts_fix(source) -> str:
    """What to do when the chosen matrix holds something other than raw counts."""
    layers = source.layers
    return (
        ": point census.h5ad.counts_layer (scllm build-census --counts-layer) "
        "at the layer holding raw counts"
        + (f" (this file has layers {layers})" if layers else "")
        + (", or write the counts of adata.raw into X" if source.has_raw else "")
    )


def _in_cell_gene_order(rows, cols, values):
    """COO entries sorted by (cell, gene), each position once. CSR row blocks with sorted
    indices and dense blocks already are; CSC blocks, unsorted indices and duplicate entries
    (which a non-canonical scipy matrix may store, and which mean their sum) are sorted here."""
    step_row, step_col = np.diff(rows), np.diff(cols)
    if np.all((step_row > 0) | ((step_row == 0) & (step_col > 0))):
        return rows, cols, values
    order = np.lexsort((cols, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    first = np.r_[True, (np.diff(rows) != 0) | (np.diff(cols) != 0)]
    if not first.all():
        starts = np.flatnonzero(first)
        rows, cols, values = rows[starts], cols[starts], np.add.reduceat(values, starts)
    return rows, cols, values


def _write_table(collection, name: str, columns: dict, soma) -> None:
    table = pa.table(
        {
            "soma_joinid": pa.array(np.arange(len(next(iter(columns.values())))), pa.int64()),
            **columns,
        }
    )
    # Plain string columns: categoricals written this way come back empty in tiledbsoma 2.3.
    df = collection.add_new_dataframe(
        name,
        schema=table.schema,
        index_column_names=["soma_joinid"],
        domain=[(0, max(table.num_rows - 1, 0))],
    )
    df.write(table)


def _census_shaped(
    source: H5adInput,
    default_dataset_id,
    dataset_id,
    donor_id,
    donor_column,
    cell_type_column,
    gene_id_column,
    counts_layer,
    tissue_general,
    is_primary_data,
    disease,
    where,
):
    """The Census-shaped obs and var of ``source`` and its count matrix (a block reader).
    Every check that needs no count values runs here, before anything is written."""
    require_cells(
        source.n_obs, source.n_vars, where
    )  # an empty store fails deep inside tiledbsoma
    matrix = source.matrix(counts_layer)
    var = _shaped_var(source, gene_id_column, where)

    present = set(source.obs_columns)
    obs = pd.DataFrame(index=pd.RangeIndex(source.n_obs))  # row numbers: a store's soma_joinid

    def column(name, fallback):
        """The file's own column where it has one; else the fallback, filled in."""
        return _obs_strings(source, name) if name in present else fallback

    obs["dataset_id"] = column("dataset_id", default_dataset_id) if not dataset_id else dataset_id
    if donor_column:
        obs["donor_id"] = _named_obs_column(
            source, donor_column, "census.h5ad.donor_column, --donor-column"
        )
    else:
        obs["donor_id"] = column("donor_id", "donor_0") if not donor_id else donor_id
    # A sample is (dataset, donor): cells without a value would be pooled into one made-up
    # sample called "nan" (and could become a whole validation split with split.by: sample).
    sample_columns = (
        None if dataset_id else "dataset_id",
        donor_column or (None if donor_id else "donor_id"),
    )
    for name in sample_columns:
        if name in present:
            _refuse_missing(source, name, where)
    label_col = cell_type_column or next(
        (c for c in ("cell_type", "celltype", "cell_type_label") if c in present), None
    )
    if label_col is not None:
        obs["cell_type"] = _named_obs_column(
            source, label_col, "census.h5ad.cell_type_column, --cell-type-column"
        )
    obs["tissue_general"] = column("tissue_general", tissue_general)
    obs["is_primary_data"] = (
        source.obs_column("is_primary_data").astype(bool).values
        if "is_primary_data" in present
        else is_primary_data
    )
    obs["disease"] = column("disease", disease)
    joinids = (
        column("observation_joinid", None) if "observation_joinid" in present else source.obs_names
    )
    obs["observation_joinid"] = _observation_joinids(obs, joinids, where)
    for col in ("assay", "sex", "tissue", "development_stage", "cell_type_ontology_term_id"):
        if col in present:
            obs[col] = _obs_strings(source, col)
    return obs, var, matrix


def _shaped_var(source: H5adInput, gene_id_column: str | None, where: str) -> pd.DataFrame:
    """The input's genes as a Census var: keyed on Ensembl ids (also feature_id), with names."""
    ids, column = _ensembl_ids(source, gene_id_column)
    names = (
        source.var["feature_name"].astype(str).values
        if "feature_name" in source.var
        else source.var.index.astype(str).values
    )
    var = pd.DataFrame({"feature_id": ids, "feature_name": names}, index=pd.Index(ids))
    # The fix names the ids as the user's AnnData holds them: var_names or a var column, with
    # the version suffixes (ENSG....7) that were dropped when they made the duplicates.
    held = "adata.var_names" if column is None else f"adata.var[{column!r}]"
    raw = source.var.index if column is None else source.var[column]
    if not pd.Index(np.asarray(raw).astype(str)).has_duplicates:
        held += '.str.split(".").str[0]'
    check_gene_ids(
        var.index,
        where,
        f"Drop the repeats, e.g. adata = adata[:, ~{held}.duplicated()].copy(), or sum them, "
        "then write the h5ad and rerun.",
    )
    return var


def _obs_strings(source: H5adInput, name: str):
    """An obs column of the input as strings; repeated values (donors, labels) stay categorical,
    as in the Census, so that obs of a million cells stays small."""
    col = source.obs_column(name)
    return (
        col.astype(str).astype("category").values
        if name != "observation_joinid"
        else col.astype(str).values
    )


def _refuse_missing(source: H5adInput, name: str, where: str) -> None:
    """Refuse an obs column that keys samples when some cells have no value in it."""
    values = source.obs_column(name)
    missing = int(values.isna().sum())
    if missing:
        raise InputError(
            f"{where}: {missing} of {len(values)} cells have no value in obs[{name!r}], which "
            "names each cell's sample (dataset, donor); they would be pooled into one sample "
            f"called 'nan'. Give them a value, e.g. adata.obs[{name!r}] = "
            f"adata.obs[{name!r}].astype(str).where(adata.obs[{name!r}].notna(), 'unknown') "
            "(one sample of their own), or drop them: "
            f"adata = adata[adata.obs[{name!r}].notna()].copy(); then write the h5ad and rerun."
        )


def _named_obs_column(source: H5adInput, name: str, setting: str):
    """The obs column a setting names, which the input must have."""
    if name not in source.obs_columns:
        raise ValueError(
            f"obs has no column {name!r} ({setting}); available: {source.obs_columns}"
        )
    return _obs_strings(source, name)


def _observation_joinids(obs: pd.DataFrame, joinids, where: str) -> list:
    """The cells' observation_joinid, checked unique within each dataset: a cell is
    (dataset_id, observation_joinid) downstream."""
    prefixes = pd.Series(obs["dataset_id"], index=obs.index).astype(str).to_numpy() + ":"
    unique = unique_cell_ids(
        prefixes + np.asarray(joinids, dtype=str), f"{where} (dataset_id:cell id)"
    )
    return [cell[len(prefix) :] for cell, prefix in zip(unique, prefixes)]


def _ensembl_ids(source: H5adInput, gene_id_column: str | None) -> tuple[np.ndarray, str | None]:
    """The genes' Ensembl ids (version suffixes dropped) and the var column they came from (None:
    var_names)."""
    candidates = (
        [gene_id_column]
        if gene_id_column
        else ["feature_id", "gene_ids", "gene_id", "ensembl_id", None]
    )
    for col in candidates:
        values = source.var.index if col is None else source.var.get(col)
        if values is None:
            if gene_id_column:
                raise ValueError(
                    f"var has no column {gene_id_column!r}; available: {list(source.var.columns)}"
                )
            continue
        values = np.asarray(values).astype(str)
        if np.mean(np.char.startswith(values, "ENS")) > 0.9:
            # drop Ensembl version suffixes
            return np.array([v.split(".")[0] for v in values]), col
        if gene_id_column:
            raise ValueError(
                f"var[{gene_id_column!r}] (census.h5ad.gene_id_column) "
                f"does not hold Ensembl gene ids (e.g. {values[:3].tolist()}); "
                "name a var column of Ensembl ids (ENSG...) instead"
            )
    raise ValueError(
        "no Ensembl gene ids found in var (looked at columns feature_id, gene_ids, gene_id, "
        "ensembl_id and var_names). Genes are keyed on Ensembl ids: add them (e.g. map symbols "
        "to ENSG ids), or name the column that holds them with census.h5ad.gene_id_column "
        "(--gene-id-column)."
    )
