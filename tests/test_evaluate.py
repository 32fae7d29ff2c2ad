"""Evaluation metrics on cases with known answers, the PCA baseline's input, and the rule's
outputs."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from scllm.eval.evaluate import evaluate, log_normalized_hvgs
from scllm.eval.metrics import (
    knn_scores,
    leiden_scores,
    masked_value_error,
    neighbors_graph,
    silhouette,
)
from scllm.eval.report import TABLE_COLUMNS

from conftest import write_heldout_files


def blobs(n_per=60, n_types=4, dim=8, spread=0.3, seed=0, n_samples=1):
    """Well-separated Gaussian clusters, one per label; samples interleaved over all clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (n_types, dim))
    labels = np.repeat([f"type{i}" for i in range(n_types)], n_per)
    X = centres[np.repeat(np.arange(n_types), n_per)] + rng.normal(
        0, spread, (n_types * n_per, dim)
    )
    samples = np.array([f"s{i % n_samples}" for i in range(len(labels))])
    return X.astype(np.float32), labels, samples


@pytest.fixture(scope="module")
def separated():
    return blobs(n_samples=3)


def test_knn_on_separated_clusters_is_perfect(separated):
    X, labels, samples = separated
    cv = knn_scores(X, labels, n_neighbors=15, n_folds=5)
    assert cv["accuracy"] == 1.0 and cv["macro_f1"] == 1.0 and cv["n_folds"] == 5
    held = knn_scores(X, labels, n_neighbors=15, groups=samples)
    assert (
        held["accuracy"] == 1.0 and held["macro_f1"] == 1.0 and held["n_folds"] == 3
    )  # one sample per fold


def test_knn_on_random_labels_is_at_chance():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(800, 10)).astype(np.float32)
    labels = rng.choice(["a", "b", "c", "d"], 800)
    cv = knn_scores(X, labels, n_neighbors=15, seed=0)
    assert abs(cv["accuracy"] - 0.25) < 0.06 and abs(cv["macro_f1"] - 0.25) < 0.07


def test_knn_held_out_samples_and_impossible_splits():
    X, labels, _ = blobs(n_types=2)
    # a sample that holds the only cells of type1 cannot be labelled from the others
    samples = np.where(labels == "type1", "s1", "s0")
    held = knn_scores(X, labels, groups=samples)
    assert held["accuracy"] == 0.0
    assert np.isnan(
        knn_scores(X, labels, groups=np.full(len(labels), "one"))["accuracy"]
    )  # one sample
    assert np.isnan(knn_scores(X, np.full(len(labels), "same"))["accuracy"])  # one label


def test_leiden_recovers_separated_clusters_and_not_random_labels(separated):
    X, labels, _ = separated
    graph = neighbors_graph(X, n_neighbors=15)
    found = leiden_scores(graph, labels, resolutions=[0.1, 0.5, 1.0])
    assert (
        found["ari"] == pytest.approx(1.0)
        and found["nmi"] == pytest.approx(1.0)
        and found["n_clusters"] == 4
    )
    random = np.random.default_rng(0).permutation(labels)
    chance = leiden_scores(graph, random, resolutions=[0.1, 0.5, 1.0])
    assert abs(chance["ari"]) < 0.05 and chance["nmi"] < 0.1


def test_neighbour_graph_is_exact_past_scanpys_dense_limit():
    """Above 8,192 cells scanpy would switch to approximate neighbours (and, with the pinned
    scipy, crash); the graph's neighbour sets match a brute-force search."""
    X = np.random.default_rng(3).normal(size=(10_000, 16)).astype(np.float32)
    graph = neighbors_graph(X, n_neighbors=15)
    distances = graph.obsp["distances"]
    assert distances.shape == (10_000, 10_000) and graph.obsp["connectivities"].nnz > 0
    for row in np.random.default_rng(4).choice(len(X), 200, replace=False):
        d = np.sqrt(((X.astype(np.float64) - X[row]) ** 2).sum(axis=1))
        d[row] = np.inf  # a cell is not its own neighbour in the graph
        nearest = np.argsort(d)[:14]
        found = distances[[row]]
        assert set(found.indices) == set(nearest), f"row {row}"
        np.testing.assert_allclose(np.sort(found.data), np.sort(d[nearest]), rtol=1e-4, atol=1e-5)


