"""How good are the cell embeddings? Label-aware metrics against a PCA baseline, and UMAPs.

For each representation (the model's ``<cls>`` embeddings, and PCA-50 of log-normalized HVGs
of the same cells) on the cells that carry a cell-type label:

- kNN cell-type accuracy and macro-F1: scikit-learn ``KNeighborsClassifier`` predictions from
  stratified k-fold cross-validation, and, with several samples, from folds that hold out whole
  samples (a new donor's cells are labelled by the other donors' cells);
- ARI and NMI of Leiden clusters (scanpy's exact kNN graph + igraph Leiden) against the labels;
  the resolution is picked from a grid by the best NMI, as scib does, for both representations;
- silhouette width by label (higher: cell types separate) and by sample (near 0: samples mix).

The pretraining objective itself is reported too: masked-value MSE of the best model on the
validation cells (fixed masks) against predicting each cell's mean bin, from ``epochs.tsv``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scllm.config import EvaluateConfig
from scllm.io import atomic_path, open_backed, read_rows, row_chunks

log = logging.getLogger("scllm")

EMBEDDING_KEY = "X_scllm"
UNLABELED = {"", "nan", "none", "na", "n/a", "unknown", "unassigned"}
BASELINE_TARGET_SUM = 1e4
TABLE_COLUMNS = ["metric", "scllm", "baseline", "baseline_method", "cells", "details"]


# --- metrics on one representation ---------------------------------------------------------------


def knn_scores(
    X: np.ndarray, labels, *, n_neighbors: int = 15, n_folds: int = 5, seed: int = 0, groups=None
) -> dict:
    """Accuracy and macro-F1 of kNN label predictions made out of fold.

    ``groups`` None: stratified ``n_folds``-fold cross-validation. Otherwise folds hold out whole
    groups (samples): one group per fold, or ``n_folds`` group folds when there are more groups.
    Returns NaN scores when the split is impossible (one group, or fewer than two labels).
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import (
        GroupKFold,
        LeaveOneGroupOut,
        StratifiedKFold,
        cross_val_predict,
    )
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels).astype(str)
    nan = {"accuracy": np.nan, "macro_f1": np.nan, "n_folds": 0}
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
        "macro_f1": float(
            f1_score(labels, pred, average="macro", labels=np.unique(labels), zero_division=0)
        ),
        "n_folds": folds,
    }


