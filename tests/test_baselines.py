"""The zero-shot baseline (the training cells' PCA, kept with the model and projected onto new
cells) and the shifted copies of the transfer benchmark, against independent computations."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scllm.errors import CorruptArtifactError
from scllm.eval.baselines import (
    PCA_FILE,
    TrainingPCA,
    fit_training_pca,
    project_training_pca,
    write_training_pca,
)
from scllm.eval.shifts import (
    SHIFTS,
    Shift,
    shifted_copy,
    thin_counts,
    transfer_knn,
    transfer_table,
)

from conftest import write_heldout_files


def log_normalized(counts: np.ndarray) -> np.ndarray:
    return np.log1p(1e4 * counts / counts.sum(1, keepdims=True))


def assert_same_axes(ours: TrainingPCA, matrix: np.ndarray, n: int) -> None:
    """Mean, axes (up to sign) and projection equal numpy's SVD of the centred matrix."""
    mean = matrix.mean(0)
    _, singular, axes = np.linalg.svd(matrix - mean, full_matrices=False)
    np.testing.assert_allclose(ours.mean, mean, rtol=1e-5, atol=1e-6)
    signs = np.sign(np.sum(ours.components[:n] * axes[:n], axis=1))
    np.testing.assert_allclose(ours.components[:n] * signs[:, None], axes[:n], atol=2e-4)
    np.testing.assert_allclose(
        ours.project(sp.csr_matrix(matrix))[:, :n] * signs,
        (matrix - mean) @ axes[:n].T,
        rtol=1e-3,
        atol=1e-3,
    )


def test_training_pca_equals_an_svd_of_the_centred_cells():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(1.0, 2.0, 60), size=(300, 60)).astype(np.float64) + 1
    matrix = log_normalized(counts)
    pca = fit_training_pca(sp.csr_matrix(matrix), [f"g{i}" for i in range(60)], n_pcs=10)
    assert pca.components.shape == (10, 60) and pca.n_cells == 300
    assert_same_axes(pca, matrix, 10)


def test_the_rule_fits_the_training_cells_only_and_the_file_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.poisson(rng.gamma(1.0, 2.0, 50), size=(200, 50)).astype(np.float32) + 1
    ids = [f"ENSG{i:011d}" for i in range(50)]
    cells = [f"c{i}" for i in range(200)]
    var = pd.DataFrame({"feature_name": [f"G{i}" for i in range(50)]}, index=ids)
    ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=cells), var=var).write_h5ad(
        tmp_path / "filtered.h5ad"
    )
    vocab = [ids[i] for i in (7, 3, 40, 12, 25, 31, 0, 44, 18, 9, 21, 36)]  # 12 HVGs by rank
    pd.DataFrame({"feature_id": vocab, "feature_name": "x", "rank": range(12)}).to_csv(
        tmp_path / "hvg.tsv", sep="\t", index=False
    )
    split = np.where(np.arange(200) % 4 == 0, "validation", "train")
    pd.DataFrame({"cell": cells, "sample": "s", "split": split}).to_csv(
        tmp_path / "split.tsv", sep="\t", index=False
    )
    out = tmp_path / "model" / PCA_FILE
    write_training_pca(
        tmp_path / "filtered.h5ad", tmp_path / "hvg.tsv", tmp_path / "split.tsv", out, n_pcs=5
    )
    pca = TrainingPCA.load(out)
    assert pca.feature_ids.tolist() == vocab and pca.n_cells == 150
    train = counts[split == "train"]  # totals over all genes, then the vocabulary's columns
    matrix = log_normalized(train)[:, [ids.index(g) for g in vocab]]
    assert_same_axes(pca, matrix, 5)

    out.write_bytes(b"not an npz")
    with pytest.raises(CorruptArtifactError, match="--forcerun training_pca"):
        TrainingPCA.load(out)


