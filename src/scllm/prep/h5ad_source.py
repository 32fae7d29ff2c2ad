"""Sampling your own h5ad directly (``census.source: h5ad``), by the Census' rules: the same
cells.h5ad and samples.tsv as building a local Census from it (``scllm.prep.store``) and sampling
that (``scllm.prep.census``), in one pass over the file and without the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scllm.checks import check_counts
from scllm.config import H5adConfig, SamplingConfig, split_settings
from scllm.files import Progress, atomic_path, temporary_sibling
from scllm.h5ad import CSRWriter, H5adInput
from scllm.prep.census import (
    OPTIONAL_OBS,
    REQUIRED_OBS,
    sample_census,
    select,
    value_filter,
    write_samples_tsv,
)
from scllm.prep.store import INGEST_BLOCK_NNZ, build_local_census, census_shaped, counts_fix

log = logging.getLogger("scllm")


def sample_h5ad(
    h5ad_path: str | Path,
    out_h5ad: str | Path,
    out_samples: str | Path,
    *,
    block_nnz: int = INGEST_BLOCK_NNZ,
    **settings,
) -> ad.AnnData:
    """``sample_census`` on your own h5ad, read directly, in one pass over the file.

    The same cells.h5ad and samples.tsv as building a local Census from it
    (``build_local_census``, with the same settings; missing tissue_general/disease filled from
    the filter) and sampling that. The input is read once, in row blocks of at most
    ``chunk_size`` cells and ``block_nnz`` values; each block's chosen cells go straight to their
    rows in cells.h5ad, whose layout (sample by sample) is known from the row lengths before any
    value is read. Memory: obs, var and one block. A CSC matrix cannot be read by rows; it goes
    through a temporary local Census instead (slower, same memory bound).

    Parameters
    ----------
    h5ad_path : str or Path
        Your h5ad (raw counts in X or a layer).
    out_h5ad : str or Path
        cells.h5ad to write.
    out_samples : str or Path
        samples.tsv to write.
    block_nnz : int, default INGEST_BLOCK_NNZ
        Stored values read at a time at the most.
    **settings
        The fields of ``SamplingConfig`` and ``H5adConfig.COLUMNS``, as keywords.

    Returns
    -------
    anndata.AnnData
        The obs/var shell of what was written (no X).

    Raises
    ------
    ValueError
        Unknown settings, a named obs or var column the file lacks, no Ensembl gene ids, no
        cells matching the filter, or no sample under the cap.
    InputError
        Counts that are not raw counts, no such layer, repeated gene ids, or cells without a
        sample.
    """
    sampling, columns, unknown = split_settings(settings, SamplingConfig, H5adConfig)
    unknown.update({k: v for k, v in columns.items() if k not in H5adConfig.COLUMNS})
    if unknown:
        known = sorted({f.name for f in fields(SamplingConfig)} | set(H5adConfig.COLUMNS))
        raise ValueError(f"unknown census settings {sorted(unknown)}; known: {known}")
    sampling = SamplingConfig(**sampling)
    # One pass gives what two steps would: build_local_census on the file (as primary data;
    # tissue_general and disease filled in from the filter where the file lacks them), then
    # sample_census on that store. These are their settings; a CSC input takes the two steps.
    cells = H5adConfig(
        **columns,
        tissue_general=sampling.tissue_general,
        disease=sampling.disease or "normal",
        organism=sampling.organism,
    )
    return _sample_in_one_pass(h5ad_path, (out_h5ad, out_samples), cells, sampling, block_nnz)


def _sample_in_one_pass(
    h5ad_path, outputs: tuple, cells: H5adConfig, sampling: SamplingConfig, block_nnz: int
) -> ad.AnnData:
    """``sample_h5ad`` with its settings as the two steps it stands for take them (``cells``:
    build_local_census', ``sampling``: sample_census'); ``outputs``: cells.h5ad, samples.tsv.
    obs and var are shaped as such a store would hold them, the cells chosen on them, and their
    counts copied in one pass."""
    t0 = time.time()
    where = f"the input h5ad {h5ad_path}"
    filt = value_filter(sampling.tissue_general, sampling.primary_only, sampling.disease)
    with H5adInput(h5ad_path) as source:
        shaped, var_in, matrix = census_shaped(source, cells, where)
        if matrix.layout == "csc":
            log.info(
                "%s stores %s column by column (CSC), which cannot be read by cells: "
                "going through a temporary local Census "
                "(write your h5ad as CSR to skip this step)",
                h5ad_path,
                matrix.name,
            )
            source.close()
            return _sample_through_store(h5ad_path, outputs, cells, sampling, block_nnz)
        samples, obs, chosen = _choose_input_rows(source, matrix, shaped, filt, where, sampling)
        # Before writing, drop the input's shaped obs (a million cells' worth); the filtered and
        # chosen copies went with _choose_input_rows: only cells.h5ad's obs stays.
        del shaped
        var = var_in[["feature_name"]].astype(str)
        var.insert(0, "feature_id", var.index.values)
        uns = _input_uns(h5ad_path, source.n_obs, filt, samples, sampling)
        out = _CellsFile(Path(outputs[0]), obs, var, uns)
        _write_chosen_rows(out, source, matrix, chosen, block_nnz, sampling.chunk_size)
        write_samples_tsv(samples, outputs[1])
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
    source, matrix, shaped: pd.DataFrame, filt: str, where: str, sampling: SamplingConfig
):
    """The samples (all, and which were chosen), cells.h5ad's obs and the input rows of the chosen
    cells in cells.h5ad's order. Its copies of obs (matching cells, chosen cells) go on return."""
    log.info(
        "reading %s: %d cells x %d genes (%s, %s); filter: %s",
        source.path,
        source.n_obs,
        source.n_vars,
        matrix.name,
        matrix.layout,
        filt,
    )
    cells = _matching_cells(shaped, sampling, filt)
    samples, keep, obs = select(cells, sampling.max_cells, sampling.seed, where)
    return samples, obs, keep["soma_joinid"].to_numpy()


