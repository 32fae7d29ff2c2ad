"""filter_qc against a dense NumPy computation of the same rule: genes with total count >=
min_gene_counts, then cells expressing >= min_genes_per_cell of those genes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scllm.prep.qc import filter_qc

MIN_GENE_COUNTS, MIN_GENES_PER_CELL = 3, 5


def counts_h5ad(path, dense: np.ndarray, samples, explicit_zeros: int = 0, seed: int = 0):
    """An h5ad of raw counts (CSR) with a sample per cell; ``explicit_zeros`` stored 0 entries
    are added, as some writers leave them, and must not count as expressed genes."""
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
    on_disk = pd.read_csv(tmp_path / "qc.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)


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