def silhouette(X: np.ndarray, labels, *, seed: int = 0, max_cells: int = 20_000) -> float:
    """scikit-learn's mean silhouette width (Euclidean) of ``labels``; NaN for < 2 or
    all-distinct labels. Above ``max_cells`` cells it is estimated on a seeded random sample of
    that size."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels).astype(str)
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(labels):
        return np.nan
    sample = max_cells if len(labels) > max_cells else None
    return float(silhouette_score(X, labels, sample_size=sample, random_state=seed))


def neighbors_graph(X: np.ndarray, *, n_neighbors: int = 15, seed: int = 0):
    """An AnnData holding ``X`` and scanpy's exact kNN graph on it (for Leiden and UMAP)."""
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
    with the best NMI; ``graph`` is an AnnData from ``neighbors_graph``."""
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
    """Every label metric for one representation, and its UMAP coordinates."""
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
    if umap:
        step("silhouettes done; UMAP next")
    coords = umap_coords(graph, seed=seed) if umap else None
    log.info(
        "evaluate: %d cells x %d dims scored in %.1fs", X.shape[0], X.shape[1], time.time() - t0
    )
    return scores, coords


# --- the PCA baseline ----------------------------------------------------------------------------


def log_normalized_hvgs(
    filtered_h5ad, hvg_ids, cells, *, chunk_size: int = 20_000
) -> sp.csr_matrix:
    """log1p(normalize_total(counts, 1e4)) of the HVGs for ``cells`` (obs names, in that order),
    totals over all genes, streamed from ``filtered_h5ad`` in row chunks (stays sparse)."""
    adata = open_backed(filtered_h5ad)
    rows = adata.obs_names.get_indexer(pd.Index(cells))
    if (rows < 0).any():
        raise ValueError(
            f"{int((rows < 0).sum())} cells are not in {filtered_h5ad} (e.g. "
            f"{list(np.asarray(cells)[rows < 0][:3])}); the embeddings come from another run"
        )
    columns = adata.var_names.get_indexer(pd.Index(hvg_ids))
    if (columns < 0).any():
        raise ValueError(
            f"{int((columns < 0).sum())} HVGs are not genes of {filtered_h5ad}; rerun select_hvg"
        )
    matrix = _log_normalized_rows(
        lambda start, stop: read_rows(adata, start, stop), adata.n_obs, columns, rows, chunk_size
    )
    adata.file.close()
    return matrix


def _log_normalized_rows(read_block, n_obs: int, columns, rows, chunk_size: int) -> sp.csr_matrix:
    """log1p(normalize_total(counts, 1e4)) of ``columns`` for ``rows`` (in that order), totals over
    all genes; ``read_block(start, stop)`` gives a CSR block of counts, read in row chunks."""
    from scllm.binning import normalize_total

    wanted = np.zeros(n_obs, dtype=bool)
    wanted[rows] = True
    blocks, got = [], []
    for start, stop in row_chunks(n_obs, chunk_size):
        keep = np.flatnonzero(wanted[start:stop])
        if not keep.size:
            continue
        counts = read_block(start, stop)[keep]
        totals = np.asarray(counts.sum(axis=1)).ravel()
        blocks.append(normalize_total(counts[:, columns], totals, BASELINE_TARGET_SUM, log1p=True))
        got.append(keep + start)
    matrix = sp.vstack(blocks, format="csr")
    position = np.empty(n_obs, dtype=np.int64)
    position[np.concatenate(got)] = np.arange(matrix.shape[0])
    return matrix[position[rows]]


def pca_baseline(matrix: sp.csr_matrix, *, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """scanpy PCA (centred implicitly, never densified) of a cells x genes matrix."""
    import anndata as ad
    import scanpy as sc

    n_pcs = int(min(n_pcs, min(matrix.shape) - 1))
    adata = ad.AnnData(X=sp.csr_matrix(matrix, dtype=np.float32))
    sc.pp.pca(adata, n_comps=n_pcs, zero_center=True, random_state=seed)
    return adata.obsm["X_pca"]


# --- the pretraining objective -------------------------------------------------------------------


def masked_value_error(epochs_tsv) -> dict:
    """Validation masked MSE of the best epoch (lowest validation loss: best_model.pt) and the
    mean-bin baseline, from pretrain's ``epochs.tsv``."""
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


# --- plots and tables ----------------------------------------------------------------------------


def _palette(n: int) -> list:
    from scanpy.plotting import palettes

    for pal in (palettes.default_20, palettes.default_28, palettes.default_102):
        if n <= len(pal):
            return list(pal)
    return [palettes.default_102[i % len(palettes.default_102)] for i in range(n)]


