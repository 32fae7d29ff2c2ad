"""How good is a representation of cells? Label-aware metrics, the PCA baseline they are
compared with, and the pretraining objective's own error.

- kNN cell-type accuracy and macro-F1: scikit-learn ``KNeighborsClassifier`` predictions from
  stratified k-fold cross-validation, and, with several samples, from folds that hold out whole
  samples (a new donor's cells are labelled by the other donors' cells);
- ARI and NMI of Leiden clusters (scanpy's exact kNN graph + igraph Leiden) against the labels;
  the resolution is picked from a grid by the best NMI, as scib does, for both representations;
- per-label F1 and the confusion counts of the same cross-validated kNN predictions
  (``per_label_f1``, ``confusion_counts``): which cell types a representation confuses;
- silhouette width by label (higher: cell types separate) and by sample (near 0: samples mix);
- the scIB metrics as scib-metrics defines them (``scib_scores``, ``scllm.eval.scib``): the
  rescaled label silhouette, graph connectivity, and with several samples the batch silhouette
  within labels and iLISI, so figures compare with published integration tables;
- ``pca_baseline``: scanpy PCA of a cells x genes matrix (never densified);
- ``masked_value_error``: the best epoch's validation masked MSE and its mean-bin baseline, from
  pretrain's ``epochs.tsv``.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger("scllm")


def knn_scores(
    X: np.ndarray, labels, *, n_neighbors: int = 15, n_folds: int = 5, seed: int = 0, groups=None
) -> dict:
    """Accuracy and macro-F1 of kNN label predictions made out of fold.

    ``groups`` None: stratified ``n_folds``-fold cross-validation (fewer folds when even the most
    frequent label has fewer than ``n_folds`` cells). Otherwise folds hold out whole groups
    (samples): one group per fold, or ``n_folds`` group folds when there are more groups.
    Returns NaN scores when the split is impossible (fewer than two labels; with ``groups``, one
    group; without, no label with two cells).

    Parameters
    ----------
    X : numpy.ndarray
        Cells x dimensions.
    labels : array-like
        Each cell's label (compared as strings).
    n_neighbors : int
        The classifier's k, lowered to the smallest training fold's size where that is smaller.
    n_folds : int
        The most folds to make.
    seed : int
        Seed of the stratified folds' shuffle.
    groups : array-like, optional
        Each cell's group (sample); given, folds hold out whole groups.

    Returns
    -------
    dict
        ``accuracy`` and ``macro_f1`` (the mean of ``per_label_f1``), ``n_folds`` (the folds
        made, 0 when none could be) and ``predictions`` (each cell's out-of-fold predicted label,
        None when none could be made).
    """
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import (
        GroupKFold,
        LeaveOneGroupOut,
        StratifiedKFold,
        cross_val_predict,
    )
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels).astype(str)
    nan = {"accuracy": np.nan, "macro_f1": np.nan, "n_folds": 0, "predictions": None}
    if len(np.unique(labels)) < 2:
        return nan
    if groups is None:
        counts = pd.Series(labels).value_counts()
        folds = int(min(n_folds, counts.max()))
        if folds < 2:
            return nan
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        split_groups = None
    else:
        split_groups = np.asarray(groups).astype(str)
        n_groups = len(np.unique(split_groups))
        if n_groups < 2:
            return nan
        cv = LeaveOneGroupOut() if n_groups <= n_folds else GroupKFold(n_splits=n_folds)
        folds = min(n_groups, n_folds)
    with warnings.catch_warnings():
        # "The least populated class in y has only N members": rare labels, still scored
        warnings.filterwarnings(
            "ignore", message="The least populated class", category=UserWarning
        )
        smallest_train = min(len(train) for train, _ in cv.split(X, labels, split_groups))
        k = max(1, min(n_neighbors, smallest_train))
        pred = cross_val_predict(
            KNeighborsClassifier(n_neighbors=k), X, labels, cv=cv, groups=split_groups
        )
    return {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(per_label_f1(labels, pred).mean()),
        "n_folds": folds,
        "predictions": pred,
    }


def confusion_counts(labels, predictions) -> pd.DataFrame:
    """How many cells of each label got each predicted label.

    Parameters
    ----------
    labels, predictions : array-like
        Each cell's true and predicted label.

    Returns
    -------
    pandas.DataFrame
        Labels (rows, the true label) x labels (columns, the predicted one), sorted, counts;
        every label of ``labels`` appears on both sides, zeros included.

    Raises
    ------
    ValueError
        A prediction is a label no cell has (its cells would be dropped from the counts).
    """
    from sklearn.metrics import confusion_matrix

    labels, predictions = np.asarray(labels).astype(str), np.asarray(predictions).astype(str)
    names = np.unique(labels)
    foreign = np.setdiff1d(predictions, names)
    if len(foreign):  # confusion_matrix would drop those cells and inflate every F1
        raise ValueError(
            f"predictions hold labels no cell has ({', '.join(foreign[:5])}): a classifier "
            "trained on these cells' labels predicts only those; check the labels passed"
        )
    counts = confusion_matrix(labels, predictions, labels=names)
    return pd.DataFrame(counts, index=names, columns=names)


def f1_from_counts(square: pd.DataFrame) -> pd.Series:
    """Each label's F1 from a true x predicted count table (``confusion_counts``).

    Parameters
    ----------
    square : pandas.DataFrame
        Counts, rows the true label, columns the predicted one, in the same order.

    Returns
    -------
    pandas.Series
        Per label (the rows' index): 2 x correct / (its cells + the cells predicted as it), 0
        where both are 0; the mean is the macro-F1.
    """
    counts = square.to_numpy(dtype=float)
    correct = np.diag(counts)
    denominator = counts.sum(axis=1) + counts.sum(axis=0)
    f1 = np.divide(2 * correct, denominator, out=np.zeros_like(correct), where=denominator > 0)
    return pd.Series(f1, index=square.index, dtype=float)


def per_label_f1(labels, predictions) -> pd.Series:
    """Each label's F1 (0 for a label never predicted right); their mean is the macro-F1.

    Parameters
    ----------
    labels : array-like
        What each cell is.
    predictions : array-like
        What a classifier said it is (e.g. ``knn_scores``' out-of-fold ``predictions``).

    Returns
    -------
    pandas.Series
        F1 per label, indexed by the labels in sorted order.
    """
    return f1_from_counts(confusion_counts(labels, predictions))


# Silhouettes above this many cells are estimated on a seeded sample of them (their cost grows
# with the square of the cells).
SILHOUETTE_MAX_CELLS = 20_000


def silhouette(
    X: np.ndarray, labels, *, seed: int = 0, max_cells: int = SILHOUETTE_MAX_CELLS
) -> float:
    """scikit-learn's mean silhouette width (Euclidean) of ``labels``; NaN for < 2 or
    all-distinct labels. Above ``max_cells`` cells it is estimated on a seeded random sample of
    that size.

    Parameters
    ----------
    X : numpy.ndarray
        Cells x dimensions.
    labels : array-like
        Each cell's label or sample (compared as strings).
    seed : int
        Seed of the cell sample.
    max_cells : int
        Above this many cells, the silhouette of a sample of this many.

    Returns
    -------
    float
        In [-1, 1]; NaN when fewer than two labels, or as many labels as cells.
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels).astype(str)
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(labels):
        return np.nan
    sample = max_cells if len(labels) > max_cells else None
    return float(silhouette_score(X, labels, sample_size=sample, random_state=seed))


def neighbors_graph(X: np.ndarray, *, n_neighbors: int = 15, seed: int = 0):
    """An AnnData holding ``X`` and scanpy's exact kNN graph on it (for Leiden and UMAP).

    Parameters
    ----------
    X : numpy.ndarray
        Cells x dimensions.
    n_neighbors : int
        The graph's k, lowered to the number of cells - 1 where that is smaller.
    seed : int
        scanpy's ``random_state``.

    Returns
    -------
    anndata.AnnData
        No genes; ``X`` (float32) in ``obsm["rep"]``, the graph in ``obsp["distances"]`` and
        ``obsp["connectivities"]``.
    """
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(
        obs=pd.DataFrame(index=pd.RangeIndex(len(X)).astype(str)),
        obsm={"rep": np.asarray(X, np.float32)},
    )
    # transformer="sklearn": scanpy's exact brute-force kNN at every size. Left to choose, scanpy
    # takes it below 8,192 cells only and pynndescent above, whose csr_array distances its own
    # graph code cannot read under the pinned scipy (AttributeError: no getnnz).
    sc.pp.neighbors(
        adata,
        n_neighbors=min(n_neighbors, len(X) - 1),
        use_rep="rep",
        transformer="sklearn",
        random_state=seed,
    )
    return adata


def leiden_scores(
    graph, labels, *, resolutions=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), seed: int = 0
) -> dict:
    """ARI and NMI of Leiden clusters against ``labels`` at the resolution (of ``resolutions``)
    with the best NMI; ``graph`` is an AnnData from ``neighbors_graph``.

    Parameters
    ----------
    graph : anndata.AnnData
        ``neighbors_graph``'s AnnData. Each resolution's clusters are written to its
        ``obs["leiden"]``, which holds the last resolution's afterwards.
    labels : array-like
        Each cell's label (compared as strings).
    resolutions : sequence of float
        The Leiden resolutions to try.
    seed : int
        Leiden's ``random_state``.

    Returns
    -------
    dict
        At the resolution with the best NMI (the first of equals): ``nmi``, ``ari``,
        ``resolution`` and ``n_clusters``; None when ``resolutions`` is empty.
    """
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels).astype(str)
    best = None
    for res in resolutions:
        sc.tl.leiden(
            graph,
            resolution=res,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=seed,
            key_added="leiden",
        )
        clusters = graph.obs["leiden"].to_numpy()
        nmi = normalized_mutual_info_score(labels, clusters)
        if best is None or nmi > best["nmi"]:
            best = {
                "nmi": float(nmi),
                "ari": float(adjusted_rand_score(labels, clusters)),
                "resolution": res,
                "n_clusters": int(len(np.unique(clusters))),
            }
    return best