def _input_uns(
    h5ad_path, n_obs: int, filt: str, samples: pd.DataFrame, sampling: SamplingConfig
) -> dict:
    """cells.h5ad's uns["census"] for cells sampled straight from an h5ad."""
    return {
        "census": {
            "source": str(h5ad_path),
            "census_version": "local",
            "organism": sampling.organism,
            "value_filter": filt,
            "provenance": {"source_h5ad": Path(h5ad_path).name, "total_cell_count": str(n_obs)},
            "max_cells": int(sampling.max_cells),
            "seed": int(sampling.seed),
            "n_samples_available": int(len(samples)),
            "n_samples_chosen": int(samples["chosen"].sum()),
        }
    }


@dataclass(frozen=True)
class _CellsFile:
    """cells.h5ad as sampling writes it: where, and its obs, var and uns (X comes in blocks)."""

    path: Path
    obs: pd.DataFrame
    var: pd.DataFrame
    uns: dict


def _write_chosen_rows(
    out: _CellsFile, source, matrix, chosen: np.ndarray, block_nnz: int, chunk_size: int
) -> None:
    """cells.h5ad from the input rows ``chosen`` (in output order), in one pass over the input.

    X is laid out from the stored row lengths before any value is read. A row that stores zeros
    or repeated genes is shorter once written: then every row's values are counted first and
    the file is written again.
    """
    # Where each input row goes in cells.h5ad (-1: not chosen).
    out_row = np.full(source.n_obs, -1, dtype=np.int64)
    out_row[chosen] = np.arange(len(chosen))
    blocks = (block_nnz, chunk_size)
    try:
        _write_cells(out, matrix.row_nnz(block_nnz)[chosen], matrix, out_row, blocks, source)
    except _RowLengthsChanged:
        log.info(
            "%s of %s stores zeros or repeated genes; counting every row's values first",
            matrix.name,
            source.path,
        )
        row_nnz = matrix.row_nnz(block_nnz, canonical=True)[chosen]
        _write_cells(out, row_nnz, matrix, out_row, blocks, source)


def _matching_cells(shaped: pd.DataFrame, sampling: SamplingConfig, filt: str) -> pd.DataFrame:
    """The cells of a Census-shaped obs that pass the filter, numbered by input row (soma_joinid),
    as a store built from the same file would number them."""
    match = shaped["tissue_general"].astype(str) == sampling.tissue_general
    if sampling.primary_only:
        match &= shaped["is_primary_data"].astype(bool)
    if sampling.disease:
        match &= shaped["disease"].astype(str) == sampling.disease
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


def _write_cells(out: _CellsFile, row_nnz, matrix, out_row, blocks: tuple, source) -> None:
    """cells.h5ad with X sized for ``row_nnz`` values per row, filled in one pass over the
    input; ``blocks``: (values, cells) at most per block read."""
    with atomic_path(out.path) as tmp, CSRWriter(tmp, var=out.var, uns=out.uns) as writer:
        writer.reserve(row_nnz)
        _scatter_rows(matrix, out_row, writer, *blocks, source)
        writer.set_obs(out.obs)


def _scatter_rows(
    matrix, out_row: np.ndarray, writer: CSRWriter, block_nnz: int, chunk_size: int, source
) -> None:
    """One pass over the input in row blocks: each block's chosen rows, checked, into their place.
    Within a block the rows of one sample are consecutive in the output, so a block costs one
    write per sample it holds."""
    fix = counts_fix(source)
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
    h5ad_path, outputs: tuple, cells: H5adConfig, sampling: SamplingConfig, block_nnz: int
) -> ad.AnnData:
    """sample_census on a local Census built from the h5ad in a temporary folder beside the
    output, removed afterwards (and on the next run, if a killed run left it)."""
    out_h5ad, out_samples = outputs
    with temporary_sibling(Path(out_h5ad).parent / "census_store") as store:
        build_local_census(h5ad_path, store, cells, block_nnz=block_nnz)
        return sample_census(out_h5ad, out_samples, sampling, uri=str(store))
