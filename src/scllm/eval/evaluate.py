"""Rules evaluate and evaluate_heldout: score the cell embeddings against a PCA baseline of the
same cells, and write the metrics table (TSV and HTML), UMAPs, the kNN F1 of each cell type and
the confusion counts.

For each representation (the model's cell embeddings, and PCA-50 of log-normalized HVGs of the
same cells; for held-out cells, of the model's vocabulary genes found in their file) on the cells
that carry a cell-type label: kNN accuracy and macro-F1, Leiden ARI and NMI, silhouettes and the
scIB metrics (``scllm.eval.metrics``); per cell type, the F1 of the same kNN predictions
(``write_per_cell_type``). The pretraining objective itself is reported too: masked-value MSE of
the best model on the validation cells (fixed masks) against predicting each cell's mean bin,
from ``epochs.tsv``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scllm.config import CHUNK_SIZE, EMBEDDING_KEY, EmbedConfig, EvaluateConfig, split_settings
from scllm.eval.metrics import masked_value_error, pca_baseline, score_representation
from scllm.eval.report import format_value, plot_one_colour_note, plot_umaps, write_table
from scllm.files import atomic_path
from scllm.h5ad import open_backed, open_matrix, read_rows, row_chunks
from scllm.workflow_config import did_you_mean

log = logging.getLogger("scllm")

UNLABELED = {"", "nan", "none", "na", "n/a", "unknown", "unassigned"}
BASELINE_TARGET_SUM = 1e4


# --- the PCA baseline's input --------------------------------------------------------------------


def log_normalized_hvgs(
    filtered_h5ad, hvg_ids, cells, *, chunk_size: int = CHUNK_SIZE
) -> sp.csr_matrix:
    """log1p(normalize_total(counts, 1e4)) of the HVGs for ``cells`` (obs names, in that order),
    totals over all genes, streamed from ``filtered_h5ad`` in row chunks (stays sparse).

    Parameters
    ----------
    filtered_h5ad : path
        filter_qc's counts.
    hvg_ids : list of str
        The HVGs' var names (Ensembl ids), in the columns' order.
    cells : array-like of str
        The obs names of the cells, in the rows' order.
    chunk_size : int
        Cells read at a time.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``cells`` x ``hvg_ids``, float32.

    Raises
    ------
    ValueError
        A cell or an HVG is not in ``filtered_h5ad`` (the embeddings or the HVG table come from
        another run).
    """
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
    matrix = log_normalized_rows(
        lambda start, stop: read_rows(adata, start, stop), adata.n_obs, columns, rows, chunk_size
    )
    adata.file.close()
    return matrix


def log_normalized_rows(read_block, n_obs: int, columns, rows, chunk_size: int) -> sp.csr_matrix:
    """log1p(normalize_total(counts, 1e4)) of ``columns`` for ``rows`` (in that order), totals over
    all genes; ``read_block(start, stop)`` gives a CSR block of counts, read in row chunks.

    Parameters
    ----------
    read_block : callable
        ``read_block(start, stop)``: the counts of rows ``start`` to ``stop`` (all genes), CSR.
    n_obs : int
        The rows of the whole matrix.
    columns : numpy.ndarray of int
        The positions of the genes to keep, in the output's order.
    rows : numpy.ndarray of int
        The positions of the cells to keep, in the output's order; only the chunks that hold
        one are read.
    chunk_size : int
        Rows read at a time.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``rows`` x ``columns``, float32.
    """
    from scllm.prep.binning import normalize_total

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


# --- the rules -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """The files an evaluation writes: the metrics table (TSV and HTML), UMAPs coloured by label
    and, for rule evaluate, by sample; and where asked for, the per-cell-type F1 table and the
    confusion counts (``write_per_cell_type``)."""

    table: Path
    html: Path
    umap_label: Path
    umap_sample: Path | None = None
    per_cell_type: Path | None = None
    confusion: Path | None = None

    @classmethod
    def of(cls, paths: tuple, names: tuple[str, ...], required: int, caller: str) -> Outputs:
        """The outputs of a rule from its positional paths.

        Parameters
        ----------
        paths : tuple
            The paths given, in the order of ``names``.
        names : tuple of str
            The fields they fill (``EVALUATE_OUTPUTS`` or ``HELDOUT_OUTPUTS``).
        required : int
            How many must be given; the rest are optional, all or none.
        caller : str
            The function's name, for the error.

        Returns
        -------
        Outputs
            The named paths, None for those not given.

        Raises
        ------
        TypeError
            Neither ``required`` nor ``len(names)`` paths were given.
        """
        if len(paths) not in (required, len(names)):
            raise TypeError(
                f"{caller}() takes {required} or {len(names)} output paths "
                f"({', '.join(names)}), not {len(paths)}"
            )
        return cls(**dict(zip(names, paths)))


EVALUATE_OUTPUTS = ("table", "html", "umap_label", "umap_sample", "per_cell_type", "confusion")
HELDOUT_OUTPUTS = ("table", "html", "umap_label", "per_cell_type", "confusion")


def labelled_cells(
    obs: pd.DataFrame, label_key: str, max_cells: int, seed: int, where, setting: str
) -> np.ndarray:
    """Rows of ``obs`` with a usable ``label_key`` label, at most ``max_cells`` (a seeded
    sample).

    A label is unusable when missing, or when it reads (stripped, in lower case) as one of
    ``UNLABELED`` ("", "nan", "unknown", ...).

    Parameters
    ----------
    obs : pandas.DataFrame
        The cells' annotations.
    label_key : str
        The column of the labels.
    max_cells : int
        The most cells to keep.
    seed : int
        Seed of the sample taken above ``max_cells``.
    where : str or path
        The input, for messages.
    setting : str
        The config setting that names ``label_key`` (e.g. heldout.label_key), which a message
        says to change.

    Returns
    -------
    numpy.ndarray
        The kept rows' positions in ``obs``, ascending.

    Raises
    ------
    ValueError
        ``obs`` has no ``label_key`` column, or fewer than 10 cells are kept.
    """
    if label_key not in obs:
        raise _missing_obs_column(where, label_key, setting, obs.columns, "the cell-type labels")
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
    cfg: EvaluateConfig,
    cells: str,
) -> tuple[list[dict], dict, dict]:
    """Score the embeddings ``X`` and each baseline on the same cells.

    Parameters
    ----------
    X : numpy.ndarray
        The model's embeddings of the scored cells.
    baselines : dict
        Name -> the baseline's coordinates of the same cells.
    labels, samples : array-like
        Each cell's label and sample.
    cfg : EvaluateConfig
        How to score.
    cells : str
        What the ``cells`` column of the table says about them.

    Returns
    -------
    tuple
        The metrics-table rows (one group per baseline, named by it; ``cells`` describes the
        cells in the table), the UMAP panels, and each method's cross-validated kNN
        predictions ("scllm", then the baselines' names; None where none could be made).
    """
    label_key, batch_key = cfg.label_key, cfg.batch_key
    labels, samples = np.asarray(labels).astype(str), np.asarray(samples).astype(str)
    n_labels, n_samples = len(np.unique(labels)), len(np.unique(samples))
    log.info("evaluate: %d %s labels, %d %s value(s)", n_labels, label_key, n_samples, batch_key)
    common = dict(
        n_neighbors=cfg.n_neighbors,
        n_folds=cfg.n_folds,
        leiden_resolutions=cfg.leiden_resolutions,
        seed=int(cfg.seed),
    )
    ours, ours_umap = score_representation(X, labels, samples, **common)
    panels = {f"scLLM ({X.shape[1]} dims)": ours_umap}
    predictions = {"scllm": ours["_cv_predictions"]}
    table = []
    for name, coords in baselines.items():
        base, panels[name] = score_representation(coords, labels, samples, **common)
        predictions[name] = base["_cv_predictions"]
        table += [
            {
                "metric": m,
                "scllm": ours[m],
                "baseline": base[m],
                "baseline_method": name,
                "cells": cells,
                "details": d,
            }
            for m, d in _metric_details(ours, base, cfg, n_labels, n_samples)
        ]
    return table, panels, predictions


def _metric_details(ours: dict, base: dict, cfg: EvaluateConfig, n_labels, n_samples) -> list:
    """(metric, how it was measured) of the metrics table, in its order."""
    k = cfg.n_neighbors
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
        (
            "silhouette_label",
            f"{cfg.label_key}, Euclidean, in [-1, 1]: higher = labels separate",
        ),
        (
            "silhouette_sample",
            f"{cfg.batch_key}: near 0 = samples mix" if n_samples > 1 else "n/a: one sample",
        ),
        *_scib_details(cfg, n_samples),
    ]


def _scib_details(cfg: EvaluateConfig, n_samples: int) -> list:
    """(metric, how it was measured) of the scIB rows: scib-metrics' definitions, each scaled
    so that higher is better."""
    one = "n/a: one sample"
    return [
        (
            "scib_silhouette_label",
            f"scib-metrics silhouette_label: (silhouette_label + 1) / 2 over {cfg.label_key}, "
            "in [0, 1]: 0.5 = no separation, higher = labels separate",
        ),
        (
            "scib_graph_connectivity",
            f"scib-metrics graph_connectivity: per label, the share of its cells in the largest "
            f"connected piece of the k={cfg.n_neighbors} graph restricted to it, averaged; "
            "1 = every label is one piece",
        ),
        (
            "scib_silhouette_batch",
            f"scib-metrics silhouette_batch: 1 - |silhouette by {cfg.batch_key}| within each "
            "label, averaged; 1 = samples mix within every cell type"
            if n_samples > 1
            else one,
        ),
        (
            "scib_ilisi",
            "scib-metrics ilisi_knn: median inverse Simpson index of samples over 90 neighbours "
            "(perplexity 30), scaled to [0, 1]; 1 = samples mix evenly"
            if n_samples > 1
            else one,
        ),
    ]


def write_per_cell_type(labels, predictions: dict, per_cell_type, confusion) -> pd.DataFrame:
    """Per cell type, the F1 of each method's cross-validated kNN predictions, and the counts of
    true x predicted type.

    Parameters
    ----------
    labels : array-like
        Each scored cell's label.
    predictions : dict
        Method ("scllm", or a baseline's name as in metrics.tsv) -> each cell's out-of-fold
        predicted label (the predictions behind ``knn_macro_f1_cv``); None: no prediction was
        possible (fewer than two labels), the method is left out.
    per_cell_type, confusion : path
        Where to write the F1 table (cell_type, n_cells, then one column per method: the mean
        of a column is that method's knn_macro_f1_cv) and the confusion counts (long: method,
        cell_type, predicted, n_cells; every pair of types, zeros included). None: not written.

    Returns
    -------
    pandas.DataFrame
        The F1 table, most frequent type first.
    """
    from scllm.eval.metrics import confusion_counts, per_label_f1

    labels = np.asarray(labels).astype(str)
    made = {name: pred for name, pred in predictions.items() if pred is not None}
    counts = pd.Series(labels).value_counts()
    f1 = pd.DataFrame(
        {name: per_label_f1(labels, pred) for name, pred in made.items()},
        index=pd.Index(np.unique(labels)),
    )
    f1.insert(0, "n_cells", counts.reindex(f1.index).astype(int))
    f1 = f1.rename_axis("cell_type").reset_index()
    f1 = f1.sort_values(["n_cells", "cell_type"], ascending=[False, True], kind="stable")
    blocks = [pd.DataFrame(columns=["method", "cell_type", "predicted", "n_cells"])]
    for name, pred in made.items():
        square = confusion_counts(labels, pred).rename_axis(index="cell_type", columns="predicted")
        block = square.stack().rename("n_cells").reset_index()
        blocks.append(block.assign(method=name)[["method", "cell_type", "predicted", "n_cells"]])
    for frame, path in ((f1, per_cell_type), (pd.concat(blocks), confusion)):
        if path is not None:
            with atomic_path(path) as tmp:
                frame.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    return f1


def _write_results(
    scored: tuple, title, labels, colourings: list[tuple], outputs: Outputs, seed: int
) -> pd.DataFrame:
    """Write what ``score_against_pca`` gave (``scored``: table rows, UMAP panels, predictions
    of ``labels``) to ``outputs``; log the table."""
    table, panels, predictions = scored
    result = write_table(table, outputs.table, outputs.html, title)
    if outputs.per_cell_type is not None or outputs.confusion is not None:
        write_per_cell_type(labels, predictions, outputs.per_cell_type, outputs.confusion)
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
            format_value(r["scllm"]),
            format_value(r["baseline"]),
        )
    return result


@dataclass(frozen=True)
class ZeroShot:
    """train.init_from: what the continued model gives these cells before adapting to them."""

    embeddings: str | Path  # its embedding of the same cells (rule embed_zero_shot)
    training_pca: str | Path | None = None  # its training cells' PCA, where it kept one


def evaluate(
    embeddings_h5ad,
    filtered_h5ad,
    hvg_table,
    epochs_tsv,
    *outputs,
    args_json=None,
    zero_shot: ZeroShot | None = None,
    **settings,
) -> pd.DataFrame:
    """Score the embeddings of ``embeddings_h5ad`` and the PCA baseline, and write the results.

    Parameters
    ----------
    embeddings_h5ad, filtered_h5ad, hvg_table, epochs_tsv : path
        Rule embed's embeddings, filter_qc's counts (the baseline's input), select_hvg's
        vocabulary and pretrain's epochs.tsv (the masked-value error).
    *outputs : path
        Four or six paths (``EVALUATE_OUTPUTS``): the metrics table (TSV and HTML), UMAPs
        coloured by label and by sample, and optionally the per-cell-type F1 table and the
        confusion counts (``write_per_cell_type``).
    args_json : path, optional
        The model's args.json: the number of validation cells behind the masked-value error,
        and train.gepc_targets (the GEPC row says when its error is not comparable with the
        baseline).
    zero_shot : ZeroShot, optional
        train.init_from: adds the continued model's baselines.
    **settings
        The evaluate section (``EvaluateConfig``) and ``chunk_size`` (cells read at a time).

    Returns
    -------
    pandas.DataFrame
        The metrics table as written.

    Raises
    ------
    TypeError
        Neither four nor six ``outputs``.
    ValueError
        An unknown setting; ``embeddings_h5ad`` lacks the label or batch column or the
        embedding, or has fewer than 10 labelled cells; a scored cell or an HVG is not in
        ``filtered_h5ad``, or a scored cell not in the zero-shot embeddings (files of another
        run); ``epochs_tsv`` holds no epoch.
    """
    from scllm.prep.hvg import read_hvg_table

    chunk_size = settings.pop("chunk_size", CHUNK_SIZE)
    out = Outputs.of(outputs, EVALUATE_OUTPUTS, 4, "evaluate")
    cfg = EvaluateConfig.from_dict(settings)
    t0 = time.time()
    label_key, batch_key, seed = cfg.label_key, cfg.batch_key, int(cfg.seed)
    emb, keep = _labelled_embeddings(embeddings_h5ad, cfg)
    cells_setting = emb.uns.get("scllm", {}).get("cells", "given")
    sub = emb[keep]
    labels = sub.obs[label_key].astype(str).to_numpy()
    samples = sub.obs[batch_key].astype(str).to_numpy()

    vocabulary = read_hvg_table(hvg_table)
    # A continued model's vocabulary may hold genes these cells lack (in_data False): zeros.
    present = vocabulary["in_data"].to_numpy()
    hvgs = vocabulary["feature_id"][present].tolist()
    matrix = log_normalized_hvgs(filtered_h5ad, hvgs, sub.obs_names, chunk_size=chunk_size)
    pca = pca_baseline(matrix, n_pcs=cfg.n_pcs, seed=seed)
    log.info("evaluate: PCA baseline: %d cells x %d HVGs -> %d PCs", *matrix.shape, pca.shape[1])
    X = np.asarray(sub.obsm[EMBEDDING_KEY])
    cells = f"{len(keep)} ({cells_setting})"
    baselines = {f"PCA-{pca.shape[1]} of log-normalized HVGs": pca}
    if zero_shot is not None:
        token_ids = np.flatnonzero(present)
        baselines |= _zero_shot_baselines(zero_shot, sub.obs_names, matrix, token_ids)
    scored = score_against_pca(X, baselines, labels, samples, cfg, cells)
    scored[0].extend(masked_value_rows(epochs_tsv, args_json))
    n_labels, n_samples = len(np.unique(labels)), len(np.unique(samples))
    title = (
        f"scLLM embeddings ({X.shape[1]} dims) vs PCA-{pca.shape[1]} of log-normalized HVGs: "
        f"{len(keep)} cells ({cells_setting}), {n_labels} {label_key} labels, "
        f"{n_samples} sample(s)"
    )
    colourings = [(out.umap_label, labels, label_key), (out.umap_sample, samples, batch_key)]
    result = _write_results(scored, title, labels, colourings, out, seed)
    log.info(
        "evaluate: %d cells in, %d scored; wrote %s in %.1fs",
        emb.n_obs,
        len(keep),
        ", ".join(str(path) for path in asdict(out).values() if path is not None),
        time.time() - t0,
    )
    return result


def _zero_shot_baselines(zero_shot: ZeroShot, cells, matrix, token_ids) -> dict:
    """The continued model's embedding of ``cells`` as it was, and its training cells' PCA
    projected onto them (``matrix``: log-normalized vocabulary genes found, ``token_ids``)."""
    import anndata as ad

    from scllm.eval.baselines import TrainingPCA

    before = ad.read_h5ad(zero_shot.embeddings)
    rows = before.obs_names.get_indexer(pd.Index(cells))
    if (rows < 0).any():
        raise ValueError(
            f"{int((rows < 0).sum())} scored cells are not in {zero_shot.embeddings}; rerun "
            "embed_zero_shot"
        )
    found = {"the continued model, zero-shot": np.asarray(before.obsm[EMBEDDING_KEY])[rows]}
    if zero_shot.training_pca is not None:
        training = TrainingPCA.load(zero_shot.training_pca)
        name = f"PCA-{training.components.shape[0]} of the continued model's training cells"
        found[f"{name}, projected (zero-shot)"] = training.project_found(matrix, token_ids)
    return found


def _missing_obs_column(where, key, setting, columns, role="", or_null=False) -> ValueError:
    """The error for an obs column a setting names that the file lacks: the setting to change,
    the file's columns (or null where the setting may be) and the column spelt most like it."""
    columns = [str(c) for c in columns]
    named = f"{setting}, {role}" if role else setting
    return ValueError(
        f"{where} has no obs column {key!r} ({named}): set {setting} to one of its columns, "
        f"{columns}{', or null' if or_null else ''}.{did_you_mean(key, columns)}"
    )


def _labelled_embeddings(embeddings_h5ad, cfg: EvaluateConfig):
    """The embeddings file, checked for the label and batch columns and the embedding, and the
    rows of the labelled cells to score (at most evaluate.max_cells)."""
    import anndata as ad

    emb = ad.read_h5ad(embeddings_h5ad)
    for key, what in (
        (cfg.label_key, "evaluate.label_key"),
        (cfg.batch_key, "evaluate.batch_key"),
    ):
        if key not in emb.obs:
            raise _missing_obs_column(embeddings_h5ad, key, what, emb.obs.columns)
    if EMBEDDING_KEY not in emb.obsm:
        raise ValueError(f"{embeddings_h5ad} has no obsm[{EMBEDDING_KEY!r}]; rerun the embed rule")
    keep = labelled_cells(
        emb.obs,
        cfg.label_key,
        cfg.max_cells,
        int(cfg.seed),
        f"{embeddings_h5ad} (embed.cells: all embeds every cell)",
        "evaluate.label_key",
    )
    return emb, keep


def masked_value_rows(epochs_tsv, args_json=None) -> list[dict]:
    """The metrics table's rows for the masked-value error of both heads against the baseline of
    each cell's mean visible bin, at the best validation epoch.

    Parameters
    ----------
    epochs_tsv : path
        pretrain's ``epochs.tsv``.
    args_json : path, optional
        The model's args.json: the number of validation cells (the rows' ``cells``) and
        train.gepc_targets (other than "masked", the GEPC row is marked not comparable with the
        baseline). None: the cells are "validation", and the GEPC row is taken as comparable.

    Returns
    -------
    list of dict
        Two rows of the metrics table, ``masked_mse_expression`` and ``masked_mse_gepc``.

    Raises
    ------
    ValueError
        ``epochs_tsv`` holds no epoch.
    """
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
    chunk_size: int = CHUNK_SIZE,
) -> sp.csr_matrix:
    """log1p(normalize_total(counts, 1e4)) of the input ``columns`` (the model's vocabulary genes
    as found in the file) for ``rows``, totals over all the file's genes, read in row chunks.

    Parameters
    ----------
    h5ad : path
        The cells' h5ad.
    columns : numpy.ndarray of int
        The positions of the genes to keep in the file's var, in the output's order.
    rows : numpy.ndarray of int
        The positions of the cells to keep, in the output's order.
    counts_layer : str, optional
        The layer holding the counts; None: X.
    chunk_size : int
        Cells read at a time.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``rows`` x ``columns``, float32.

    Raises
    ------
    ValueError
        The file has no such layer.
    InputError
        The matrix records no shape, or is not one ``scllm embed`` reads.
    """
    with open_matrix(h5ad, counts_layer) as matrix:
        return log_normalized_rows(matrix.rows, matrix.n_obs, columns, rows, chunk_size)


def evaluate_heldout(
    model_dir,
    h5ad,
    out_embeddings,
    *outputs,
    label_key: str,
    batch_key: str | None = None,
    **settings,
) -> pd.DataFrame:
    """Score the model on cells it never saw.

    Embeds ``h5ad`` as ``scllm embed`` does and fits the PCA baseline on the same cells
    (log-normalized counts of the model's vocabulary genes found in the file); with the model's
    training PCA, projects it onto them too (the zero-shot baseline).

    Parameters
    ----------
    model_dir, h5ad, out_embeddings : path
        The trained model's folder; any h5ad of counts with its own ``label_key`` labels;
        where its embeddings go.
    *outputs : path
        Three or five paths (``HELDOUT_OUTPUTS``): the metrics table (TSV and HTML), the UMAP
        by label, and optionally the per-cell-type F1 table and the confusion counts.
    label_key : str
        The obs column of the cell-type labels.
    batch_key : str, optional
        The obs column of the samples (none: one sample, no batch metrics).
    **settings
        The evaluate section (``EvaluateConfig``) and how to embed (``EmbedConfig``:
        gene_id_column, counts_layer, min_coverage, device, batch_size, chunk_size).

    Returns
    -------
    pandas.DataFrame
        The metrics table as written.

    Raises
    ------
    TypeError
        Neither three nor five ``outputs``.
    ValueError
        An unknown setting; ``h5ad`` lacks the ``label_key`` or ``batch_key`` column, or has
        fewer than 10 labelled cells (checked before any work).
    GeneCoverageError
        Too few of the model's vocabulary genes found in ``h5ad`` (a ValueError), and the other
        errors of ``embed_h5ad`` (e.g. ``UnsafeOutputError`` for ``out_embeddings``).
    """
    import anndata as ad

    from scllm.eval.embed import embed_h5ad

    out = Outputs.of(outputs, HELDOUT_OUTPUTS, 3, "evaluate_heldout")
    evaluation, embedding, rest = split_settings(settings, EvaluateConfig, EmbedConfig)
    cfg = EvaluateConfig.from_dict({**evaluation, **rest, "label_key": label_key})
    embed_cfg = EmbedConfig(**embedding)
    t0 = time.time()
    # Check the labels before any work, so a refused file leaves nothing behind.
    keep, labels, samples = _heldout_labels(h5ad, label_key, batch_key, cfg)

    summary = embed_h5ad(model_dir, h5ad, out_embeddings, embed_cfg)
    emb = ad.read_h5ad(out_embeddings)
    # The baseline sees the vocabulary genes the embedding found.
    baselines = _heldout_baselines(model_dir, h5ad, summary, keep, embed_cfg, cfg)
    X = np.asarray(emb.obsm[EMBEDDING_KEY])[keep]
    name = Path(h5ad).name
    scored = score_against_pca(
        X,
        baselines,
        labels,
        samples,
        replace(cfg, batch_key=batch_key or "sample"),
        f"{len(keep)} (held out: {name})",
    )
    title = (
        f"scLLM embeddings ({X.shape[1]} dims) of {len(keep)} held-out cells ({name}, "
        f"{summary['coverage']:.0%} of the vocabulary found) vs PCA of the same cells and the "
        "training cells' PCA projected onto them"
    )
    colourings = [(out.umap_label, labels, label_key)]
    result = _write_results(scored, title, labels, colourings, out, int(cfg.seed))
    log.info(
        "evaluate: %s: %d cells, %d scored; wrote %s in %.1fs",
        h5ad,
        emb.n_obs,
        len(keep),
        ", ".join(str(path) for path in asdict(out).values() if path is not None),
        time.time() - t0,
    )
    return result


def _heldout_baselines(
    model_dir, h5ad, summary: dict, keep, embed_cfg: EmbedConfig, cfg: EvaluateConfig
) -> dict[str, np.ndarray]:
    """PCA fitted on the held-out cells themselves, and the PCA of the model's training cells
    projected onto them (the zero-shot baseline), both over the vocabulary genes found."""
    from scllm.eval.baselines import PCA_FILE, load_training_pca

    matrix = log_normalized_vocab_genes(
        h5ad,
        summary["columns"],
        keep,
        counts_layer=embed_cfg.counts_layer,
        chunk_size=embed_cfg.chunk_size,
    )
    pca = pca_baseline(matrix, n_pcs=cfg.n_pcs, seed=int(cfg.seed))
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
    projected = training.project_found(matrix, summary["token_ids"])
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


def _heldout_labels(h5ad, label_key: str, batch_key: str | None, cfg: EvaluateConfig):
    """Rows of the held-out file's labelled cells to score, their labels and their samples (one
    sample "all" without a batch_key), read from obs alone."""
    source = open_backed(h5ad, own=False)  # heldout.path: your file
    obs = source.obs.copy()
    source.file.close()
    keep = labelled_cells(obs, label_key, cfg.max_cells, int(cfg.seed), h5ad, "heldout.label_key")
    if batch_key is not None and batch_key not in obs:
        raise _missing_obs_column(h5ad, batch_key, "heldout.batch_key", obs.columns, or_null=True)
    labels = obs[label_key].astype(str).to_numpy()[keep]
    samples = (
        obs[batch_key].astype(str).to_numpy()[keep] if batch_key else np.full(len(keep), "all")
    )
    return keep, labels, samples
