"""filter_qc against a dense NumPy computation of the same rule: genes with total count >=
min_gene_counts, then cells expressing >= min_genes_per_cell of those genes, then (if set) cells
with at most max_mito_fraction of their counts in MT- genes; the per-cell table of every cell."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scllm.errors import InputError
from scllm.prep.qc import filter_qc

MIN_GENE_COUNTS, MIN_GENES_PER_CELL = 3, 5


def counts_h5ad(
    path, dense: np.ndarray, samples, explicit_zeros: int = 0, seed: int = 0, symbols=None
):
    """An h5ad of raw counts (CSR) with a sample per cell; ``explicit_zeros`` stored 0 entries
    are added, as some writers leave them, and must not count as expressed genes; ``symbols``
    go to var["feature_name"]."""
    rows, cols = np.nonzero(dense)
    data = dense[rows, cols].astype(np.float32)
    if explicit_zeros:
        zero_rows, zero_cols = np.nonzero(dense == 0)
        pick = np.random.default_rng(seed).choice(len(zero_rows), explicit_zeros, replace=False)
        rows = np.concatenate([rows, zero_rows[pick]])
        cols = np.concatenate([cols, zero_cols[pick]])
        data = np.concatenate([data, np.zeros(explicit_zeros, np.float32)])
    X = sp.csr_matrix((data, (rows, cols)), shape=dense.shape)
    X.sort_indices()
    assert (X.data == 0).sum() == explicit_zeros
    obs = pd.DataFrame({"sample": samples}, index=[f"cell{i}" for i in range(len(dense))])
    var = pd.DataFrame(index=[f"ENSG{j:011d}" for j in range(dense.shape[1])])
    if symbols is not None:
        var["feature_name"] = symbols
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
    return path


def expected(dense: np.ndarray, samples, min_gene_counts: int, min_genes_per_cell: int):
    """The rule, computed on the dense matrix."""
    genes = dense.sum(axis=0) >= min_gene_counts
    n_expressed = (dense[:, genes] > 0).sum(axis=1)
    cells = n_expressed >= min_genes_per_cell
    table = [("all", len(dense), int(cells.sum()))]
    for sample in sorted(set(samples)):
        mine = np.asarray(samples) == sample
        table.append((sample, int(mine.sum()), int((cells & mine).sum())))
    return genes, cells, n_expressed, table


def random_counts(seed=0, n_cells=60, n_genes=30):
    rng = np.random.default_rng(seed)
    # genes from rare to common, cells from sparse to rich: both thresholds bite
    rate = rng.gamma(0.4, 1.0, n_genes) * np.linspace(0.2, 3.0, n_cells)[:, None]
    dense = rng.poisson(rate).astype(np.int64)
    samples = np.array(["s2", "s1", "s3"], dtype=object)[rng.integers(0, 3, n_cells)]
    samples[:6] = "s0_empty"
    dense[:6] = 0  # a sample none of whose cells pass
    dense[:6, :2] = 1
    return dense, samples


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_filter_qc_matches_an_independent_computation(tmp_path, chunk_size):
    dense, samples = random_counts()
    src = counts_h5ad(tmp_path / "cells.h5ad", dense, samples)
    out = tmp_path / "filtered.h5ad"
    table = filter_qc(
        src,
        out,
        tmp_path / "qc.tsv",
        min_gene_counts=MIN_GENE_COUNTS,
        min_genes_per_cell=MIN_GENES_PER_CELL,
        cells_table=tmp_path / "qc_cells.tsv.gz",
        chunk_size=chunk_size,
    )
    genes, cells, n_expressed, rows = expected(dense, samples, MIN_GENE_COUNTS, MIN_GENES_PER_CELL)
    assert 0 < genes.sum() < len(genes) and 0 < cells.sum() < len(cells)  # both filters bite

    result = ad.read_h5ad(out)
    np.testing.assert_array_equal(result.X.toarray(), dense[cells][:, genes])
    assert list(result.obs_names) == [f"cell{i}" for i in np.flatnonzero(cells)]
    assert list(result.var_names) == [f"ENSG{j:011d}" for j in np.flatnonzero(genes)]
    np.testing.assert_array_equal(result.obs["total_counts"], dense[cells][:, genes].sum(axis=1))
    np.testing.assert_array_equal(result.obs["n_genes_by_counts"], n_expressed[cells])
    np.testing.assert_array_equal(result.var["total_counts"], dense[:, genes].sum(axis=0))

    assert list(zip(table["scope"], table["cells_in"], table["cells_out"], strict=True)) == rows
    assert ("s0_empty", 6, 0) in rows  # a sample that loses every cell is still reported
    assert (table["genes_in"] == dense.shape[1]).all() and (
        table["genes_out"] == genes.sum()
    ).all()
    assert (table["min_gene_counts"] == MIN_GENE_COUNTS).all()
    assert (table["min_genes_per_cell"] == MIN_GENES_PER_CELL).all()
    # one criterion on: it removed every cell that went; the mitochondrial filter is off
    removed = [cells_in - cells_out for _, cells_in, cells_out in rows]
    assert table["removed_by_min_genes_per_cell"].tolist() == removed
    assert (table["removed_by_max_mito_fraction"] == 0).all()
    assert table["max_mito_fraction"].isna().all()
    on_disk = pd.read_csv(tmp_path / "qc.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)

    # every input cell's values, passing or not; no symbols: no mitochondrial fraction
    per_cell = pd.read_csv(tmp_path / "qc_cells.tsv.gz", sep="\t")
    assert list(per_cell.columns) == [
        "obs_name", "sample", "total_counts", "n_genes", "mito_fraction", "passed",
    ]  # fmt: skip
    assert per_cell["obs_name"].tolist() == [f"cell{i}" for i in range(len(dense))]
    assert per_cell["sample"].tolist() == samples.tolist()
    np.testing.assert_array_equal(per_cell["total_counts"], dense[:, genes].sum(axis=1))
    np.testing.assert_array_equal(per_cell["n_genes"], n_expressed)
    np.testing.assert_array_equal(per_cell["passed"], cells)
    assert per_cell["mito_fraction"].isna().all()


def test_thresholds_are_inclusive(tmp_path):
    """A gene whose total equals min_gene_counts and a cell expressing exactly
    min_genes_per_cell genes are kept; one count or one gene less is dropped."""
    dense = np.zeros((4, 4), dtype=np.int64)
    dense[:, 0] = 1  # total 4
    dense[:3, 1] = 1  # total 3 = min_gene_counts: kept
    dense[:2, 2] = 1  # total 2: dropped
    dense[0, 3], dense[1, 3] = 2, 1  # total 3: kept
    src = counts_h5ad(tmp_path / "cells.h5ad", dense, ["a"] * 4)
    filter_qc(
        src, tmp_path / "f.h5ad", tmp_path / "qc.tsv", min_gene_counts=3, min_genes_per_cell=2
    )
    result = ad.read_h5ad(tmp_path / "f.h5ad")
    assert list(result.var_names) == [f"ENSG{j:011d}" for j in (0, 1, 3)]
    # expressed kept genes per cell: 3, 3, 2, 1 -> the cell with 1 is dropped
    assert list(result.obs_names) == ["cell0", "cell1", "cell2"]
    np.testing.assert_array_equal(result.obs["n_genes_by_counts"], [3, 3, 2])


def test_stored_zeros_are_not_expressed_genes(tmp_path):
    dense, samples = random_counts(seed=1)
    plain = counts_h5ad(tmp_path / "plain.h5ad", dense, samples)
    zeros = counts_h5ad(tmp_path / "zeros.h5ad", dense, samples, explicit_zeros=80)
    for name, src in (("plain", plain), ("zeros", zeros)):
        filter_qc(
            src,
            tmp_path / f"{name}_f.h5ad",
            tmp_path / f"{name}.tsv",
            min_gene_counts=3,
            min_genes_per_cell=5,
            chunk_size=9,
        )
    a, b = ad.read_h5ad(tmp_path / "plain_f.h5ad"), ad.read_h5ad(tmp_path / "zeros_f.h5ad")
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    np.testing.assert_array_equal(a.obs["n_genes_by_counts"], b.obs["n_genes_by_counts"])
    assert (b.X.data != 0).all()  # the written matrix stores no zeros


def test_zero_thresholds_keep_everything(tmp_path):
    dense, samples = random_counts(seed=2)
    src = counts_h5ad(tmp_path / "cells.h5ad", dense, samples)
    table = filter_qc(
        src, tmp_path / "f.h5ad", tmp_path / "qc.tsv", min_gene_counts=0, min_genes_per_cell=0
    )
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "f.h5ad").X.toarray(), dense)
    assert table.loc[table.scope == "all", ["cells_in", "cells_out"]].values.tolist() == [[60, 60]]


# --- the mitochondrial fraction ------------------------------------------------------------------

MAX_MITO = 0.3


def mito_counts(seed=3, n_cells=80, n_genes=30):
    """Counts whose cells range from no to mostly mitochondrial counts, with symbols: MT- genes
    in either case, look-alikes that are not mitochondrial, and a rare MT- gene the gene filter
    drops."""
    dense, samples = random_counts(seed, n_cells, n_genes)
    symbols = np.array([f"GENE{j}" for j in range(n_genes)], dtype=object)
    symbols[[3, 7, 11]] = ["MT-CO1", "mt-Nd1", "Mt-Atp6"]  # mitochondrial, any case
    symbols[[4, 5, 6]] = ["MTRNR2L8", "MTOR", "SMT-1"]  # not: no dash, or not at the start
    symbols[12] = "MT-RARE"
    rng = np.random.default_rng(seed)
    dense[:, [3, 7, 11]] = rng.poisson(np.linspace(0, 12, n_cells)[:, None], (n_cells, 3))
    dense[:, 12] = 0
    dense[7, 12] = 1  # total 1 < MIN_GENE_COUNTS: dropped, so not in any fraction
    return dense, samples, symbols


def expected_mito(dense, samples, symbols, max_mito):
    """Per cell: total counts, genes, mitochondrial fraction over the kept genes, and which
    criterion removed it (genes first, then the fraction), by a dense computation."""
    genes = dense.sum(axis=0) >= MIN_GENE_COUNTS
    kept = dense[:, genes]
    mito = np.array([s.upper().startswith("MT-") for s in symbols])[genes]
    totals = kept.sum(axis=1)
    with np.errstate(invalid="ignore"):
        fraction = np.where(totals > 0, kept[:, mito].sum(axis=1) / totals, np.nan)
    too_few = (kept > 0).sum(axis=1) < MIN_GENES_PER_CELL
    too_much = ~too_few & (fraction > max_mito)
    return genes, totals, (kept > 0).sum(axis=1), fraction, too_few, too_much


def qc_of_mito_counts(tmp_path, max_mito_fraction, chunk_size=1000, change=None):
    """filter_qc on ``mito_counts()`` (after ``change(dense)``, if given): (the QC table, the
    per-cell table)."""
    dense, samples, symbols = mito_counts()
    if change is not None:
        change(dense)
    src = counts_h5ad(tmp_path / "cells.h5ad", dense, samples, symbols=symbols)
    table = filter_qc(
        src,
        tmp_path / "f.h5ad",
        tmp_path / "qc.tsv",
        min_gene_counts=MIN_GENE_COUNTS,
        min_genes_per_cell=MIN_GENES_PER_CELL,
        max_mito_fraction=max_mito_fraction,
        cells_table=tmp_path / "qc_cells.tsv.gz",
        chunk_size=chunk_size,
    )
    return table, pd.read_csv(tmp_path / "qc_cells.tsv.gz", sep="\t")


@pytest.mark.parametrize("chunk_size", [9, 1000])
def test_max_mito_fraction_matches_an_independent_computation(tmp_path, chunk_size, caplog):
    with caplog.at_level(logging.INFO, logger="scllm"):
        table, per_cell = qc_of_mito_counts(tmp_path, MAX_MITO, chunk_size)
    dense, samples, symbols = mito_counts()
    genes, totals, n_genes, fraction, too_few, too_much = expected_mito(
        dense, samples, symbols, MAX_MITO
    )
    passed = ~(too_few | too_much)
    assert too_few.sum() > 0 and too_much.sum() > 0 and passed.sum() > 0  # both criteria bite

    result = ad.read_h5ad(tmp_path / "f.h5ad")
    assert list(result.obs_names) == [f"cell{i}" for i in np.flatnonzero(passed)]
    np.testing.assert_array_equal(result.X.toarray(), dense[passed][:, genes])

    assert len(per_cell) == len(dense)  # every input cell
    np.testing.assert_array_equal(per_cell["total_counts"], totals)
    np.testing.assert_array_equal(per_cell["n_genes"], n_genes)
    np.testing.assert_allclose(per_cell["mito_fraction"], fraction, rtol=1e-5)  # 6 digits
    np.testing.assert_array_equal(per_cell["passed"], passed)

    all_row = table.iloc[0]
    assert all_row["scope"] == "all"
    assert (all_row["cells_in"], all_row["cells_out"]) == (len(dense), passed.sum())
    assert all_row["removed_by_min_genes_per_cell"] == too_few.sum()
    assert all_row["removed_by_max_mito_fraction"] == too_much.sum()
    for _, row in table.iloc[1:].iterrows():
        mine = samples == row["scope"]
        assert row["cells_in"] == mine.sum() and row["cells_out"] == (passed & mine).sum()
        assert row["removed_by_min_genes_per_cell"] == (too_few & mine).sum()
        assert row["removed_by_max_mito_fraction"] == (too_much & mine).sum()
    assert (table["max_mito_fraction"] == MAX_MITO).all()
    on_disk = pd.read_csv(tmp_path / "qc.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)

    summary = [r.getMessage() for r in caplog.records if "cells 80 ->" in r.getMessage()]
    assert summary == [
        f"filter_qc: cells 80 -> {passed.sum()} (removed: {too_few.sum()} by "
        f"min_genes_per_cell={MIN_GENES_PER_CELL}, {too_much.sum()} by max_mito_fraction=0.3), "
        f"genes 30 -> {genes.sum()} (min_gene_counts={MIN_GENE_COUNTS})"
        + summary[0][summary[0].rindex(" in ") :]
    ]


def test_the_fraction_is_recorded_with_the_filter_off(tmp_path):
    """Off, no cell is removed for its fraction, but the fraction is still measured (for the
    QC plots, to choose a threshold)."""
    table, per_cell = qc_of_mito_counts(tmp_path, None)
    _, _, _, fraction, too_few, _ = expected_mito(*mito_counts(), np.inf)
    np.testing.assert_allclose(per_cell["mito_fraction"], fraction, rtol=1e-5)
    np.testing.assert_array_equal(per_cell["passed"], ~too_few)
    assert table["removed_by_max_mito_fraction"].eq(0).all()
    assert table["max_mito_fraction"].isna().all()


def test_a_cell_without_counts_has_no_fraction_and_stays(tmp_path):
    """0/0 is no fraction: the filter leaves such a cell be. The threshold is inclusive: 0.5
    passes at max_mito_fraction 0.5."""
    dense = np.array([[5, 1, 0], [0, 0, 0], [1, 4, 3], [1, 1, 0]])
    src = counts_h5ad(tmp_path / "c.h5ad", dense, ["a"] * 4, symbols=["MT-CO1", "B", "C"])
    filter_qc(
        src,
        tmp_path / "f.h5ad",
        tmp_path / "qc.tsv",
        min_gene_counts=0,
        min_genes_per_cell=0,
        max_mito_fraction=0.5,
        cells_table=tmp_path / "qc_cells.tsv.gz",
    )
    per_cell = pd.read_csv(tmp_path / "qc_cells.tsv.gz", sep="\t")
    np.testing.assert_allclose(per_cell["mito_fraction"], [5 / 6, np.nan, 1 / 8, 0.5], rtol=1e-5)
    assert per_cell["passed"].tolist() == [False, True, True, True]
    assert list(ad.read_h5ad(tmp_path / "f.h5ad").obs_names) == ["cell1", "cell2", "cell3"]


def outputs_left(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "cells.h5ad")


@pytest.mark.parametrize(
    "symbols, message",
    [
        (None, r"no 'feature_name' column.*rerun it, or set qc\.max_mito_fraction: null"),
        (
            [f"GENE{j}" for j in range(30)],
            r"none of the 30 gene symbols.*starts with 'MT-'.*set qc\.max_mito_fraction: null",
        ),
    ],
    ids=["no symbols", "no MT- genes"],
)
def test_the_filter_refuses_data_where_it_cannot_find_mitochondrial_genes(
    tmp_path, symbols, message
):
    dense, samples = random_counts()
    src = counts_h5ad(tmp_path / "cells.h5ad", dense, samples, symbols=symbols)
    with pytest.raises(InputError, match=message):
        filter_qc(
            src,
            tmp_path / "f.h5ad",
            tmp_path / "qc.tsv",
            max_mito_fraction=0.2,
            cells_table=tmp_path / "qc_cells.tsv.gz",
        )
    assert outputs_left(tmp_path) == []


def only_the_rare_mito_gene(dense):
    dense[:, [3, 7, 11]] = 0


def mito_in_every_cell(dense):
    dense[:, 3] += 1


@pytest.mark.parametrize(
    "change, max_mito, message",
    [
        # every MT- gene but the rare one is silent: the gene filter drops all four
        (only_the_rare_mito_gene, 0.2, r"all 4 mitochondrial genes have a total count below"),
        (mito_in_every_cell, 1e-6, r"no cell passes qc\.max_mito_fraction=1e-06.*raise"),
    ],
    ids=["all mitochondrial genes dropped", "no cell passes"],
)
def test_a_filter_that_could_not_work_is_named(tmp_path, change, max_mito, message):
    with pytest.raises(ValueError, match=message):
        qc_of_mito_counts(tmp_path, max_mito, change=change)
    assert outputs_left(tmp_path) == []


@pytest.mark.parametrize("value", [0, -0.1, 1.5, True, "0.2", float("nan")])
def test_max_mito_fraction_must_be_a_fraction(tmp_path, value):
    dense, samples, symbols = mito_counts()
    src = counts_h5ad(tmp_path / "cells.h5ad", dense, samples, symbols=symbols)
    with pytest.raises(InputError, match=r"qc\.max_mito_fraction must be a fraction in \(0, 1\]"):
        filter_qc(src, tmp_path / "f.h5ad", tmp_path / "qc.tsv", max_mito_fraction=value)
    assert outputs_left(tmp_path) == []