def test_neighbour_graph_below_the_limit_is_scanpys_default():
    """Small runs (the demo) keep scanpy's own graph, so their figures do not move."""
    X, _, _ = blobs(n_per=250, dim=16)
    ours = neighbors_graph(X, n_neighbors=15)
    default = ad.AnnData(obs=pd.DataFrame(index=ours.obs_names), obsm={"rep": X})
    sc.pp.neighbors(default, n_neighbors=15, use_rep="rep", random_state=0)
    for key in ("distances", "connectivities"):
        assert (ours.obsp[key] != default.obsp[key]).nnz == 0, key


def test_silhouette_known_cases(separated):
    X, labels, samples = separated
    assert silhouette(X, labels) > 0.9
    assert abs(silhouette(X, samples)) < 0.05  # samples spread over every cluster: mixed
    assert np.isnan(silhouette(X, np.full(len(labels), "one")))


def write_filtered(path, counts, genes, cells):
    var = pd.DataFrame(
        {"feature_id": genes, "feature_name": [g.lower() for g in genes]}, index=genes
    )
    ad.AnnData(
        X=sp.csr_matrix(counts, dtype=np.float32), obs=pd.DataFrame(index=cells), var=var
    ).write_h5ad(path)


def test_baseline_matrix_is_scanpys_log_normalized_hvgs(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (37, 20)) * (rng.random((37, 20)) < 0.5)
    counts[5] = 0
    counts[5, 3] = 4
    genes = [f"ENSG{i:011d}" for i in range(20)]
    cells = [f"c{i}" for i in range(37)]
    write_filtered(tmp_path / "filtered.h5ad", counts, genes, cells)
    hvgs = [genes[i] for i in (7, 2, 11, 3)]
    wanted = [cells[i] for i in (30, 1, 5, 17, 2)]  # a subset, out of file order
    got = log_normalized_hvgs(tmp_path / "filtered.h5ad", hvgs, wanted, chunk_size=8)

    ref = ad.AnnData(
        X=counts.astype(np.float32), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)
    )
    sc.pp.normalize_total(ref, target_sum=1e4)  # totals over all genes
    sc.pp.log1p(ref)
    expected = ref[wanted, hvgs].X
    assert sp.issparse(got) and got.shape == (5, 4)
    np.testing.assert_allclose(got.toarray(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="not in"):
        log_normalized_hvgs(tmp_path / "filtered.h5ad", hvgs, ["nope"])


def test_masked_value_error_reads_the_best_epoch(tmp_path):
    path = tmp_path / "epochs.tsv"
    pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "step": [10, 20, 30],
            "train_loss": [400, 300, 250],
            "val_loss": [350, 240, 260],
            "val_expr_mse": [160, 110, 120],
            "val_gepc_mse": [190, 130, 140],
            "val_mean_bin_baseline_mse": [215, 215, 215],
        }
    ).to_csv(path, sep="\t", index=False)
    assert masked_value_error(path) == {
        "epoch": 2,
        "n_epochs": 3,
        "expr_mse": 110.0,
        "gepc_mse": 130.0,
        "baseline_mse": 215.0,
    }


