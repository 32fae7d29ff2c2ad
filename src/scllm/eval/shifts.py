"""Does an embedding carry over to cells that differ the way datasets differ?

Shifted copies of a labelled dataset mimic what separates two datasets of the same tissue:
counts thinned to a share of their depth (binomial thinning: each count kept with probability
``depth``, as a shallower sequencing run of the same library would give), and a share of the
vocabulary genes absent from the file (another gene annotation, or a panel that misses them),
and both at once. A kNN classifier fitted on the embeddings of the original cells predicts the
labels of the shifted copies of *other* cells (cross-fitted folds, so a copy never meets its own
original), for the model and for the PCA of the model's training cells projected onto the same
cells: the linear baseline the model has to beat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger("scllm")


@dataclass(frozen=True)
class Shift:
    """One way a dataset may differ: shallower sequencing, fewer vocabulary genes, or both.

    Attributes
    ----------
    name : str
        The shift's name in the transfer table.
    depth : float, default 1.0
        The share of the counts kept (binomial thinning).
    coverage : float, default 1.0
        The share of the vocabulary genes the file still has.
    """

    name: str
    depth: float = 1.0  # share of the counts kept
    coverage: float = 1.0  # share of the vocabulary genes the file still has


SHIFTS = (
    Shift("none"),
    Shift("depth 50%", depth=0.5),
    Shift("depth 25%", depth=0.25),
    Shift("genes 90%", coverage=0.9),
    Shift("genes 70%", coverage=0.7),
    Shift("depth 50% + genes 90%", depth=0.5, coverage=0.9),
    Shift("depth 25% + genes 70%", depth=0.25, coverage=0.7),
)


def thin_counts(counts, depth: float, seed: int = 0) -> sp.csr_matrix:
    """Binomial thinning: every count kept with probability ``depth``.

    Integer counts stay integers, and a cell's expected total becomes ``depth`` times its total.

    Parameters
    ----------
    counts : scipy.sparse matrix or numpy.ndarray
        Raw integer counts, cells x genes.
    depth : float
        The share of counts kept, in (0, 1].
    seed : int, default 0
        The seed of the draws.

    Returns
    -------
    scipy.sparse.csr_matrix
        The thinned counts (a copy), zeros dropped.

    Raises
    ------
    ValueError
        ``depth`` outside (0, 1], or counts that are not whole numbers.
    """
    if not 0 < depth <= 1:
        raise ValueError(f"depth is the share of counts kept, in (0, 1] (got {depth})")
    counts = sp.csr_matrix(counts, copy=True)
    if counts.nnz and not np.array_equal(counts.data, np.round(counts.data)):
        raise ValueError("thinning needs raw integer counts")
    rng = np.random.default_rng(seed)
    counts.data = rng.binomial(counts.data.astype(np.int64), depth).astype(counts.dtype)
    counts.eliminate_zeros()
    return counts


def drop_columns(n_columns: int, candidates, keep: float, n_reference: int, seed: int = 0):
    """Columns to keep when a share of the vocabulary genes found is dropped at random.

    ``round((1 - keep) * n_reference)`` of ``candidates`` are dropped (at most all of them).

    Parameters
    ----------
    n_columns : int
        The file's columns.
    candidates : array_like of int
        The columns of the vocabulary genes found.
    keep : float
        The share of the vocabulary to keep.
    n_reference : int
        The vocabulary's size, which the share is of.
    seed : int, default 0
        The seed of the draw.

    Returns
    -------
    numpy.ndarray
        The columns kept, ascending.
    """
    candidates = np.asarray(candidates)
    n_drop = min(len(candidates), int(round((1 - keep) * n_reference)))
    dropped = np.random.default_rng(seed).choice(candidates, n_drop, replace=False)
    return np.setdiff1d(np.arange(n_columns), dropped)


def shifted_copy(adata, shift: Shift, vocabulary_columns, n_vocab: int, seed: int = 0):
    """A copy of ``adata`` with ``shift`` applied.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells with raw counts in X.
    shift : Shift
        The shift.
    vocabulary_columns : array_like of int
        The var positions of the model's vocabulary genes in ``adata``.
    n_vocab : int
        The vocabulary's size.
    seed : int, default 0
        The seed of the thinning (the gene drop uses ``seed + 1``).

    Returns
    -------
    anndata.AnnData
        Counts thinned and columns dropped; obs and var copied.
    """
    import anndata as ad

    X = thin_counts(adata.X, shift.depth, seed) if shift.depth < 1 else sp.csr_matrix(adata.X)
    keep = drop_columns(adata.n_vars, vocabulary_columns, shift.coverage, n_vocab, seed + 1)
    return ad.AnnData(X=X[:, keep], obs=adata.obs.copy(), var=adata.var.iloc[keep].copy())


def transfer_knn(reference, shifted, labels, *, k: int = 10, n_folds: int = 5, seed: int = 0):
    """Accuracy and macro-F1 of a kNN fitted on ``reference`` rows, predicting ``shifted`` ones.

    The kNN predicts the labels of the ``shifted`` rows of the other cells (stratified folds);
    with ``shifted`` the same as ``reference`` this is plain cross-validated kNN.

    Parameters
    ----------
    reference, shifted : numpy.ndarray
        Embeddings of the original cells and of their shifted copies, row for row.
    labels : array_like
        Each cell's label.
    k : int, default 10
        Neighbours.
    n_folds : int, default 5
        Folds.
    seed : int, default 0
        The seed of the folds.

    Returns
    -------
    dict of str to float
        ``accuracy`` and ``macro_f1``.
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels).astype(str)
    predicted = np.empty(len(labels), dtype=object)
    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    for fit, test in folds.split(reference, labels):
        knn = KNeighborsClassifier(n_neighbors=k).fit(reference[fit], labels[fit])
        predicted[test] = knn.predict(shifted[test])
    predicted = predicted.astype(str)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro")),
    }