def umap_coords(graph, *, seed: int = 0) -> np.ndarray:
    """scanpy's UMAP of a kNN graph.

    Parameters
    ----------
    graph : anndata.AnnData
        ``neighbors_graph``'s AnnData; the UMAP is added to it (``obsm["X_umap"]``).
    seed : int
        UMAP's ``random_state``.

    Returns
    -------
    numpy.ndarray
        Cells x 2.
    """
    import scanpy as sc

    sc.tl.umap(graph, random_state=seed)
    return graph.obsm["X_umap"]


def score_representation(
    X: np.ndarray,
    labels,
    samples,
    *,
    n_neighbors=15,
    n_folds=5,
    leiden_resolutions=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
    seed=0,
    umap=True,
) -> tuple[dict, np.ndarray | None]:
    """Every label metric for one representation, and its UMAP coordinates.

    Parameters
    ----------
    X : numpy.ndarray
        Cells x dimensions.
    labels, samples : array-like
        Each cell's label (cell type) and sample.
    n_neighbors, n_folds, leiden_resolutions, seed
        The kNN classifier's and graph's k, the cross-validation folds, the Leiden resolutions
        to try, the seed of every random step.
    umap : bool
        Whether to compute the UMAP too.

    Returns
    -------
    tuple
        The scores (the metrics table's names; keys starting with ``_`` say how they were
        measured, ``_cv_predictions`` holds the cross-validated kNN predictions behind
        ``knn_macro_f1_cv``) and the UMAP coordinates (None without ``umap``).
    """
    labels, samples = np.asarray(labels).astype(str), np.asarray(samples).astype(str)
    t0 = time.time()

    def step(what: str) -> None:  # a line per step, so that a long evaluation shows how far it got
        log.info("evaluate: %d x %d: %s (%.1fs)", *X.shape, what, time.time() - t0)

    scores = {}
    cv = knn_scores(X, labels, n_neighbors=n_neighbors, n_folds=n_folds, seed=seed)
    scores.update(
        knn_accuracy_cv=cv["accuracy"], knn_macro_f1_cv=cv["macro_f1"], _cv_folds=cv["n_folds"]
    )
    held = knn_scores(
        X, labels, n_neighbors=n_neighbors, n_folds=n_folds, seed=seed, groups=samples
    )
    scores.update(
        knn_accuracy_heldout_sample=held["accuracy"],
        knn_macro_f1_heldout_sample=held["macro_f1"],
        _sample_folds=held["n_folds"],
    )
    step("kNN cross-validation done; Leiden next")
    graph = neighbors_graph(X, n_neighbors=n_neighbors, seed=seed)
    leiden = leiden_scores(graph, labels, resolutions=leiden_resolutions, seed=seed)
    scores.update(
        leiden_ari=leiden["ari"],
        leiden_nmi=leiden["nmi"],
        _leiden_resolution=leiden["resolution"],
        _leiden_clusters=leiden["n_clusters"],
    )
    step(f"Leiden at {len(leiden_resolutions)} resolutions done; silhouettes next")
    scores["silhouette_label"] = silhouette(X, labels, seed=seed)
    scores["silhouette_sample"] = silhouette(X, samples, seed=seed)
    scores.update(scib_scores(X, labels, samples, graph, scores["silhouette_label"], seed))
    scores["_cv_predictions"] = cv["predictions"]
    if umap:
        step("silhouettes and scIB metrics done; UMAP next")
    coords = umap_coords(graph, seed=seed) if umap else None
    log.info(
        "evaluate: %d cells x %d dims scored in %.1fs", X.shape[0], X.shape[1], time.time() - t0
    )
    return scores, coords