def test_evaluate_writes_table_and_umaps(tmp_path):
    """The rule's library call on a small labelled set: both representations separate the types."""
    rng = np.random.default_rng(3)
    n_types, n_per, n_genes = 3, 50, 30
    labels = np.repeat([f"type{i}" for i in range(n_types)], n_per)
    profile = (
        rng.gamma(1.0, 2.0, (n_types, n_genes)) * (rng.random((n_types, n_genes)) < 0.4) + 0.05
    )
    counts = rng.poisson(profile[np.repeat(np.arange(n_types), n_per)] * 5)
    genes = [f"ENSG{i:011d}" for i in range(n_genes)]
    cells = [f"c{i}" for i in range(len(labels))]
    write_filtered(tmp_path / "filtered.h5ad", counts, genes, cells)
    pd.DataFrame(
        {"feature_id": genes[:20], "feature_name": genes[:20], "rank": range(1, 21)}
    ).to_csv(tmp_path / "hvg.tsv", sep="\t", index=False)
    X, _, _ = blobs(n_per=n_per, n_types=n_types, dim=16, seed=1)
    obs = pd.DataFrame(
        {"cell_type": labels, "sample": np.where(np.arange(len(labels)) % 2, "d1", "d2")},
        index=cells,
    )
    obs.loc["c0", "cell_type"] = "unknown"  # not scored
    ad.AnnData(obs=obs, obsm={"X_scllm": X}, uns={"scllm": {"cells": "all"}}).write_h5ad(
        tmp_path / "emb.h5ad"
    )
    pd.DataFrame(
        {
            "epoch": [1],
            "step": [5],
            "train_loss": [300.0],
            "val_loss": [250.0],
            "val_expr_mse": [120.0],
            "val_gepc_mse": [130.0],
            "val_mean_bin_baseline_mse": [210.0],
        }
    ).to_csv(tmp_path / "epochs.tsv", sep="\t", index=False)
    (tmp_path / "args.json").write_text('{"data": {"n_validation_cells": 7}}')
    out = tmp_path / "evaluation"
    table = evaluate(
        tmp_path / "emb.h5ad",
        tmp_path / "filtered.h5ad",
        tmp_path / "hvg.tsv",
        tmp_path / "epochs.tsv",
        out / "metrics.tsv",
        out / "metrics.html",
        out / "umap_cell_type.png",
        out / "umap_sample.png",
        out / "per_cell_type.tsv",
        out / "confusion.tsv",
        args_json=tmp_path / "args.json",
        n_pcs=10,
        leiden_resolutions=[0.2, 0.5],
        chunk_size=40,
    )
    written = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert list(written.columns) == TABLE_COLUMNS
    metrics = written.set_index("metric")
    assert list(metrics.index) == [
        "knn_accuracy_cv",
        "knn_macro_f1_cv",
        "knn_accuracy_heldout_sample",
        "knn_macro_f1_heldout_sample",
        "leiden_ari",
        "leiden_nmi",
        "silhouette_label",
        "silhouette_sample",
        "scib_silhouette_label",
        "scib_graph_connectivity",
        "scib_silhouette_batch",
        "scib_ilisi",
        "masked_mse_expression",
        "masked_mse_gepc",
    ]
    assert metrics.loc["knn_accuracy_cv", "scllm"] == 1.0 and metrics.loc[
        "leiden_ari", "scllm"
    ] == pytest.approx(1.0)
    assert metrics.loc["knn_accuracy_heldout_sample", "scllm"] == 1.0
    assert metrics.loc["knn_accuracy_cv", "baseline"] > 0.9  # the counts separate the types too
    assert metrics.loc["knn_accuracy_cv", "cells"] == "149 (all)"
    assert metrics.loc["masked_mse_expression", "scllm"] == 120.0
    assert metrics.loc["masked_mse_expression", "baseline"] == 210.0
    assert metrics.loc["masked_mse_expression", "cells"] == "7 (validation)"
    assert "PCA-10" in metrics.loc["knn_accuracy_cv", "baseline_method"]
    assert len(table) == 14
    # two samples: the scIB batch metrics are measured, and on the scaled [0, 1] range
    scib_rows = metrics.loc[metrics.index.str.startswith("scib_"), ["scllm", "baseline"]]
    assert ((scib_rows >= 0) & (scib_rows <= 1)).all().all()
    assert metrics.loc["scib_silhouette_label", "scllm"] == pytest.approx(
        (metrics.loc["silhouette_label", "scllm"] + 1) / 2, abs=1e-5
    )
    # per cell type: one row per scored type, each method's F1 averages to its macro-F1
    per_type = pd.read_csv(out / "per_cell_type.tsv", sep="\t")
    baseline = metrics.loc["knn_accuracy_cv", "baseline_method"]
    assert list(per_type.columns) == ["cell_type", "n_cells", "scllm", baseline]
    assert sorted(per_type["cell_type"]) == ["type0", "type1", "type2"]
    assert sorted(per_type["n_cells"]) == [49, 50, 50]  # c0 (type0) has no label
    for column, side in (("scllm", "scllm"), (baseline, "baseline")):
        assert per_type[column].mean() == pytest.approx(
            metrics.loc["knn_macro_f1_cv", side], abs=1e-5
        )
    # the confusion counts: every (true, predicted) pair per method, adding up to the cells
    confusion = pd.read_csv(out / "confusion.tsv", sep="\t")
    assert list(confusion.columns) == ["method", "cell_type", "predicted", "n_cells"]
    assert confusion.groupby("method", sort=False)["n_cells"].sum().to_dict() == {
        "scllm": 149,
        baseline: 149,
    }
    right = confusion[confusion["cell_type"] == confusion["predicted"]]
    assert right.groupby("method")["n_cells"].sum()["scllm"] == 149  # kNN accuracy 1.0
    assert len(confusion) == 2 * 3 * 3
    assert "<table" in (out / "metrics.html").read_text()
    for png in ("umap_cell_type.png", "umap_sample.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no obs column 'celltype'"):
        evaluate(
            tmp_path / "emb.h5ad",
            tmp_path / "filtered.h5ad",
            tmp_path / "hvg.tsv",
            tmp_path / "epochs.tsv",
            out / "m.tsv",
            out / "m.html",
            out / "a.png",
            out / "b.png",
            label_key="celltype",
        )