def plot_umaps(path, panels: dict[str, np.ndarray], colors, title: str, seed: int = 0) -> None:
    """Side-by-side UMAPs (one per representation) coloured by one categorical ``colors``."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colors = pd.Categorical(np.asarray(colors).astype(str))
    categories = list(colors.categories)
    palette = np.array(_palette(len(categories)), dtype=object)
    n = len(colors)
    order = np.random.default_rng(seed).permutation(n)  # no category systematically drawn on top
    size = float(np.clip(30_000 / max(n, 1), 0.5, 20))
    legend_cols = 1 + len(categories) // 30
    fig = Figure(figsize=(5 * len(panels) + 1.8 * legend_cols, 5.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    point_colors = list(palette[colors.codes[order]])
    for ax, (name, coords) in zip(axes, panels.items()):
        ax.scatter(
            coords[order, 0],
            coords[order, 1],
            c=point_colors,
            s=size,
            linewidths=0,
            rasterized=True,
        )
        ax.set(title=name, xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    handles = [
        Line2D([], [], marker="o", linestyle="", color=palette[i], markersize=5, label=str(cat))
        for i, cat in enumerate(categories)
    ]
    fig.legend(
        handles=handles,
        loc="outside right center",
        fontsize=7,
        frameon=False,
        ncols=legend_cols,
        title=f"{title} ({len(categories)})",
        title_fontsize=8,
    )
    fig.suptitle(f"{n} cells coloured by {title}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], tsv_path, html_path=None, title: str = "") -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    with atomic_path(tsv_path) as tmp:
        Path(tmp).write_text(
            "\t".join(TABLE_COLUMNS)
            + "\n"
            + "".join("\t".join(_fmt(r.get(c)) for c in TABLE_COLUMNS) + "\n" for r in rows)
        )
    if html_path is not None:
        from scllm.report import STYLE, metrics_html

        with atomic_path(html_path) as tmp:
            Path(tmp).write_text(
                f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>{STYLE}"
                f"</head><body><h3>{title}</h3>{metrics_html(table)}</body></html>\n"
            )
    return table


# --- the rules -----------------------------------------------------------------------------------


def _settings(settings: dict) -> dict:
    """The evaluate section with its defaults (scllm.config.EvaluateConfig), as a dict."""
    return EvaluateConfig.from_dict(settings).to_dict()


def labelled_cells(
    obs: pd.DataFrame, label_key: str, max_cells: int, seed: int, where
) -> np.ndarray:
    """Rows of ``obs`` with a usable ``label_key`` label, at most ``max_cells`` (a seeded
    sample)."""
    if label_key not in obs:
        raise ValueError(
            f"{where} has no obs column {label_key!r} (the label key); "
            f"columns: {list(obs.columns)}"
        )
    labels = obs[label_key].astype(str)
    labelled = ~labels.str.strip().str.lower().isin(UNLABELED) & obs[label_key].notna()
    keep = np.flatnonzero(labelled.to_numpy())
    if len(keep) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(keep, int(max_cells), replace=False))
    log.info(
        "evaluate: %d cells, %d with a %s label, %d scored (max_cells %d)",
        len(obs),
        int(labelled.sum()),
        label_key,
        len(keep),
        max_cells,
    )
    if len(keep) < 10:
        raise ValueError(
            f"only {len(keep)} cells of {where} carry a {label_key!r} label; "
            "scoring needs at least 10 labelled cells"
        )
    return keep


def score_against_pca(
    X: np.ndarray,
    baselines: dict[str, np.ndarray],
    labels,
    samples,
    cfg: dict,
    cells: str,
    label_key: str,
    batch_key: str,
) -> tuple[list[dict], dict]:
    """Score the embeddings ``X`` and each baseline (name -> coordinates of the same cells); the
    metrics-table rows (one group per baseline) and the UMAP panels."""
    labels, samples = np.asarray(labels).astype(str), np.asarray(samples).astype(str)
    n_labels, n_samples = len(np.unique(labels)), len(np.unique(samples))
    log.info("evaluate: %d %s labels, %d %s value(s)", n_labels, label_key, n_samples, batch_key)
    common = dict(
        n_neighbors=cfg["n_neighbors"],
        n_folds=cfg["n_folds"],
        leiden_resolutions=cfg["leiden_resolutions"],
        seed=int(cfg["seed"]),
    )
    ours, ours_umap = score_representation(X, labels, samples, **common)
    panels = {f"scLLM ({X.shape[1]} dims)": ours_umap}
    table = []
    for name, coords in baselines.items():
        base, panels[name] = score_representation(coords, labels, samples, **common)
        table += [
            {
                "metric": m,
                "scllm": ours[m],
                "baseline": base[m],
                "baseline_method": name,
                "cells": cells,
                "details": d,
            }
            for m, d in _metric_details(ours, base, cfg, n_labels, n_samples, label_key, batch_key)
        ]
    return table, panels


def _metric_details(ours, base, cfg, n_labels, n_samples, label_key, batch_key) -> list:
    k = cfg["n_neighbors"]
    held = (
        f"{ours['_sample_folds']} folds holding out whole samples, k={k}"
        if n_samples > 1
        else "n/a: one sample"
    )
    return [
        ("knn_accuracy_cv", f"{ours['_cv_folds']}-fold stratified cross-validation, k={k}"),
        ("knn_macro_f1_cv", f"{ours['_cv_folds']}-fold stratified cross-validation, k={k}"),
        ("knn_accuracy_heldout_sample", held),
        ("knn_macro_f1_heldout_sample", held),
        (
            "leiden_ari",
            f"Leiden at the resolution with the best NMI: {ours['_leiden_resolution']} "
            f"({ours['_leiden_clusters']} clusters) / baseline {base['_leiden_resolution']} "
            f"({base['_leiden_clusters']} clusters); {n_labels} labels",
        ),
        ("leiden_nmi", "as leiden_ari"),
        ("silhouette_label", f"{label_key}, Euclidean, in [-1, 1]: higher = labels separate"),
        (
            "silhouette_sample",
            f"{batch_key}: near 0 = samples mix" if n_samples > 1 else "n/a: one sample",
        ),
    ]


def plot_one_colour_note(path, n_cells: int, name: str, value: str) -> None:
    """In place of a UMAP coloured by ``name`` when all cells share one value: it would be one
    colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 1.6))
    fig.text(
        0.5,
        0.5,
        f"All {n_cells} cells have {name} = {value}:\n"
        f"no UMAP coloured by {name} (it would be one colour).",
        ha="center",
        va="center",
        fontsize=11,
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _write_results(
    table, title, panels, colourings: list[tuple], out_table, out_html, seed: int
) -> pd.DataFrame:
    result = write_table(table, out_table, out_html, title)
    for i, (path, colors, name) in enumerate(colourings):
        values = np.unique(np.asarray(colors).astype(str))
        if (
            i > 0 and len(values) == 1
        ):  # the labels (first) are always drawn; a one-sample UMAP is not
            plot_one_colour_note(path, len(colors), name, values[0])
        else:
            plot_umaps(path, panels, colors, name, seed)
    for r in table:
        log.info(
            "evaluate: %-28s scllm %-8s baseline %-8s",
            r["metric"],
            _fmt(r["scllm"]),
            _fmt(r["baseline"]),
        )
    return result


def evaluate(
    embeddings_h5ad,
    filtered_h5ad,
    hvg_table,
    epochs_tsv,
    out_table,
    out_html,
    out_umap_label,
    out_umap_sample,
    *,
    args_json=None,
    chunk_size: int = 20_000,
    **settings,
) -> pd.DataFrame:
    """Score the embeddings of ``embeddings_h5ad`` and the PCA baseline; write the metrics table
    (TSV and HTML) and UMAPs coloured by label and by sample. ``args_json`` (the model's) gives
    the number of validation cells behind the masked-value error."""
    from scllm.hvg import read_hvg_table

    cfg = _settings(settings)
    t0 = time.time()
    label_key, batch_key, seed = cfg["label_key"], cfg["batch_key"], int(cfg["seed"])
    emb, keep = _labelled_embeddings(embeddings_h5ad, cfg)
    cells_setting = emb.uns.get("scllm", {}).get("cells", "given")
    sub = emb[keep]
    labels = sub.obs[label_key].astype(str).to_numpy()
    samples = sub.obs[batch_key].astype(str).to_numpy()

    hvgs = read_hvg_table(hvg_table)["feature_id"].tolist()
    matrix = log_normalized_hvgs(filtered_h5ad, hvgs, sub.obs_names, chunk_size=chunk_size)
    pca = pca_baseline(matrix, n_pcs=cfg["n_pcs"], seed=seed)
    log.info("evaluate: PCA baseline: %d cells x %d HVGs -> %d PCs", *matrix.shape, pca.shape[1])
    X = np.asarray(sub.obsm[EMBEDDING_KEY])
    table, panels = score_against_pca(
        X,
        {f"PCA-{pca.shape[1]} of log-normalized HVGs": pca},
        labels,
        samples,
        cfg,
        f"{len(keep)} ({cells_setting})",
        label_key,
        batch_key,
    )
    table += masked_value_rows(epochs_tsv, args_json)
    n_labels, n_samples = len(np.unique(labels)), len(np.unique(samples))
    title = (
        f"scLLM embeddings ({X.shape[1]} dims) vs PCA-{pca.shape[1]} of log-normalized HVGs: "
        f"{len(keep)} cells ({cells_setting}), {n_labels} {label_key} labels, "
        f"{n_samples} sample(s)"
    )
    result = _write_results(
        table,
        title,
        panels,
        [(out_umap_label, labels, label_key), (out_umap_sample, samples, batch_key)],
        out_table,
        out_html,
        seed,
    )
    log.info(
        "evaluate: %d cells in, %d scored; wrote %s, %s, %s, %s in %.1fs",
        emb.n_obs,
        len(keep),
        out_table,
        out_html,
        out_umap_label,
        out_umap_sample,
        time.time() - t0,
    )
    return result


def _labelled_embeddings(embeddings_h5ad, cfg: dict):
    """The embeddings file, checked for the label and batch columns and the embedding, and the
    rows of the labelled cells to score (at most evaluate.max_cells)."""
    import anndata as ad

    emb = ad.read_h5ad(embeddings_h5ad)
    for key, what in (
        (cfg["label_key"], "evaluate.label_key"),
        (cfg["batch_key"], "evaluate.batch_key"),
    ):
        if key not in emb.obs:
            raise ValueError(
                f"{embeddings_h5ad} has no obs column {key!r} ({what}); "
                f"columns: {list(emb.obs.columns)}"
            )
    if EMBEDDING_KEY not in emb.obsm:
        raise ValueError(f"{embeddings_h5ad} has no obsm[{EMBEDDING_KEY!r}]; rerun the embed rule")
    keep = labelled_cells(
        emb.obs,
        cfg["label_key"],
        cfg["max_cells"],
        int(cfg["seed"]),
        f"{embeddings_h5ad} (embed.cells: all embeds every cell)",
    )
    return emb, keep


def masked_value_rows(epochs_tsv, args_json=None) -> list[dict]:
    """The metrics table's rows for the masked-value error of both heads against the baseline of
    each cell's mean visible bin, at the best validation epoch."""
    masked = masked_value_error(epochs_tsv)
    epoch_note = f"best epoch {masked['epoch']} of {masked['n_epochs']}, fixed masks"
    run_args = json.loads(Path(args_json).read_text()) if args_json else {}
    n_val = run_args.get("data", {}).get("n_validation_cells")
    gepc_targets = run_args.get("train", {}).get("gepc_targets", "masked")
    gepc_note = (
        "GEPC head (from the cell embedding)"
        if gepc_targets == "masked"
        else "GEPC head (from the cell embedding), trained on gepc_targets: "
        f"{gepc_targets}, which includes 0 for every unexpressed gene, so it predicts masked "
        "tokens low: not comparable with the baseline"
    )
    val_cells = f"{n_val} (validation)" if n_val is not None else "validation"
    return [
        {
            "metric": "masked_mse_expression",
            "scllm": masked["expr_mse"],
            "baseline": masked["baseline_mse"],
            "baseline_method": "each cell's mean visible bin",
            "cells": val_cells,
            "details": f"{epoch_note}; expression head",
        },
        {
            "metric": "masked_mse_gepc",
            "scllm": masked["gepc_mse"],
            "baseline": masked["baseline_mse"],
            "baseline_method": "each cell's mean visible bin",
            "cells": val_cells,
            "details": f"{epoch_note}; {gepc_note}",
        },
    ]


def log_normalized_vocab_genes(
    h5ad,
    columns: np.ndarray,
    rows: np.ndarray,
    *,
    counts_layer: str | None = None,
    chunk_size: int = 20_000,
) -> sp.csr_matrix:
    """log1p(normalize_total(counts, 1e4)) of the input ``columns`` (the model's vocabulary genes
    as found in the file) for ``rows``, totals over all the file's genes, read in row chunks."""
    from scllm.embedding import _Rows

    reader = _Rows(h5ad, counts_layer)
    try:
        return _log_normalized_rows(
            lambda start, stop: reader[start:stop], reader.elem.shape[0], columns, rows, chunk_size
        )
    finally:
        reader.close()


def evaluate_heldout(
    model_dir,
    h5ad,
    out_embeddings,
    out_table,
    out_html,
    out_umap_label,
    *,
    label_key: str,
    batch_key: str | None = None,
    gene_id_column: str | None = None,
    counts_layer: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    chunk_size: int = 20_000,
    **settings,
) -> pd.DataFrame:
    """Score the model on cells it never saw: embed ``h5ad`` (any h5ad of counts with its own
    ``label_key`` labels) as ``scllm embed`` does, and fit the PCA baseline on the same cells
    (log-normalized counts of the model's vocabulary genes found in the file)."""
    import anndata as ad

    from scllm.embedding import embed_h5ad

    cfg = _settings({**settings, "label_key": label_key})
    t0 = time.time()
    seed = int(cfg["seed"])
    # Check the labels before any work, so a refused file leaves nothing behind.
    keep, labels, samples = _heldout_labels(h5ad, label_key, batch_key, cfg)

    summary = embed_h5ad(
        model_dir,
        h5ad,
        out_embeddings,
        gene_id_column=gene_id_column,
        counts_layer=counts_layer,
        chunk_size=chunk_size,
        device=device,
        batch_size=batch_size,
    )
    emb = ad.read_h5ad(out_embeddings)
    # The baseline sees the vocabulary genes the embedding found.
    baselines = _heldout_baselines(model_dir, h5ad, summary, keep, counts_layer, chunk_size, cfg)
    X = np.asarray(emb.obsm[EMBEDDING_KEY])[keep]
    name = Path(h5ad).name
    table, panels = score_against_pca(
        X,
        baselines,
        labels,
        samples,
        cfg,
        f"{len(keep)} (held out: {name})",
        label_key,
        batch_key or "sample",
    )
    title = (
        f"scLLM embeddings ({X.shape[1]} dims) of {len(keep)} held-out cells ({name}, "
        f"{summary['coverage']:.0%} of the vocabulary found) vs PCA of the same cells and the "
        "training cells' PCA projected onto them"
    )
    result = _write_results(
        table, title, panels, [(out_umap_label, labels, label_key)], out_table, out_html, seed
    )
    log.info(
        "evaluate: %s: %d cells, %d scored; wrote %s, %s, %s in %.1fs",
        h5ad,
        emb.n_obs,
        len(keep),
        out_table,
        out_html,
        out_umap_label,
        time.time() - t0,
    )
    return result


def _heldout_baselines(
    model_dir, h5ad, summary: dict, keep, counts_layer, chunk_size: int, cfg: dict
) -> dict[str, np.ndarray]:
    """PCA fitted on the held-out cells themselves, and the PCA of the model's training cells
    projected onto them (the zero-shot baseline), both over the vocabulary genes found."""
    from scllm.eval.baselines import PCA_FILE, load_training_pca, vocabulary_matrix

    matrix = log_normalized_vocab_genes(
        h5ad, summary["columns"], keep, counts_layer=counts_layer, chunk_size=chunk_size
    )
    pca = pca_baseline(matrix, n_pcs=cfg["n_pcs"], seed=int(cfg["seed"]))
    fitted = f"PCA-{pca.shape[1]} of log-normalized vocabulary genes (fitted on these cells)"
    if not (Path(model_dir) / PCA_FILE).exists():
        log.warning(
            "evaluate: %s has no %s (a model trained before it was kept): the zero-shot PCA "
            "baseline is left out; `snakemake --forcerun training_pca` in the run that trained "
            "it writes it",
            model_dir,
            PCA_FILE,
        )
        return {fitted: pca}
    training = load_training_pca(model_dir)
    projected = training.project(
        vocabulary_matrix(matrix, summary["token_ids"], len(training.feature_ids))
    )
    log.info(
        "evaluate: baselines on the held-out cells: PCA of %d cells x %d vocabulary genes -> %d "
        "PCs; the training cells' PCA (%d cells) projected -> %d dims",
        *matrix.shape,
        pca.shape[1],
        training.n_cells,
        projected.shape[1],
    )
    return {
        fitted: pca,
        f"PCA-{projected.shape[1]} of the training cells, projected (zero-shot)": projected,
    }


def _heldout_labels(h5ad, label_key: str, batch_key: str | None, cfg: dict):
    """Rows of the held-out file's labelled cells to score, their labels and their samples (one
    sample "all" without a batch_key), read from obs alone."""
    source = open_backed(h5ad)
    obs = source.obs.copy()
    source.file.close()
    keep = labelled_cells(obs, label_key, cfg["max_cells"], int(cfg["seed"]), h5ad)
    if batch_key is not None and batch_key not in obs:
        raise ValueError(
            f"{h5ad} has no obs column {batch_key!r} (heldout.batch_key); "
            f"columns: {list(obs.columns)}"
        )
    labels = obs[label_key].astype(str).to_numpy()[keep]
    samples = (
        obs[batch_key].astype(str).to_numpy()[keep] if batch_key else np.full(len(keep), "all")
    )
    return keep, labels, samples