def scib_scores(X: np.ndarray, labels, samples, graph, asw_label: float, seed: int = 0) -> dict:
    """The scIB metrics of one representation, as scib-metrics defines them (``scllm.eval.scib``).

    Parameters
    ----------
    X : numpy.ndarray
        Cells x dimensions.
    labels, samples : numpy.ndarray
        Each cell's label and sample (strings).
    graph : anndata.AnnData
        ``neighbors_graph(X)``: its kNN graph gives the graph connectivity.
    asw_label : float
        The labels' mean silhouette width (``silhouette``), rescaled here.
    seed : int
        Seed of the cell sample the batch silhouette is estimated on above
        ``SILHOUETTE_MAX_CELLS`` cells.

    Returns
    -------
    dict
        ``scib_silhouette_label``, ``scib_graph_connectivity``, and the batch metrics
        ``scib_silhouette_batch`` and ``scib_ilisi`` (NaN with one sample).
    """
    from scllm.eval import scib

    scores = {
        "scib_silhouette_label": scib.silhouette_label(asw_label),
        "scib_graph_connectivity": scib.graph_connectivity(graph.obsp["distances"], labels),
        "scib_silhouette_batch": np.nan,
        "scib_ilisi": np.nan,
    }
    if len(np.unique(samples)) > 1:  # batch mixing needs batches
        rows = np.arange(len(X))
        if len(rows) > SILHOUETTE_MAX_CELLS:
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(rows, SILHOUETTE_MAX_CELLS, replace=False))
        scores["scib_silhouette_batch"] = scib.silhouette_batch(
            X[rows], labels[rows], samples[rows]
        )
        scores["scib_ilisi"] = scib.ilisi(X, samples)
    return scores