# --- held-out evaluation: cells the model never saw ----------------------------------------------


def test_heldout_evaluation_embeds_new_cells_and_fits_pca_on_them(tmp_path):
    from scllm.eval.embed import embed_h5ad
    from scllm.eval.evaluate import evaluate_heldout, log_normalized_vocab_genes

    model_dir, h5ad, counts, labels = write_heldout_files(tmp_path)
    out = tmp_path / "heldout"
    out.mkdir()
    table = evaluate_heldout(
        model_dir,
        h5ad,
        out / "embeddings.h5ad",
        out / "metrics.tsv",
        out / "metrics.html",
        out / "umap.png",
        out / "per_cell_type.tsv",
        out / "confusion.tsv",
        label_key="cell_type",
        device="cpu",
        n_pcs=5,
    )
    labelled = labels != "unknown"
    groups = {name: group.set_index("metric") for name, group in table.groupby("baseline_method")}
    fitted = "PCA-5 of log-normalized vocabulary genes (fitted on these cells)"
    projected = "PCA-5 of the training cells, projected (zero-shot)"
    assert sorted(groups) == [fitted, projected]
    rows = groups[fitted]
    # the training cells' PCA finds the three types too (their gene blocks are the same)
    assert groups[projected].loc["knn_accuracy_cv", "baseline"] == 1.0
    pd.testing.assert_series_equal(groups[projected]["scllm"], rows["scllm"])  # the model's, twice
    assert rows.loc["knn_accuracy_cv", "cells"] == f"{labelled.sum()} (held out: new cells.h5ad)"
    # The three types are separable from their gene blocks: the baseline on the same cells finds
    # them.
    assert (
        rows.loc["knn_accuracy_cv", "baseline"] == 1.0
        and rows.loc["leiden_ari", "baseline"] == 1.0
    )
    assert np.isnan(rows.loc["knn_accuracy_heldout_sample", "scllm"])  # one sample
    assert "masked_mse_expression" not in rows.index  # no validation error for foreign cells
    # The embeddings are scllm embed's, obs names kept.
    emb = ad.read_h5ad(out / "embeddings.h5ad")
    embed_h5ad(model_dir, h5ad, tmp_path / "cli.h5ad", device="cpu")
    np.testing.assert_array_equal(
        emb.obsm["X_scllm"], ad.read_h5ad(tmp_path / "cli.h5ad").obsm["X_scllm"]
    )
    assert list(emb.obs_names) == [f"new{i}" for i in range(96)]
    # The baseline's input: log1p(1e4 * counts / total over all 40 genes), vocabulary genes in
    # token order.
    rows_kept = np.flatnonzero(labelled)
    matrix = log_normalized_vocab_genes(h5ad, _vocab_columns(h5ad), rows_kept)
    expected = np.log1p(1e4 * counts[rows_kept, :30] / counts[rows_kept].sum(1, keepdims=True))
    np.testing.assert_allclose(matrix.toarray(), expected, rtol=1e-5)
    assert (out / "umap.png").stat().st_size > 0 and (out / "metrics.html").exists()
    # the F1 per cell type of the model and of both baselines
    per_type = pd.read_csv(out / "per_cell_type.tsv", sep="\t").set_index("cell_type")
    assert list(per_type.columns) == ["n_cells", "scllm", fitted, projected]
    assert per_type["n_cells"].sum() == labelled.sum() and (per_type[projected] == 1.0).all()
    methods = pd.read_csv(out / "confusion.tsv", sep="\t")["method"].unique().tolist()
    assert methods == ["scllm", fitted, projected]