def transfer_table(
    model_dir, adata, label_key: str, *, gene_id_column=None, shifts=SHIFTS, seed=0, device="cpu"
) -> pd.DataFrame:
    """Transfer of the model's embedding and the projected training PCA to each shift of ``adata``.

    One row per shift and representation (the shift "none" gives plain cross-validated kNN on the
    original cells).

    Parameters
    ----------
    model_dir : str or Path
        The model folder (with its training PCA).
    adata : anndata.AnnData
        Cells with raw counts in X.
    label_key : str
        The obs column of the labels.
    gene_id_column : str or None, default None
        The var column of Ensembl ids; None: found as ``scllm.embed`` finds it.
    shifts : sequence of Shift, default SHIFTS
        The shifts.
    seed : int, default 0
        The seed of the shifts and folds.
    device : str, default "cpu"
        Where the model embeds.

    Returns
    -------
    pandas.DataFrame
        ``shift``, ``representation``, ``accuracy`` and ``macro_f1``.
    """
    import scllm
    from scllm.eval.baselines import project_training_pca
    from scllm.eval.genes import map_genes, model_genes
    from scllm.tokens import read_vocab

    genes = model_genes(model_dir, read_vocab(Path(model_dir) / "vocab.json"))
    columns = map_genes(adata.var, genes, gene_id_column).columns
    labels = adata.obs[label_key].astype(str).to_numpy()

    def representations(cells) -> dict:
        scllm.embed(cells, model_dir, gene_id_column=gene_id_column, device=device)
        project_training_pca(cells, model_dir, gene_id_column=gene_id_column)
        return {
            "model": cells.obsm["X_scllm"],
            "training PCA, projected": cells.obsm["X_pca_train"],
        }

    reference = representations(shifted_copy(adata, Shift("none"), columns, len(genes), seed))
    rows = []
    for shift in shifts:
        shifted = (
            reference
            if shift == Shift("none")
            else representations(shifted_copy(adata, shift, columns, len(genes), seed))
        )
        for name in reference:
            scores = transfer_knn(reference[name], shifted[name], labels, seed=seed)
            rows.append({"shift": shift.name, "representation": name, **scores})
            log.info("transfer: %-22s %-24s %s", shift.name, name, scores)
    return pd.DataFrame(rows)
