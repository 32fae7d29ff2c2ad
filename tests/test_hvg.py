"""select_hvg (per-sample streaming seurat_v3) against scanpy's batched highly_variable_genes."""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scllm.prep.hvg import select_hvg

N_GENES = 400
# file order deliberately not sorted: scanpy visits batches sorted, select_hvg in file order
SAMPLES = [("sB", 200), ("sA", 300), ("sC", 150)]
SORT = {
    "seurat_v3": (["highly_variable_rank", "highly_variable_nbatches"], [True, False]),
    "seurat_v3_paper": (["highly_variable_nbatches", "highly_variable_rank"], [False, True]),
}


def synthetic_counts(samples=SAMPLES, n_genes=N_GENES, seed=0) -> ad.AnnData:
    """Negative-binomial counts: gene means and gene-specific dispersions, a per-sample shift."""
    rng = np.random.default_rng(seed)
    mean = np.exp(rng.normal(0.0, 1.3, n_genes))  # gene means from ~0.05 to ~30
    size = np.exp(rng.uniform(np.log(0.1), np.log(50), n_genes))  # NB size: small = overdispersed
    blocks, labels = [], []
    for name, n in samples:
        mu = mean * np.exp(rng.normal(0, 0.3, n_genes))  # sample-specific means
        depth = rng.lognormal(0, 0.3, (n, 1))
        m = mu[None, :] * depth
        blocks.append(rng.negative_binomial(size[None, :], size[None, :] / (size[None, :] + m)))
        labels += [name] * n
    X = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    obs = pd.DataFrame(
        {"sample": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))]
    )
    ids = [f"ENSG{i:011d}" for i in range(n_genes)]
    var = pd.DataFrame(
        {"feature_id": ids, "feature_name": [f"GENE{i}" for i in range(n_genes)]}, index=ids
    )
    return ad.AnnData(X=X, obs=obs, var=var)


def scanpy_ranking(adata: ad.AnnData, flavor: str, n_top_genes: int) -> pd.DataFrame:
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = sc.pp.highly_variable_genes(
            adata.copy(), flavor=flavor, n_top_genes=n_top_genes, batch_key="sample", inplace=False
        )
    cols, ascending = SORT[flavor]
    ranked = df.sort_values(cols, ascending=ascending, na_position="last").iloc[:n_top_genes]
    assert set(ranked.index) == set(df.index[df["highly_variable"]])  # scanpy's own flag agrees
    return ranked


@pytest.fixture(scope="module")
def counts_h5ad(tmp_path_factory):
    adata = synthetic_counts()
    path = tmp_path_factory.mktemp("hvg") / "filtered.h5ad"
    adata.write_h5ad(path)
    return adata, path


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat_v3_paper"])
def test_select_hvg_equals_scanpy_batched(counts_h5ad, tmp_path, flavor):
    adata, path = counts_h5ad
    out = tmp_path / "hvg.tsv"
    table = select_hvg(path, out, n_top_genes=50, flavor=flavor)
    ref = scanpy_ranking(adata, flavor, 50)

    written = pd.read_csv(out, sep="\t", dtype={"feature_id": str, "feature_name": str})
    assert list(written["feature_id"]) == list(ref.index)  # same genes, same order
    assert list(table["feature_id"]) == list(ref.index)
    np.testing.assert_array_equal(written["rank"], np.arange(50))
    assert list(written["feature_name"]) == adata.var.loc[ref.index, "feature_name"].tolist()
    np.testing.assert_array_equal(
        written["highly_variable_nbatches"], ref["highly_variable_nbatches"]
    )
    np.testing.assert_allclose(written["highly_variable_rank"], ref["highly_variable_rank"])
    # the ranking is non-trivial: genes are found in different numbers of batches
    assert written["highly_variable_nbatches"].nunique() > 1


def test_flavors_order_differently(counts_h5ad, tmp_path):
    """seurat_v3 (median rank first) and seurat_v3_paper (batches first) give different orders,
    so the flavor named in the config matters."""
    _, path = counts_h5ad
    a = select_hvg(path, tmp_path / "a.tsv", n_top_genes=50, flavor="seurat_v3")
    b = select_hvg(path, tmp_path / "b.tsv", n_top_genes=50, flavor="seurat_v3_paper")
    assert list(a["feature_id"]) != list(b["feature_id"])