def pca_baseline(matrix: sp.csr_matrix, *, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """scanpy PCA (centred implicitly, never densified) of a cells x genes matrix.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix
        Cells x genes (e.g. log-normalized HVGs); read as float32.
    n_pcs : int
        How many components, lowered to min(cells, genes) - 1 where that is smaller.
    seed : int
        scanpy's ``random_state``.

    Returns
    -------
    numpy.ndarray
        Cells x components.
    """
    import anndata as ad
    import scanpy as sc

    n_pcs = int(min(n_pcs, min(matrix.shape) - 1))
    adata = ad.AnnData(X=sp.csr_matrix(matrix, dtype=np.float32))
    sc.pp.pca(adata, n_comps=n_pcs, zero_center=True, random_state=seed)
    return adata.obsm["X_pca"]


def masked_value_error(epochs_tsv) -> dict:
    """Validation masked MSE of the best epoch (lowest validation loss: best_model.pt) and the
    mean-bin baseline, from pretrain's ``epochs.tsv``.

    Parameters
    ----------
    epochs_tsv : path
        pretrain's ``epochs.tsv``.

    Returns
    -------
    dict
        ``epoch`` (the best, the first of equals), ``n_epochs`` (the last epoch recorded), and
        at the best epoch ``expr_mse`` and ``gepc_mse`` (the expression and GEPC heads' masked
        MSE) and ``baseline_mse`` (each cell's mean visible bin).

    Raises
    ------
    ValueError
        ``epochs.tsv`` holds no epoch (the model has not finished one).
    """
    epochs = pd.read_csv(epochs_tsv, sep="\t")
    if epochs.empty:
        raise ValueError(f"{epochs_tsv} holds no epoch; the model has not finished an epoch")
    best = epochs.loc[epochs["val_loss"].idxmin()]
    return {
        "epoch": int(best["epoch"]),
        "n_epochs": int(epochs["epoch"].max()),
        "expr_mse": float(best["val_expr_mse"]),
        "gepc_mse": float(best["val_gepc_mse"]),
        "baseline_mse": float(best["val_mean_bin_baseline_mse"]),
    }
