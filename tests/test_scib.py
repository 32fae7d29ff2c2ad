"""The scIB metrics (scib-metrics' definitions, ``scllm.eval.scib``) on cases small enough to
compute by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scllm.eval import scib
from scllm.eval.metrics import per_label_f1, scib_scores, silhouette


def points(*xs) -> np.ndarray:
    """Cells on a line (one dimension): Euclidean distances are differences."""
    return np.array(xs, dtype=float)[:, None]


def test_silhouette_label_is_the_rescaled_average_silhouette_width():
    # cell at 0: a = 1 (to 1), b = mean(10, 11) = 10.5, s = 9.5 / 10.5; at 1: 8.5 / 9.5; the
    # other cluster mirrors them
    X, labels = points(0, 1, 10, 11), ["A", "A", "B", "B"]
    asw = (9.5 / 10.5 + 8.5 / 9.5) / 2
    assert silhouette(X, labels) == pytest.approx(asw)
    assert scib.silhouette_label(asw) == pytest.approx((asw + 1) / 2)
    assert scib.silhouette_label(-1.0) == 0.0 and scib.silhouette_label(0.0) == 0.5


def test_silhouette_batch_averages_one_minus_the_absolute_width_per_label():
    X = points(0, 2, 1, 3, 50, 51, 100, 101, 110, 111, 200, 201)
    labels = ["A"] * 4 + ["B"] * 2 + ["D"] * 4 + ["C"] * 2
    batches = ["b1", "b1", "b2", "b2", "b1", "b1", "b1", "b1", "b2", "b2", "b1", "b2"]
    # A (b1 at 0, 2; b2 at 1, 3): widths 0, -0.5, -0.5, 0 -> 1 - |s| averages 0.75
    # D (b1 at 100, 101; b2 at 110, 111): widths 9.5/10.5, 8.5/9.5 (twice each)
    d = 1 - (9.5 / 10.5 + 8.5 / 9.5) / 2
    # B has one batch, C as many batches as cells: scib-metrics skips both
    assert scib.silhouette_batch(X, labels, batches) == pytest.approx((0.75 + d) / 2)
    assert np.isnan(scib.silhouette_batch(X, labels, ["b1"] * 12))


def test_graph_connectivity_is_the_largest_strongly_connected_share_per_label():
    # A = cells 0..3: 0 <-> 1 <-> 2 form a cycle, 3 points into it but nothing points back
    # (strongly: its own piece) -> 3/4; B = cells 4, 5: 4 -> 5 only -> 1/2
    edges = [(0, 1), (1, 2), (2, 0), (3, 0), (4, 5), (0, 4), (5, 3)]  # across labels: ignored
    rows, cols = zip(*edges)
    graph = sp.csr_matrix((np.zeros(len(edges)), (rows, cols)), shape=(6, 6))  # zeros: edges
    labels = ["A", "A", "A", "A", "B", "B"]
    assert scib.graph_connectivity(graph, labels) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert scib.graph_connectivity(sp.csr_matrix((6, 6)), ["A"] * 6) == pytest.approx(1 / 6)


def test_lisi_counts_the_labels_among_evenly_weighted_neighbours():
    # one cell, itself (distance 0, left out) and four neighbours at the same distance: every
    # beta gives them equal weights; labels a, b, b, b -> 1 / ((1/4)^2 + (3/4)^2) = 1.6
    distances = np.array([[0.0, 1.0, 1.0, 1.0, 1.0]])
    indices = np.array([[0, 1, 2, 3, 4]])
    labels = np.array(["a", "a", "b", "b", "b"])
    assert scib.lisi(distances, indices, labels, perplexity=2) == pytest.approx([1.6])
    # perplexity 2 over two neighbours at distances 1 and 2, of different labels: the search
    # drives beta to 0 (equal weights), so the index tends to 2, the most two labels give
    lisi = scib.lisi(np.array([[0.0, 1.0, 2.0]]), np.array([[0, 1, 2]]), labels[[0, 1, 2]], 2)
    assert lisi == pytest.approx([2.0], rel=1e-3)
    # the same neighbours, one label: 1
    assert scib.lisi(np.array([[0.0, 1.0, 2.0]]), np.array([[0, 1, 2]]), ["a"] * 3, 2) == [1.0]


def test_lisi_with_thousands_of_labels_matches_counting_each_cells_neighbours():
    # equal distances give equal weights at every beta, so each cell's index is
    # 1 / sum_l (share of its other neighbours with label l)^2, counted here row by row;
    # 5,000 labels (samples) over 3,000 cells, as a Census sample of many donors has
    from collections import Counter

    rng = np.random.default_rng(0)
    n, k = 3000, 30
    labels = np.array([f"s{i}" for i in rng.integers(0, 5000, n)])
    others = (np.arange(n)[:, None] + rng.integers(1, n, (n, k - 1))) % n  # never the cell
    indices = np.column_stack([np.arange(n), others])
    distances = np.column_stack([np.zeros(n), np.ones((n, k - 1))])
    expected = [
        1 / sum((c / (k - 1)) ** 2 for c in Counter(labels[row[1:]]).values()) for row in indices
    ]
    assert scib.lisi(distances, indices, labels) == pytest.approx(expected)


def test_ilisi_scales_the_median_to_zero_for_separate_and_one_for_mixed_batches():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    mixed = np.where(np.arange(300) % 2, "s1", "s2")
    assert scib.ilisi(X, mixed) > 0.9  # batches interleaved everywhere
    apart = np.vstack([X[:150], X[150:] + 100])
    assert scib.ilisi(apart, np.repeat(["s1", "s2"], 150)) == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(scib.ilisi(X, np.full(300, "s1")))


def test_scib_scores_leave_the_batch_metrics_out_with_one_sample():
    from scllm.eval.metrics import neighbors_graph

    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(0, 1, (40, 3)), rng.normal(20, 1, (40, 3))]).astype(np.float32)
    labels = np.repeat(["A", "B"], 40)
    graph = neighbors_graph(X, n_neighbors=15)
    one = scib_scores(X, labels, np.full(80, "s"), graph, silhouette(X, labels))
    # strongly connected: a cell no neighbour of its type points back to is a piece of its own
    assert one["scib_graph_connectivity"] > 0.95 and one["scib_silhouette_label"] > 0.9
    assert np.isnan(one["scib_silhouette_batch"]) and np.isnan(one["scib_ilisi"])
    two = scib_scores(X, labels, np.where(np.arange(80) % 2, "s1", "s2"), graph, 0.9)
    assert two["scib_silhouette_batch"] > 0.9 and two["scib_ilisi"] > 0.8


def test_per_label_f1_by_hand_and_its_mean_is_the_macro_f1():
    from sklearn.metrics import f1_score

    truth = ["T", "T", "T", "B", "B", "NK"]
    predicted = ["T", "T", "B", "B", "T", "B"]
    # T: 2 right, 3 true, 3 predicted -> 4/6; B: 1 right, 2 true, 3 predicted -> 2/5; NK: 0
    f1 = per_label_f1(truth, predicted)
    assert f1.to_dict() == pytest.approx({"B": 2 / 5, "NK": 0.0, "T": 4 / 6})
    assert f1.mean() == pytest.approx(f1_score(truth, predicted, average="macro"))
