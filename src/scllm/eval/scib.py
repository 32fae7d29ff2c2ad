"""The scIB benchmark's embedding metrics, as scib-metrics 0.5 defines them, so that the figures
of a run compare with published integration tables.

scib-metrics itself is not a dependency: it computes with jax (a second array stack of about
ten packages beside numpy, scipy and torch, in every environment that evaluates). These are its
formulas on scikit-learn and scipy, each following the function named in its docstring:

- ``silhouette_label``: ``scib_metrics.silhouette_label`` (rescaled average silhouette width);
- ``silhouette_batch``: ``scib_metrics.silhouette_batch`` (batch silhouette within each label);
- ``graph_connectivity``: ``scib_metrics.graph_connectivity`` (per label, the largest strongly
  connected share of the kNN graph restricted to it);
- ``lisi`` and ``ilisi``: ``scib_metrics.lisi_knn`` and ``scib_metrics.ilisi_knn`` (inverse
  Simpson index of batches over each cell's perplexity-weighted neighbours, scaled).

kBET (``scib_metrics.kbet_per_label``) is left out: its per-label diffusion-map rescue of
disconnected components has no short faithful equivalent here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# scib-metrics' Benchmarker: iLISI on 90 neighbours (self included), perplexity 90 // 3.
ILISI_NEIGHBORS = 90


def silhouette_label(asw: float) -> float:
    """scib-metrics' ``silhouette_label`` from the average silhouette width of the labels.

    Parameters
    ----------
    asw : float
        Mean silhouette width over all cells of their labels (Euclidean), in [-1, 1]:
        ``scllm.eval.metrics.silhouette``.

    Returns
    -------
    float
        ``(asw + 1) / 2``, in [0, 1]: 0.5 means no separation, higher is better.
    """
    return (asw + 1) / 2


def silhouette_batch(X: np.ndarray, labels, batches) -> float:
    """scib-metrics' ``silhouette_batch``: how well batches mix within each label.

    For each label with more than one batch (and fewer batches than cells), the silhouette
    width of every cell of that label with its batch as the cluster (Euclidean), taken as
    ``1 - |s|``, averaged over the label's cells; then averaged over those labels.

    Parameters
    ----------
    X : numpy.ndarray
        Cells x dimensions.
    labels, batches : array-like
        Each cell's label (cell type) and batch (sample).

    Returns
    -------
    float
        In [0, 1]; 1 means the batches are indistinguishable within every label (higher is
        better). NaN where no label holds two batches.
    """
    from sklearn.metrics import silhouette_samples

    labels, batches = np.asarray(labels).astype(str), np.asarray(batches).astype(str)
    per_label = []
    for label in np.unique(labels):
        rows = labels == label
        n_batches = len(np.unique(batches[rows]))
        if n_batches == 1 or n_batches == rows.sum():  # scib-metrics skips these labels
            continue
        widths = silhouette_samples(X[rows], batches[rows], metric="euclidean")
        per_label.append(np.mean(1 - np.abs(widths)))
    return float(np.mean(per_label)) if per_label else np.nan


def graph_connectivity(knn_graph, labels) -> float:
    """scib-metrics' ``graph_connectivity``: is each label one piece of the kNN graph?

    For each label: the kNN graph restricted to its cells, its strongly connected components
    (edges point from a cell to its neighbours), and the share of the label's cells in the
    largest one; averaged over labels.

    Parameters
    ----------
    knn_graph : scipy.sparse matrix
        Cells x cells, a stored entry for each cell's nearest neighbours (e.g. scanpy's
        ``obsp["distances"]``); the values are not used, only which entries are stored.
    labels : array-like
        Each cell's label.

    Returns
    -------
    float
        In (0, 1]; 1 means every label is one connected piece (higher is better).
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    labels = np.asarray(labels).astype(str)
    edges = sp.csr_matrix(knn_graph, copy=True)
    edges.data = np.ones_like(edges.data)  # a zero distance (identical cells) is still an edge
    shares = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        _, components = connected_components(
            edges[rows][:, rows], directed=True, connection="strong"
        )
        shares.append(np.bincount(components).max() / len(rows))
    return float(np.mean(shares))


