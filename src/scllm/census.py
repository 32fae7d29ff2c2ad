"""Read cells from a CELLxGENE Census (the real one by release, or a local Census-shaped store).

Both go through ``cellxgene_census.open_soma``: ``census_version=...`` for a published release,
``uri=...`` for a local SOMA store such as the one ``build_local_census`` writes from an h5ad.
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
from scllm.io import CSRWriter, Progress, atomic_path

log = logging.getLogger("scllm")

SAMPLE_KEYS = ["dataset_id", "donor_id"]  # the schema has no sample column; donor_id is per dataset
REQUIRED_OBS = ["dataset_id", "donor_id", "observation_joinid", "tissue_general", "is_primary_data"]
# Carried into cells.h5ad when the Census has them (labels for evaluation, metadata for users).
OPTIONAL_OBS = ["cell_type", "cell_type_ontology_term_id", "assay", "disease", "tissue", "sex", "development_stage"]
EMBEDDED_DEFAULT_HINT = (
    "To try the pipeline without network access, run the embedded default: "
    "`snakemake --cores 2` (config/demo.yaml), which reads a local Census-shaped store "
    "built from the shipped PBMC 3k data."
)


class CensusUnavailableError(RuntimeError):
    pass


def open_census(version: str | None = None, uri: str | None = None):
    """Open a Census release (``version``) or a local SOMA store (``uri``) with a clear error."""
    import cellxgene_census

    if uri is not None:
        if not Path(uri).exists() and "://" not in str(uri):
            raise CensusUnavailableError(f"no Census-shaped store at census.uri={uri!r}; build one with `scllm build-census`")
        return cellxgene_census.open_soma(uri=str(uri))
    try:
        return cellxgene_census.open_soma(census_version=version)
    except ValueError as err:  # raised for a version the release directory does not list
        raise CensusUnavailableError(
            f"census.census_version={version!r} is not a Census release ({err}). Pick a dated release "
            "from cellxgene_census.get_census_version_directory(), e.g. '2025-01-30'."
        ) from err
    except OSError as err:  # requests' ConnectionError and friends
        raise CensusUnavailableError(
            f"The CELLxGENE Census cannot be reached (census_version={version!r}): {type(err).__name__}. "
            "Check network access to the Census, or use a local copy (census.source: uri, census.uri: PATH). " + EMBEDDED_DEFAULT_HINT
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
            f"census.max_cells={max_cells} is smaller than every sample (the smallest has {smallest} cells), "
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
    import tiledbsoma as soma

    t0 = time.time()
    filt = value_filter(tissue_general, primary_only, disease)
    with open_census(census_version, uri) as census:
        provenance = census_provenance(census)
        organisms = list(census["census_data"].keys()) if "census_data" in census else []
        if organism not in organisms:
            raise ValueError(
                f"census.organism={organism!r} is not in this Census (it has {sorted(organisms)}); "
                "set census.organism to one of them"
            )
        exp = census["census_data"][organism]
        available = set(exp.obs.schema.names)
        missing = [c for c in REQUIRED_OBS + (["disease"] if disease else []) if c not in available]
        if missing:
            raise ValueError(
                f"the Census obs lacks columns {missing}, which sampling needs"
                + (" (disease only for the census.disease filter: set census.disease: null to drop it)"
                   if missing == ["disease"] else "")
                + ". Build the store with `scllm build-census` (or census.source: h5ad), which fills "
                "in missing Census columns from its options."
            )
        columns = ["soma_joinid"] + REQUIRED_OBS + [c for c in OPTIONAL_OBS if c in available and c not in REQUIRED_OBS]
        log.info("querying %s obs: %s", organism, filt)
        cells = exp.obs.read(value_filter=filt, column_names=columns).concat().to_pandas()
        log.info("%d cells match the filter", len(cells))
        if cells.empty:
            raise ValueError(f"no cells match the Census filter [{filt}]; check census.tissue_general/disease")
        for col in cells.columns:  # categoricals span the whole Census: keep only what we hold
            if isinstance(cells[col].dtype, pd.CategoricalDtype):
                cells[col] = cells[col].cat.remove_unused_categories()

        samples = choose_samples(cells, max_cells, seed)
        chosen = samples[samples["chosen"]]
        log.info(
            "%d samples (dataset, donor) available; chose %d holding %d cells (cap %d, seed %d)",
            len(samples), len(chosen), int(chosen["n_cells"].sum()), max_cells, seed,
        )
        too_big = samples[samples["n_cells"] > max_cells]
        for row in too_big.itertuples():
            log.warning("sample %s/%s has %d cells, more than the cap: never chosen", row.dataset_id, row.donor_id, row.n_cells)

        keep = cells.merge(chosen[SAMPLE_KEYS], on=SAMPLE_KEYS, how="inner")
        keep = keep.sort_values(SAMPLE_KEYS + ["soma_joinid"], ignore_index=True)
        obs = _cells_obs(keep)
        obs.index = unique_cell_ids(obs.index, f"the Census at {uri or census_version}")

        var = exp.ms["RNA"].var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat().to_pandas()
        var = var.sort_values("soma_joinid", ignore_index=True)
        var.index = pd.Index(var["feature_id"].astype(str).values, name=None)
        var = var[["feature_name"]].astype(str)
        check_gene_ids(var.index, f"the Census at {uri or census_version} (var feature_id)")
        var.insert(0, "feature_id", var.index.values)

        uns = {
            "census": {
                "source": str(uri) if uri else f"census_version={census_version}",
                "census_version": str(census_version or provenance.get("census_build_date", "local")),
                "provenance": provenance,
                "organism": organism,
                "value_filter": filt,
                "max_cells": int(max_cells),
                "seed": int(seed),
                "n_samples_available": int(len(samples)),
                "n_samples_chosen": int(len(chosen)),
            }
        }
        progress = Progress(0, len(keep))
        with atomic_path(out_h5ad) as tmp, CSRWriter(tmp, var=var, uns=uns) as writer:
            for sample_key, group in keep.groupby(SAMPLE_KEYS, observed=True, sort=False):
                joinids = group["soma_joinid"].to_numpy()
                for block in _read_rows(exp, joinids, chunk_size, soma):
                    writer.append(block)
                log.info("sample %s: %d cells (%d/%d written; %s)", "/".join(map(str, sample_key)), len(joinids),
                         writer.rows_written, len(keep), progress.text(writer.rows_written))
            writer.set_obs(obs)
        with atomic_path(out_samples) as tmp:
            samples.to_csv(tmp, sep="\t", index=False)
    log.info("sample_census: wrote %d cells x %d genes in %.1fs", obs.shape[0], var.shape[0], time.time() - t0)
    return ad.AnnData(obs=obs, var=var, uns=uns)


def _read_rows(exp, joinids: np.ndarray, chunk_size: int, soma):
    """Yield CSR blocks of raw counts for ``joinids`` (ascending), in that order."""
    with exp.axis_query("RNA", obs_query=soma.AxisQuery(coords=(joinids,))) as query:
        position = 0
        for block, (obs_ids, _var_ids) in query.X("raw").blockwise(axis=0, size=chunk_size).scipy():
            expected = joinids[position : position + len(obs_ids)]
            if not np.array_equal(np.asarray(obs_ids), expected):
                raise RuntimeError("Census returned cells out of the requested order")
            position += len(obs_ids)
            check_counts(block.data, "Census X/raw", ": a local store must be built from raw counts "
                         "(scllm build-census checks them)")
            yield sp.csr_matrix(block)
        if position != len(joinids):
            raise RuntimeError(f"Census returned {position} of {len(joinids)} requested cells")


def _cells_obs(cells: pd.DataFrame) -> pd.DataFrame:
    obs = cells.drop(columns=["soma_joinid"]).copy()
    for col in obs.columns:
        if obs[col].dtype == object or isinstance(obs[col].dtype, pd.CategoricalDtype):
            obs[col] = pd.Categorical(obs[col].astype(str))
    obs.insert(0, "sample", pd.Categorical(obs["dataset_id"].astype(str) + "/" + obs["donor_id"].astype(str)))
    obs["census_soma_joinid"] = cells["soma_joinid"].to_numpy()  # only valid within this release
    # (dataset_id, observation_joinid) identifies a cell across releases
    obs.index = pd.Index(obs["dataset_id"].astype(str) + ":" + obs["observation_joinid"].astype(str))
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
) -> None:
    """Write a SOMA store with the Census layout (``census_info``, ``census_data/<organism>``).

    Census obs columns already present in the h5ad (dataset_id, donor_id, tissue_general, ...)
    are kept; missing ones are filled from the arguments. Genes are keyed on Ensembl ids.
    """
    import tiledbsoma as soma
    import tiledbsoma.io

    adata = _read_input_h5ad(h5ad_path)
    adata = _census_shaped(
        adata, Path(h5ad_path).stem, dataset_id, donor_id, donor_column, cell_type_column,
        gene_id_column, counts_layer, tissue_general, is_primary_data, disease, f"the input h5ad {h5ad_path}",
    )
    log.info("building a local Census at %s from %s: %d cells x %d genes", uri, h5ad_path, adata.n_obs, adata.n_vars)
    datasets = adata.obs.groupby("dataset_id", observed=True).size()
    with atomic_path(uri) as tmp:
        tmp = str(Path(tmp).resolve())  # tiledbsoma relates member URIs on absolute paths
        soma.Collection.create(tmp).close()
        with soma.Collection.open(tmp, "w") as root:
            info = root.add_new_collection("census_info")
            root.add_new_collection("census_data")
            _write_table(info, "summary", {
                "label": ["census_schema_version", "census_build_date", "dataset_schema_version", "total_cell_count", "source_h5ad"],
                "value": ["2.1.0", time.strftime("%Y-%m-%d"), "5.2.0", str(adata.n_obs), Path(h5ad_path).name],
            }, soma)
            _write_table(info, "datasets", {
                "dataset_id": [str(d) for d in datasets.index],
                "dataset_title": [dataset_title] * len(datasets),
                "citation": [citation] * len(datasets),
                "dataset_total_cell_count": [int(n) for n in datasets.values],
            }, soma)
        t0 = time.time()
        log.info("writing %d cells x %d genes into the store", adata.n_obs, adata.n_vars)
        tiledbsoma.io.from_anndata(
            f"{tmp}/census_data/{organism}", adata, measurement_name="RNA", X_layer_name="raw"
        )
        log.info("wrote the store's cells in %.1fs", time.time() - t0)
        with soma.Collection.open(tmp, "w") as root:
            root["census_data"].set(organism, soma.Experiment.open(f"{tmp}/census_data/{organism}"), use_relative_uri=True)


def _write_table(collection, name: str, columns: dict, soma) -> None:
    table = pa.table({"soma_joinid": pa.array(np.arange(len(next(iter(columns.values())))), pa.int64()), **columns})
    # Plain string columns: categoricals written this way come back empty in tiledbsoma 2.3.
    df = collection.add_new_dataframe(
        name, schema=table.schema, index_column_names=["soma_joinid"], domain=[(0, max(table.num_rows - 1, 0))]
    )
    df.write(table)


def _read_input_h5ad(path) -> ad.AnnData:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no h5ad at {path} (census.h5ad.path); check the path")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py raises several types for damaged files
        raise ValueError(
            f"cannot read {path} as h5ad ({type(err).__name__}: {err}). The file is truncated, damaged or "
            "not an h5ad: copy or export it again (AnnData.write_h5ad) and rerun."
        ) from err


def _census_shaped(adata, default_dataset_id, dataset_id, donor_id, donor_column, cell_type_column,
                   gene_id_column, counts_layer, tissue_general, is_primary_data, disease, where) -> ad.AnnData:
    require_cells(adata.n_obs, adata.n_vars, where)  # an empty store fails deep inside tiledbsoma
    if counts_layer and counts_layer not in adata.layers:
        raise ValueError(f"the input h5ad has no layer {counts_layer!r} (census.h5ad.counts_layer, --counts-layer); "
                         f"it has {list(adata.layers.keys())}")
    X = adata.layers[counts_layer] if counts_layer else adata.X
    X = sp.csr_matrix(X, dtype=np.float32)
    layers = list(adata.layers.keys())
    check_counts(X.data, f"{'layers[' + repr(counts_layer) + ']' if counts_layer else 'X'} of the input h5ad", (
        ": point census.h5ad.counts_layer (scllm build-census --counts-layer) at the layer holding raw counts"
        + (f" (this file has layers {layers})" if layers else "")
        + (", or write the counts of adata.raw into X" if adata.raw is not None else "")))

    ids = _ensembl_ids(adata, gene_id_column)
    names = adata.var["feature_name"].astype(str).values if "feature_name" in adata.var else adata.var_names.astype(str).values
    var = pd.DataFrame({"feature_id": ids, "feature_name": names}, index=pd.Index(ids))
    check_gene_ids(var.index, where)

    src = adata.obs
    obs = pd.DataFrame(index=pd.RangeIndex(adata.n_obs).astype(str))

    def column(name, fallback):
        return src[name].astype(str).values if name in src else fallback

    obs["dataset_id"] = column("dataset_id", dataset_id or default_dataset_id) if not dataset_id else dataset_id
    if donor_column:
        if donor_column not in src:
            raise ValueError(f"obs has no column {donor_column!r} (census.h5ad.donor_column, --donor-column); "
                             f"available: {list(src.columns)}")
        obs["donor_id"] = src[donor_column].astype(str).values
    else:
        obs["donor_id"] = column("donor_id", donor_id or "donor_0") if not donor_id else donor_id
    label_col = cell_type_column or next((c for c in ("cell_type", "celltype", "cell_type_label") if c in src), None)
    if label_col is not None:
        if label_col not in src:
            raise ValueError(f"obs has no column {label_col!r} (census.h5ad.cell_type_column, --cell-type-column); "
                             f"available: {list(src.columns)}")
        obs["cell_type"] = src[label_col].astype(str).values
    obs["tissue_general"] = column("tissue_general", tissue_general)
    obs["is_primary_data"] = src["is_primary_data"].astype(bool).values if "is_primary_data" in src else is_primary_data
    obs["disease"] = column("disease", disease)
    joinids = column("observation_joinid", None) if "observation_joinid" in src else adata.obs_names.astype(str)
    # A cell is (dataset_id, observation_joinid) downstream: ids must be unique within a dataset.
    prefixes = pd.Series(obs["dataset_id"], index=obs.index).astype(str).to_numpy() + ":"
    unique = unique_cell_ids(prefixes + np.asarray(joinids, dtype=str), f"{where} (dataset_id:cell id)")
    obs["observation_joinid"] = [cell[len(prefix):] for cell, prefix in zip(unique, prefixes)]
    for col in ("assay", "sex", "tissue", "development_stage", "cell_type_ontology_term_id"):
        if col in src:
            obs[col] = src[col].astype(str).values
    return ad.AnnData(X=X, obs=obs, var=var)


def _ensembl_ids(adata, gene_id_column: str | None) -> np.ndarray:
    candidates = [gene_id_column] if gene_id_column else ["feature_id", "gene_ids", "gene_id", "ensembl_id", None]
    for col in candidates:
        values = adata.var_names if col is None else adata.var.get(col)
        if values is None:
            if gene_id_column:
                raise ValueError(f"var has no column {gene_id_column!r}; available: {list(adata.var.columns)}")
            continue
        values = np.asarray(values).astype(str)
        if np.mean(np.char.startswith(values, "ENS")) > 0.9:
            return np.array([v.split(".")[0] for v in values])  # drop Ensembl version suffixes
        if gene_id_column:
            raise ValueError(
                f"var[{gene_id_column!r}] (census.h5ad.gene_id_column) does not hold Ensembl gene ids "
                f"(e.g. {values[:3].tolist()}); name a var column of Ensembl ids (ENSG...) instead"
            )
    raise ValueError(
        "no Ensembl gene ids found in var (looked at columns feature_id, gene_ids, gene_id, ensembl_id and "
        "var_names). Genes are keyed on Ensembl ids: add them (e.g. map symbols to ENSG ids), or name the "
        "column that holds them with census.h5ad.gene_id_column (--gene-id-column)."
    )