def _vocab_columns(h5ad):
    var_names = ad.read_h5ad(h5ad, backed="r").var_names
    return np.array([var_names.get_loc(f"ENSG{i:011d}") for i in range(30)])


def test_embeddings_without_the_label_column_name_the_setting_and_the_column_meant(tmp_path):
    from scllm.config import EvaluateConfig
    from scllm.eval.evaluate import _labelled_embeddings

    emb = ad.AnnData(np.zeros((4, 2), dtype=np.float32))
    emb.obs["celltype"], emb.obs["sample"] = ["T", "B", "T", "B"], "s1"
    emb.write_h5ad(tmp_path / "emb.h5ad")
    with pytest.raises(ValueError) as err:
        _labelled_embeddings(tmp_path / "emb.h5ad", EvaluateConfig(label_key="cell_type"))
    assert str(err.value) == (
        f"{tmp_path / 'emb.h5ad'} has no obs column 'cell_type' (evaluate.label_key): set "
        "evaluate.label_key to one of its columns, ['celltype', 'sample']. Did you mean "
        "'celltype'?"
    )


def test_heldout_evaluation_refuses_files_without_labels(tmp_path):
    from scllm.eval.evaluate import evaluate_heldout

    model_dir, h5ad, _, _ = write_heldout_files(tmp_path)
    outputs = [tmp_path / name for name in ("e.h5ad", "m.tsv", "m.html", "u.png")]
    with pytest.raises(ValueError, match="no obs column 'celltype'") as err:
        evaluate_heldout(model_dir, h5ad, *outputs, label_key="celltype", device="cpu")
    # the setting to change, the file's columns and the one meant
    assert str(err.value) == (
        f"{h5ad} has no obs column 'celltype' (heldout.label_key, the cell-type labels): set "
        "heldout.label_key to one of its columns, ['cell_type', 'donor']. Did you mean "
        "'cell_type'?"
    )
    with pytest.raises(ValueError) as err:  # no column close to it: none suggested
        evaluate_heldout(model_dir, h5ad, *outputs, label_key="annotation", device="cpu")
    assert str(err.value).endswith("one of its columns, ['cell_type', 'donor'].")
    missing = tmp_path / "nowhere.h5ad"  # heldout.path is the user's: no stage rewrites it
    with pytest.raises(ValueError) as err:
        evaluate_heldout(model_dir, missing, *outputs, label_key="cell_type", device="cpu")
    assert str(err.value) == f"{missing} does not exist; check the path"
    with pytest.raises(ValueError) as err:  # a batch column, named the same way
        evaluate_heldout(
            model_dir, h5ad, *outputs, label_key="cell_type", batch_key="donors", device="cpu"
        )
    assert str(err.value) == (
        f"{h5ad} has no obs column 'donors' (heldout.batch_key): set heldout.batch_key to one "
        "of its columns, ['cell_type', 'donor'], or null. Did you mean 'donor'?"
    )
    assert not any(path.exists() for path in outputs)


def test_heldout_evaluation_of_a_model_without_training_pca_scores_the_other_baseline(
    tmp_path, caplog
):
    """Models trained before the training PCA was kept still evaluate, with a warning."""
    from scllm.eval.evaluate import evaluate_heldout

    model_dir, h5ad, _, _ = write_heldout_files(tmp_path, training_pca=False)
    with caplog.at_level(logging.WARNING, logger="scllm"):
        table = evaluate_heldout(
            model_dir,
            h5ad,
            tmp_path / "e.h5ad",
            tmp_path / "m.tsv",
            tmp_path / "m.html",
            tmp_path / "u.png",
            label_key="cell_type",
            device="cpu",
            n_pcs=5,
        )
    assert table["baseline_method"].unique().tolist() == [
        "PCA-5 of log-normalized vocabulary genes (fitted on these cells)"
    ]
    assert "has no training_pca.npz" in caplog.text and "--forcerun training_pca" in caplog.text