def lisi(knn_distances, knn_indices, labels, perplexity: float | None = None) -> np.ndarray:
    """Each cell's local inverse Simpson index of ``labels`` (scib-metrics' ``lisi_knn``).

    A cell's neighbours (itself left out) are weighted by ``exp(-beta * distance)``, with
    ``beta`` found by bisection so that the weights' entropy is ``log(perplexity)`` (50 steps
    at most, tolerance 1e-5); the index is ``1 / sum_l p_l**2`` over the labels' summed weights.

    Parameters
    ----------
    knn_distances, knn_indices : numpy.ndarray
        Cells x k: each cell's nearest neighbours (itself among them, as scib-metrics expects)
        and their Euclidean distances.
    labels : array-like
        Each cell's label (for iLISI: its batch).
    perplexity : float, optional
        The effective number of neighbours; default ``floor(k / 3)``, as scib-metrics.

    Returns
    -------
    numpy.ndarray
        Per cell, between 1 (its neighbours share one label) and the number of labels; -1
        where the weights vanish (scib-metrics' value there).
    """
    distances = np.asarray(knn_distances, dtype=np.float64)
    indices = np.asarray(knn_indices)
    codes = pd.Categorical(np.asarray(labels).astype(str)).codes
    if perplexity is None:
        perplexity = np.floor(indices.shape[1] / 3)
    others = indices != np.arange(len(indices))[:, None]
    entropy, weights = _neighbour_weights(distances, others, float(perplexity))
    simpson = np.where(entropy == 0, -1.0, _simpson_sums(weights, codes[indices]))
    return 1 / simpson


def _simpson_sums(weights: np.ndarray, neighbour_codes: np.ndarray) -> np.ndarray:
    """Per row, ``sum_l p_l**2`` with ``p_l`` the row's weights summed over its neighbours of
    label ``l``. A sparse rows x labels sum (converting to CSR adds the duplicate entries) keeps
    memory at cells x k; a dense one would be cells x samples (8 GB at 1M cells, 1,000 samples).
    """
    import scipy.sparse as sp

    n, k = weights.shape
    rows = np.repeat(np.arange(n), k)
    summed = sp.csr_matrix(
        (weights.ravel(), (rows, neighbour_codes.ravel())),
        shape=(n, int(neighbour_codes.max()) + 1),
    )
    return np.asarray(summed.multiply(summed).sum(axis=1)).ravel()


def _neighbour_weights(distances, others, perplexity: float, tol: float = 1e-5, tries: int = 50):
    """scib-metrics' bisection for each row's ``beta`` (its ``_get_neighbor_probability``):
    the entropy of the final weights and the weights, rows at once."""
    n = len(distances)
    beta = np.ones(n)
    low, high = np.full(n, -np.inf), np.full(n, np.inf)
    entropy, weights = _entropy(distances, others, beta)
    diff = entropy - np.log(perplexity)
    for _ in range(tries):
        active = np.abs(diff) >= tol
        if not active.any():
            break
        above = diff > 0  # too flat: sharpen (raise beta)
        new_low = np.where(above, beta, low)
        new_high = np.where(above, high, beta)
        raised = np.where(np.isinf(high), beta * 2, (beta + high) / 2)
        lowered = np.where(np.isinf(low), beta / 2, (beta + low) / 2)
        new_beta = np.where(above, raised, lowered)
        low, high = np.where(active, new_low, low), np.where(active, new_high, high)
        beta = np.where(active, new_beta, beta)
        new_entropy, new_weights = _entropy(distances[active], others[active], beta[active])
        entropy[active], weights[active] = new_entropy, new_weights
        diff = entropy - np.log(perplexity)
    return entropy, weights


def _entropy(distances, others, beta):
    """scib-metrics' ``_Hbeta`` for rows at once: the entropy of the weights
    ``exp(-beta * distance)`` over each row's other cells, and the normalised weights."""
    weights = np.where(others, np.exp(-distances * beta[:, None]), 0.0)
    total = weights.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.log(total) + beta * (distances * weights).sum(axis=1) / total
        normalised = weights / total[:, None]
    empty = total == 0
    return np.where(empty, 0.0, entropy), np.where(empty[:, None], 0.0, normalised)


def ilisi(X: np.ndarray, batches, n_neighbors: int = ILISI_NEIGHBORS) -> float:
    """scib-metrics' ``ilisi_knn`` (scaled) on exact Euclidean nearest neighbours.

    Parameters
    ----------
    X : numpy.ndarray
        Cells x dimensions.
    batches : array-like
        Each cell's batch (sample).
    n_neighbors : int
        Neighbours per cell, the cell itself included (scib-metrics' Benchmarker: 90).

    Returns
    -------
    float
        ``(median LISI - 1) / (n batches - 1)``: 0 when each cell's neighbours come from its
        own batch, 1 when they come from all batches evenly (higher is better). NaN with one
        batch.
    """
    from sklearn.neighbors import NearestNeighbors

    batches = np.asarray(batches).astype(str)
    n_batches = len(np.unique(batches))
    if n_batches < 2:
        return np.nan
    k = min(n_neighbors, len(X))
    distances, indices = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    index = np.nanmedian(lisi(distances, indices, batches))
    return float((index - 1) / (n_batches - 1))