def test_projection_maps_genes_as_embed_does_and_missing_genes_read_zero(tmp_path):
    model_dir, h5ad, counts, _ = write_heldout_files(tmp_path)
    pca = TrainingPCA.load(model_dir / PCA_FILE)
    adata = ad.read_h5ad(h5ad)  # vocabulary genes shuffled among 10 others
    project_training_pca(adata, model_dir)
    expected = (log_normalized(counts.astype(np.float64))[:, :30] - pca.mean) @ pca.components.T
    np.testing.assert_allclose(adata.obsm["X_pca_train"], expected, rtol=1e-4, atol=1e-4)
    # a file without five vocabulary genes: they read 0, the totals are over the genes it has
    lacking = adata[:, ~adata.var_names.isin([f"ENSG{i:011d}" for i in range(5)])].copy()
    out = project_training_pca(lacking, model_dir, copy=True, key_added="proj")
    kept = counts[:, 5:].astype(np.float64)
    values = np.zeros((96, 30))
    values[:, 5:] = log_normalized(kept)[:, :25]
    np.testing.assert_allclose(
        out.obsm["proj"], (values - pca.mean) @ pca.components.T, rtol=1e-4, atol=1e-4
    )
    assert "proj" not in lacking.obsm
    (model_dir / PCA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="--forcerun training_pca"):
        project_training_pca(adata, model_dir)


def test_thinning_keeps_integer_counts_at_the_expected_depth():
    rng = np.random.default_rng(2)
    counts = sp.csr_matrix(rng.poisson(3.0, size=(400, 300)).astype(np.float32))
    for depth in (0.5, 0.25):
        thin = thin_counts(counts, depth, seed=0)
        assert thin.dtype == counts.dtype and np.array_equal(thin.data, np.round(thin.data))
        assert (thin.toarray() <= counts.toarray()).all() and thin.data.min() > 0
        ratio = thin.sum() / counts.sum()
        assert abs(ratio - depth) < 0.01  # ~360k counts: binomial sd of the ratio ~0.001
        per_cell = np.asarray(thin.sum(1)).ravel() / np.asarray(counts.sum(1)).ravel()
        assert abs(per_cell.mean() - depth) < 0.01
    np.testing.assert_array_equal(
        thin_counts(counts, 0.5, 3).data, thin_counts(counts, 0.5, 3).data
    )
    with pytest.raises(ValueError, match="raw integer counts"):
        thin_counts(counts * 0.5, 0.5)


def test_a_coverage_shift_drops_that_share_of_the_vocabulary_and_nothing_else():
    rng = np.random.default_rng(3)
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(2.0, size=(20, 50)).astype(np.float32)),
        obs=pd.DataFrame({"t": "a"}, index=[f"c{i}" for i in range(20)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(50)]),
    )
    vocabulary = np.arange(10, 40)  # 30 vocabulary genes among 50
    out = shifted_copy(adata, Shift("genes 70%", coverage=0.7), vocabulary, 30, seed=0)
    dropped = set(adata.var_names) - set(out.var_names)
    assert len(dropped) == 9 and dropped <= {f"g{i}" for i in vocabulary}
    np.testing.assert_array_equal(out.X.toarray(), adata[:, out.var_names].X.toarray())
    assert out.obs.equals(adata.obs)


def test_transfer_knn_is_cross_fitted():
    """A copy never meets its own original: labels drawn at random give chance accuracy even
    though every shifted row equals its reference row."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 8))
    labels = rng.choice(["a", "b", "c"], 300)
    assert transfer_knn(X, X, labels)["accuracy"] < 0.5
    clustered = X.copy()
    clustered[:, :3] += 10 * (labels[:, None] == np.array(["a", "b", "c"]))
    assert transfer_knn(clustered, clustered + rng.normal(size=X.shape), labels)["accuracy"] == 1


def test_transfer_table_scores_the_model_and_the_projected_pca_at_every_shift(tmp_path):
    model_dir, h5ad, _, labels = write_heldout_files(tmp_path)
    adata = ad.read_h5ad(h5ad)
    adata = adata[labels != "unknown"].copy()
    table = transfer_table(model_dir, adata, "cell_type", seed=0)
    assert len(table) == 2 * len(SHIFTS)
    assert set(table["representation"]) == {"model", "training PCA, projected"}
    pca = table[table["representation"] == "training PCA, projected"].set_index("shift")
    assert pca.loc["none", "accuracy"] == 1.0  # gene blocks: separable by the linear baseline
    assert table[["accuracy", "macro_f1"]].apply(lambda c: c.between(0, 1)).all().all()
