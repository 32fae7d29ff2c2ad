"""A local Census-shaped SOMA store from any h5ad of raw counts (``scllm build-census``), and the
Census shape of an h5ad's cells and genes, which sampling your h5ad directly shares.

The store has the Census layout (``census_info``, ``census_data/<organism>``), so the pipeline
samples it through the same code path as the real Census (``census.source: uri``). The counts
stream from the h5ad into ``X/raw`` in blocks, checked on the way.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa

from scllm.checks import check_counts, check_gene_ids, require_cells, unique_cell_ids
from scllm.config import H5adConfig, settings_of
from scllm.errors import InputError, UnsafeOutputError
from scllm.files import Progress, atomic_path, lies_within, sibling_name
from scllm.h5ad import H5adInput
from scllm.workflow_config import did_you_mean

log = logging.getLogger("scllm")

INGEST_BLOCK_NNZ = 8_000_000  # stored values per block written into a local store (~160 MB as COO)
ROW_TILE = 2048  # cells per TileDB space tile of a local store's X (tiledbsoma's default extent)


def build_local_census(
    h5ad_path: str | Path,
    uri: str | Path,
    cfg: H5adConfig | None = None,
    *,
    block_nnz: int = INGEST_BLOCK_NNZ,
    overwrite: bool = False,
    flags: bool = False,
    **settings,
) -> None:
    """Write a SOMA store with the Census layout (``census_info``, ``census_data/<organism>``).

    Census obs columns already present in the h5ad (dataset_id, donor_id, tissue_general, ...)
    are kept; missing ones are filled from the settings. Genes are keyed on Ensembl ids. The
    counts stream from the h5ad into the store's ``X/raw`` in blocks of at most ``block_nnz``
    values, so memory holds obs, var and one block, whatever the number of cells.

    Parameters
    ----------
    h5ad_path : str or Path
        The h5ad of raw counts.
    uri : str or Path
        The store folder to write. It must not exist, or (with ``overwrite``) hold a store this
        function built: see ``check_store_output``, which refuses it before any work.
    cfg : H5adConfig or None, default None
        Where the counts are and how cells become Census cells; None to give them as keywords.
    block_nnz : int, default INGEST_BLOCK_NNZ
        Stored values read and written at a time at the most.
    overwrite : bool, default False
        Replace a store this function built earlier at ``uri``.
    flags : bool, default False
        Name the settings in messages as ``scllm build-census``'s flags (``--cell-type-column``)
        rather than as the workflow's config keys (``census.h5ad.cell_type_column``).
    **settings
        ``H5adConfig``'s fields, instead of ``cfg``.

    Raises
    ------
    UnsafeOutputError
        ``uri`` is a file, holds the input, or is a folder other than an earlier store (or one
        without ``overwrite``).
    InputError
        No cells or genes, counts that are not raw counts, repeated gene ids, or cells without a
        sample.
    ValueError
        Unknown settings, a named obs or var column the file lacks, or no Ensembl gene ids.
    """
    cfg = settings_of(H5adConfig, cfg, settings, "census.h5ad")
    import tiledbsoma as soma
    import tiledbsoma.io  # makes soma.io available: _write_experiment ingests obs and var with it

    t0 = time.time()
    check_store_output(h5ad_path, uri, overwrite)
    # scllm build-census: the file is its H5AD argument, not a config setting
    with H5adInput(h5ad_path, None if flags else "census.h5ad.path") as source:
        where = f"the input h5ad {h5ad_path}"
        obs, var, matrix = census_shaped(source, cfg, where, flags)
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
            _write_census_info(tmp, h5ad_path, len(obs), datasets, cfg, soma)
            nnz = _write_experiment(tmp, cfg.organism, obs, var, matrix, block_nnz, source, soma)
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
    """Refuse a store folder for ``build_local_census`` that would replace what it did not write.

    That is a file, a folder holding the input, or any existing folder but a store it built
    earlier, which ``overwrite`` allows it to replace.

    Parameters
    ----------
    h5ad_path : str or Path
        The input h5ad.
    uri : str or Path
        The store folder.
    overwrite : bool, default False
        Allow replacing a store build_local_census built.

    Raises
    ------
    UnsafeOutputError
        The folder may not be written (the message suggests a free path beside it).
    """
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
    cfg: H5adConfig,
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
                "dataset_title": [cfg.dataset_title] * len(datasets),
                "citation": [cfg.citation] * len(datasets),
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
    fix = counts_fix(source)
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


def counts_fix(source) -> str:
    """What to do when the chosen matrix holds something other than raw counts.

    Parameters
    ----------
    source : H5adInput
        The opened input (its layers and raw are named).

    Returns
    -------
    str
        The fix, to end a ``check_counts`` message.
    """
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


# --- an h5ad's cells and genes in the Census' shape ----------------------------------------------


def census_shaped(source: H5adInput, cfg: H5adConfig, where: str, flags: bool = False):
    """The Census-shaped obs and var of ``source`` and its count matrix, as a store holds them.

    Every check that needs no count values runs here, before anything is written.

    Parameters
    ----------
    source : H5adInput
        The opened input.
    cfg : H5adConfig
        Where the counts are and how cells become Census cells.
    where : str
        The input, for the messages.
    flags : bool, default False
        Name the settings in messages as ``scllm build-census``'s flags, not as config keys.

    Returns
    -------
    obs : pandas.DataFrame
        Census obs columns per cell, indexed by row number (a store's soma_joinid).
    var : pandas.DataFrame
        ``feature_id`` and ``feature_name``, indexed by Ensembl id.
    matrix : CountMatrix
        The count matrix, a block reader.

    Raises
    ------
    InputError
        No cells or genes, no such layer, repeated gene ids, or cells without a sample.
    ValueError
        A named obs or var column the file lacks, or no Ensembl gene ids.
    """
    require_cells(
        source.n_obs, source.n_vars, where
    )  # an empty store fails deep inside tiledbsoma
    matrix = source.matrix(cfg.counts_layer)
    var = _shaped_var(source, cfg.gene_id_column, where, flags)

    present = set(source.obs_columns)
    obs = pd.DataFrame(index=pd.RangeIndex(source.n_obs))  # row numbers: a store's soma_joinid

    def column(name, fallback):
        """The file's own column where it has one; else the fallback, filled in."""
        return _obs_strings(source, name) if name in present else fallback

    dataset_id, donor_id = cfg.dataset_id, cfg.donor_id
    obs["dataset_id"] = column("dataset_id", source.path.stem) if not dataset_id else dataset_id
    if cfg.donor_column:
        obs["donor_id"] = _named_obs_column(
            source, cfg.donor_column, _setting("donor_column", flags)
        )
    else:
        obs["donor_id"] = column("donor_id", "donor_0") if not donor_id else donor_id
    # A sample is (dataset, donor): cells without a value would be pooled into one made-up
    # sample called "nan" (and could become a whole validation split with split.by: sample).
    sample_columns = (
        None if dataset_id else "dataset_id",
        cfg.donor_column or (None if donor_id else "donor_id"),
    )
    for name in sample_columns:
        if name in present:
            _refuse_missing(source, name, where)
    label_col = cfg.cell_type_column or next(
        (c for c in ("cell_type", "celltype", "cell_type_label") if c in present), None
    )
    if label_col is not None:
        obs["cell_type"] = _named_obs_column(
            source, label_col, _setting("cell_type_column", flags)
        )
    obs["tissue_general"] = column("tissue_general", cfg.tissue_general)
    obs["is_primary_data"] = (
        source.obs_column("is_primary_data").astype(bool).values
        if "is_primary_data" in present
        else cfg.is_primary_data
    )
    obs["disease"] = column("disease", cfg.disease)
    joinids = (
        column("observation_joinid", None) if "observation_joinid" in present else source.obs_names
    )
    obs["observation_joinid"] = _observation_joinids(obs, joinids, where)
    for col in ("assay", "sex", "tissue", "development_stage", "cell_type_ontology_term_id"):
        if col in present:
            obs[col] = _obs_strings(source, col)
    return obs, var, matrix


def _shaped_var(
    source: H5adInput, gene_id_column: str | None, where: str, flags: bool
) -> pd.DataFrame:
    """The input's genes as a Census var: keyed on Ensembl ids (also feature_id), with names."""
    ids, column = _ensembl_ids(source, gene_id_column, flags)
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


def _setting(field: str, flags: bool) -> str:
    """An H5adConfig field as the caller names it: scllm build-census's flag or the config key."""
    return "--" + field.replace("_", "-") if flags else f"{H5adConfig.SECTION}.{field}"


def _named_obs_column(source: H5adInput, name: str, setting: str):
    """The obs column a setting names, which the input must have."""
    if name not in source.obs_columns:
        raise ValueError(
            f"obs has no column {name!r} ({setting}); available: {source.obs_columns}."
            + did_you_mean(name, source.obs_columns)
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


def _ensembl_ids(
    source: H5adInput, gene_id_column: str | None, flags: bool
) -> tuple[np.ndarray, str | None]:
    """The genes' Ensembl ids (version suffixes dropped) and the var column they came from (None:
    var_names); ``flags``: messages name scllm build-census's flags."""
    candidates = (
        [gene_id_column]
        if gene_id_column
        else ["feature_id", "gene_ids", "gene_id", "ensembl_id", None]
    )
    for col in candidates:
        values = source.var.index if col is None else source.var.get(col)
        if values is None:
            if gene_id_column:
                raise ValueError(_no_gene_id_column(source, gene_id_column, flags))
            continue
        values = np.asarray(values).astype(str)
        if np.mean(np.char.startswith(values, "ENS")) > 0.9:
            # drop Ensembl version suffixes
            return np.array([v.split(".")[0] for v in values]), col
        if gene_id_column:
            raise ValueError(
                f"var[{gene_id_column!r}] ({_setting('gene_id_column', flags)}) "
                f"does not hold Ensembl gene ids (e.g. {values[:3].tolist()}); "
                "name a var column of Ensembl ids (ENSG...) instead"
            )
    raise ValueError(
        "no Ensembl gene ids found in var (looked at columns feature_id, gene_ids, gene_id, "
        "ensembl_id and var_names). Genes are keyed on Ensembl ids: add them (e.g. map symbols "
        "to ENSG ids), or name the column that holds them with "
        f"{_setting('gene_id_column', flags)}."
    )


def _no_gene_id_column(source: H5adInput, name: str, flags: bool) -> str:
    """The message for a gene id column the input's var lacks."""
    setting = _setting("gene_id_column", flags)
    detect = f"leave out {setting}" if flags else f"set {setting} to null"
    available = [str(c) for c in source.var.columns]
    return (
        f"var has no column {name!r} ({setting}); available: {available}."
        f"{did_you_mean(name, available)} Name a var column of Ensembl ids (ENSG...), or "
        f"{detect} to detect the id column."
    )