@pytest.mark.parametrize("flavor", ["seurat_v3", "seurat_v3_paper"])
def test_small_sample_left_out_with_warning(tmp_path, caplog, flavor):
    samples = [("sB", 200), ("tiny", 30), ("sA", 300), ("sC", 150)]
    adata = synthetic_counts(samples, seed=1)
    path = tmp_path / "filtered.h5ad"
    adata.write_h5ad(path)
    with caplog.at_level(logging.WARNING, logger="scllm"):
        table = select_hvg(
            path, tmp_path / "hvg.tsv", n_top_genes=50, flavor=flavor, min_cells_per_sample=50
        )
    warned = [
        r for r in caplog.records if r.levelno == logging.WARNING and "tiny" in r.getMessage()
    ]
    assert warned, [r.getMessage() for r in caplog.records]
    assert "min_cells_per_sample" in warned[0].getMessage()

    rest = adata[adata.obs["sample"] != "tiny"].copy()
    rest.obs["sample"] = rest.obs["sample"].cat.remove_unused_categories()
    ref = scanpy_ranking(rest, flavor, 50)
    assert list(table["feature_id"]) == list(ref.index)
    assert table["highly_variable_nbatches"].max() <= 3
    # and it is not what scanpy gives with the tiny sample included
    with_tiny = scanpy_ranking(adata, flavor, 50)
    assert list(with_tiny.index) != list(ref.index)


def test_n_top_genes_above_gene_count(counts_h5ad, tmp_path):
    _, path = counts_h5ad
    with pytest.raises(ValueError, match=r"hvg\.n_top_genes"):
        select_hvg(path, tmp_path / "hvg.tsv", n_top_genes=N_GENES + 1)
    assert not (tmp_path / "hvg.tsv").exists()


def test_unknown_flavor(counts_h5ad, tmp_path):
    _, path = counts_h5ad
    with pytest.raises(ValueError, match=r"hvg\.flavor"):
        select_hvg(path, tmp_path / "hvg.tsv", n_top_genes=10, flavor="seurat")


def test_ranking_ignores_last_bit_noise_between_cpus():
    """Equal variances computed on two CPUs differ in their last bits; the ranking (and so the
    vocabulary) must not follow that noise."""
    from scllm.prep.hvg import combine_batches, round_significant

    rng = np.random.default_rng(0)
    exact = rng.gamma(2.0, 1.0, (3, 200))
    exact[:, 50:60] = exact[:, [50]]  # ten genes with identical statistics: exact ties
    index = pd.Index([f"g{i}" for i in range(200)])
    noisy = exact * (
        1 + rng.uniform(-6e-15, 6e-15, exact.shape)
    )  # the AVX2 vs AVX-512 difference seen
    for flavor in ("seurat_v3", "seurat_v3_paper"):
        a, b = combine_batches(exact, 80, flavor, index), combine_batches(noisy, 80, flavor, index)
        assert list(a.index) == list(b.index)
        assert a["variances_norm"].tolist() == b["variances_norm"].tolist()  # byte-identical table
    tied = [
        g
        for g in combine_batches(noisy, 200, "seurat_v3", index).index
        if g in {f"g{i}" for i in range(50, 60)}
    ]
    assert tied == [f"g{i}" for i in range(50, 60)], "ties go to the earlier gene"
    np.testing.assert_allclose(
        round_significant(np.array([123456.7890123, -0.000123456789012, 0.0]), 4),
        [123500.0, -0.0001235, 0.0],
        rtol=1e-14,
        atol=0,
    )


def test_a_failed_loess_fit_names_the_fix_that_works(tmp_path):
    """Ten cells in which most genes hold one count (sometimes two): their (mean, variance)
    points coincide and skmisc's LOESS fails. Lowering hvg.min_cells_per_sample cannot help;
    raising qc.min_gene_counts, as the message says, does."""
    from scllm.errors import InputError
    from scllm.prep.qc import filter_qc

    rng = np.random.default_rng(0)
    varied = rng.poisson(rng.uniform(5, 80, size=150), size=(10, 150)) + 1
    ones = 1 + (rng.random((10, 300)) < 0.1)
    adata = synthetic_counts(samples=[("s0", 10)], n_genes=450)
    adata.X = sp.csr_matrix(np.hstack([varied, ones]).astype(np.float32))
    adata.write_h5ad(tmp_path / "cells.h5ad")

    def hvg_after_qc(min_gene_counts):
        filter_qc(
            tmp_path / "cells.h5ad",
            tmp_path / "filtered.h5ad",
            tmp_path / "qc.tsv",
            min_gene_counts=min_gene_counts,
            min_genes_per_cell=1,
        )
        return select_hvg(
            tmp_path / "filtered.h5ad",
            tmp_path / "hvg.tsv",
            n_top_genes=20,
            min_cells_per_sample=5,
        )

    with pytest.raises(InputError, match="LOESS fit failed") as err:
        hvg_after_qc(3)
    assert "raise qc.min_gene_counts" in str(err.value) and not (tmp_path / "hvg.tsv").exists()
    assert "hvg.min_cells_per_sample" not in str(err.value)  # not the cause here
    table = hvg_after_qc(20)  # the fix: genes counted fewer than 20 times are dropped
    assert len(table) == 20 and (tmp_path / "hvg.tsv").exists()
