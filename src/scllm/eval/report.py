"""What the evaluation shows: the metrics table (TSV and HTML, the better side marked), the
UMAPs, and the run's report, one self-contained HTML page (results/<run>/report.html) with what
each stage did and what the model learned: QC and sample tables (and a per-cell QC figure where
the caller draws one), the HVG list, the loss curves with the epochs table folded away, the
metrics, the F1 of each cell type and the confusions of the model and of the best baseline, the
UMAPs, and how the run was made (``scllm.eval.how_made``), each with a caption; with
heldout.path, the scores on cells the model never saw too.

Images are embedded (base64), so the page can be mailed or archived alone. Rows whose metric
does not apply to the run (e.g. sample metrics with one sample) are left out.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scllm.config import TrainConfig
from scllm.eval.how_made import provenance_section, read_run_record
from scllm.eval.metrics import f1_from_counts
from scllm.files import atomic_path

log = logging.getLogger("scllm")

# Which way is better, per metric; metrics not listed get no winner.
HIGHER_IS_BETTER = {
    "knn_accuracy_cv",
    "knn_macro_f1_cv",
    "knn_accuracy_heldout_sample",
    "knn_macro_f1_heldout_sample",
    "leiden_ari",
    "leiden_nmi",
    "silhouette_label",
    # scib-metrics' definitions, each scaled so that higher is better
    "scib_silhouette_label",
    "scib_graph_connectivity",
    "scib_silhouette_batch",
    "scib_ilisi",
}
LOWER_IS_BETTER = {"masked_mse_expression", "masked_mse_gepc"}
CLOSER_TO_ZERO_IS_BETTER = {"silhouette_sample"}
# Rows that restate another on another scale: "In short" counts the score once.
RESCALED = {"scib_silhouette_label"}
MAX_ROWS = (
    200  # longer tables (samples of a real Census run, the HVG list) show this many, then say so
)

STYLE = (
    "<style>\n"
    "body{font-family:system-ui,sans-serif;font-size:14px;max-width:1100px;margin:2em auto;"
    "color:#222}\n"
    "h1{font-size:22px} h2{font-size:17px;margin-top:2em;border-bottom:1px solid #ccc}\n"
    # a wide table scrolls inside the page rather than running off it
    "table{border-collapse:collapse;margin:.5em 0;display:block;overflow-x:auto;max-width:100%} "
    "td,th{padding:3px 9px;border-bottom:1px solid #e3e3e3;text-align:left}\n"
    "th{background:#f4f4f4} td.win{font-weight:bold;background:#e6f4e6} h3{font-size:15px} "
    "p.caption{color:#555;max-width:900px}\n"
    "img{max-width:100%;border:1px solid #eee}\n"
    "</style>"
)


def winner(metric: str, ours: float, baseline: float) -> str | None:
    """'scllm', 'baseline', 'tie' or None (no direction for this metric, or a value missing).

    Parameters
    ----------
    metric : str
        The metric's name; ``HIGHER_IS_BETTER``, ``LOWER_IS_BETTER`` and
        ``CLOSER_TO_ZERO_IS_BETTER`` say which way is better.
    ours, baseline : float
        The model's value and the baseline's.

    Returns
    -------
    str or None
        The better side; 'tie' when they are within 5e-4 of each other; None for a metric in
        none of the sets, or a value that is NaN or infinite.
    """
    if not (np.isfinite(ours) and np.isfinite(baseline)):
        return None
    if metric in HIGHER_IS_BETTER:
        a, b = ours, baseline
    elif metric in LOWER_IS_BETTER:
        a, b = -ours, -baseline
    elif metric in CLOSER_TO_ZERO_IS_BETTER:
        a, b = -abs(ours), -abs(baseline)
    else:
        return None
    return "tie" if np.isclose(a, b, rtol=0, atol=5e-4) else ("scllm" if a > b else "baseline")


def metrics_html(table: pd.DataFrame) -> str:
    """The metrics as an HTML table: n/a rows dropped, the better value of each row in bold, the
    baseline's name in the header (it is the same for a group of rows), details kept.

    Parameters
    ----------
    table : pandas.DataFrame
        The metrics table (``TABLE_COLUMNS``). A row whose details say "not comparable" gets
        no winner.

    Returns
    -------
    str
        One HTML table per baseline method, in the order they first appear (both values bold
        on a tie); a paragraph saying no metric applies when no row has both values.
    """
    rows = table[
        np.isfinite(table["scllm"].astype(float)) & np.isfinite(table["baseline"].astype(float))
    ]
    if rows.empty:
        return "<p>No metric applies to these cells.</p>"
    parts = []
    for method, group in rows.groupby("baseline_method", sort=False):
        body = []
        for r in group.itertuples():
            best = (
                None
                if "not comparable" in str(r.details)
                else winner(r.metric, float(r.scllm), float(r.baseline))
            )
            cells = [
                _cell(r.scllm, best in ("scllm", "tie")),
                _cell(r.baseline, best in ("baseline", "tie")),
            ]
            verdict = {
                "scllm": "scLLM",
                "baseline": "baseline",
                "tie": "tie",
                None: "not comparable",
            }[best]
            body.append(
                f"<tr><td>{html.escape(r.metric)}</td>{''.join(cells)}<td>{verdict}</td>"
                f"<td>{html.escape(str(r.cells))}</td><td>{html.escape(str(r.details))}</td></tr>"
            )
        parts.append(
            "<table><tr><th>metric</th><th>scLLM</th>"
            f"<th>baseline: {html.escape(str(method))}</th>"
            f"<th>better</th><th>cells</th><th>details</th></tr>{''.join(body)}</table>"
        )
    return "\n".join(parts)


def summary_html(table: pd.DataFrame) -> str:
    """A few sentences on whether the model's embedding beats each baseline, from the metrics.

    Parameters
    ----------
    table : pandas.DataFrame
        The metrics table (``TABLE_COLUMNS``).

    Returns
    -------
    str
        One paragraph per baseline: the scores the model wins, ties and loses (with both
        values), counting only rows with a direction and both values.
    """
    rows = table[
        np.isfinite(table["scllm"].astype(float)) & np.isfinite(table["baseline"].astype(float))
    ]
    paragraphs = []
    for method, group in rows.groupby("baseline_method", sort=False):
        verdicts: dict[str, list[str]] = {"scllm": [], "tie": [], "baseline": []}
        for r in group.itertuples():
            best = (
                None
                if "not comparable" in str(r.details) or r.metric in RESCALED
                else winner(r.metric, r.scllm, r.baseline)
            )
            if best is not None:
                values = f"{_short(r.scllm)} vs {_short(r.baseline)}"
                verdicts[best].append(f"{html.escape(r.metric)} ({values})")
        if not any(verdicts.values()):
            continue
        n = sum(len(v) for v in verdicts.values())
        said = [
            f"better on {len(verdicts['scllm'])} of {n}: " + ", ".join(verdicts["scllm"])
            if verdicts["scllm"]
            else f"better on none of {n}",
            ("level on " + ", ".join(verdicts["tie"])) if verdicts["tie"] else "",
            ("worse on " + ", ".join(verdicts["baseline"])) if verdicts["baseline"] else "",
        ]
        cells = html.escape(str(group["cells"].iloc[0]))
        paragraphs.append(
            f"<p>Against <b>{html.escape(str(method))}</b> ({cells} cells), the model is "
            f"{'; '.join(s for s in said if s)}.</p>"
        )
    return "".join(paragraphs) or "<p>No score compares the model with a baseline here.</p>"


def _short(value: float) -> str:
    """A score as the tables show it: 3 decimals below 10, 1 above."""
    value = float(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _cell(value: float, bold: bool) -> str:
    text = _short(value)
    return f"<td class='win'>{text}</td>" if bold else f"<td>{text}</td>"


def _table(frame: pd.DataFrame, what: str) -> str:
    shown = frame.head(MAX_ROWS)
    note = (
        f"<p class='caption'>First {MAX_ROWS} of {len(frame)} {what}; the file has all.</p>"
        if len(frame) > MAX_ROWS
        else ""
    )
    return (
        shown.to_html(index=False, border=0, escape=True, float_format=lambda v: f"{v:.4g}") + note
    )


def _hvg_list(hvgs: pd.DataFrame) -> str:
    top = ", ".join(html.escape(str(g)) for g in hvgs["feature_name"].head(50))
    columns = [c for c in ("feature_name", "feature_id", "variances_norm") if c in hvgs]
    full = hvgs[columns].to_html(
        index=False, border=0, escape=True, float_format=lambda v: f"{v:.4g}"
    )
    return f"<p>{top}</p><details><summary>All {len(hvgs)} genes</summary>{full}</details>"


def _image(path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(Path(path).name)}' src='data:image/png;base64,{data}'>"


def _section(title: str, caption: str, content: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n<p class='caption'>{caption}</p>\n{content}\n"


def _read_tsv(path) -> pd.DataFrame:
    # only empty fields are missing: a cell type named NA, null or None is a name
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows, as the earlier rules wrote it (paths)."""

    qc_tsv: Path
    samples_tsv: Path
    hvg_tsv: Path
    epochs_tsv: Path
    loss_curve_png: Path
    metrics_tsv: Path
    umap_cell_type_png: Path
    umap_sample_png: Path
    # Rule evaluate's per-cell-type F1 and confusion counts (write_per_cell_type).
    per_cell_type_tsv: Path | None = None
    confusion_tsv: Path | None = None
    # results/<run>/run.json: the resolved config, commit, versions, benchmark files.
    run_record_json: Path | None = None
    # Given only when heldout.path is set (rule evaluate_heldout).
    heldout_metrics_tsv: Path | None = None
    heldout_umap_png: Path | None = None
    heldout_per_cell_type_tsv: Path | None = None


def write_report(
    out_html, inputs: ReportInputs, *, run: str, qc_plot_png: Path | None = None
) -> list[str]:
    """Write the run's report, one self-contained HTML page.

    Parameters
    ----------
    out_html : path
        Where the page goes.
    inputs : ReportInputs
        The files it shows; sections whose optional file is None are left out.
    run : str
        The run's name (its title).
    qc_plot_png : path, optional
        A per-cell QC figure (drawn by the caller, ``scllm.eval.qc_plots.plot_qc``), embedded in
        the QC section.

    Returns
    -------
    list of str
        The titles of the sections it holds, in order.

    Raises
    ------
    ValueError
        ``inputs.run_record_json`` is not valid JSON or lacks a field (``read_run_record``).
    """
    files = inputs
    samples_section, n_samples = _samples_section(files.samples_tsv)
    record = read_run_record(files.run_record_json) if files.run_record_json else None
    sections = [
        (
            "In short",
            "Each score of the model's cell embedding against each baseline (values: model vs "
            "baseline; the sections below say what each score means and on which cells).",
            summary_html(_read_tsv(files.metrics_tsv)),
        ),
        samples_section,
        *_preprocessing_sections(files.qc_tsv, files.hvg_tsv, qc_plot_png),
        _pretraining_section(files, record),
        *_model_sections(files),
    ]
    if n_samples > 1:
        sections.append(
            (
                "UMAP by sample",
                "The same UMAPs coloured by sample: mixed colours mean the "
                "embedding does not separate cells by where they came from.",
                _image(files.umap_sample_png),
            )
        )
    if files.heldout_metrics_tsv is not None:
        sections.append(_heldout_section(files))
    if record is not None:
        sections.append(provenance_section(record))
    body = "".join(_section(*s) for s in sections)
    title = html.escape(run)
    with atomic_path(out_html) as tmp:
        Path(tmp).write_text(
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>scLLM run {title}"
            f"</title>{STYLE}</head><body><h1>scLLM-pretrain: run {title}</h1>\n{body}"
            "</body></html>\n"
        )
    log.info(
        "report: %d sections (%s) -> %s",
        len(sections),
        ", ".join(s[0] for s in sections),
        out_html,
    )
    return [s[0] for s in sections]


def _samples_section(samples_tsv) -> tuple[tuple[str, str, str], int]:
    """The samples table with how many were chosen; also returns that number."""
    samples = _read_tsv(samples_tsv)
    chosen = samples[samples["chosen"].astype(str) == "True"] if "chosen" in samples else samples
    n_cells = int(chosen["n_cells"].sum()) if "n_cells" in chosen else "n/a"
    caption = (
        f"{len(chosen)} sample(s) (dataset, donor) chosen of {len(samples)} eligible, "
        f"{n_cells} cells (samples.tsv)."
    )
    return ("Samples", caption, _table(samples, "samples")), len(chosen)


def _preprocessing_sections(qc_tsv, hvg_tsv, qc_plot_png=None) -> list[tuple[str, str, str]]:
    hvgs = _read_tsv(hvg_tsv)
    qc_caption = (
        "Cells and genes before and after filter_qc, over all cells and per sample, "
        "with the thresholds used (qc.tsv)."
    )
    qc_content = _table(_read_tsv(qc_tsv), "rows")
    if qc_plot_png is not None:
        qc_caption += (
            " The figure shows each cell's QC measures before filtering with the thresholds "
            "(qc.min_genes_per_cell, qc.max_mito_fraction) as lines: cells on the far side of a "
            "line were removed."
        )
        qc_content += _image(qc_plot_png)
    return [
        ("Quality control", qc_caption, qc_content),
        (
            "Highly variable genes",
            f"The {len(hvgs)} HVGs, the model's vocabulary, in rank order (hvg.tsv); "
            "the 50 most variable first, all of them below.",
            _hvg_list(hvgs),
        ),
    ]


def _pretraining_section(files: ReportInputs, record: dict | None) -> tuple[str, str, str]:
    """The loss curves with what each panel measures, the epochs table folded away."""
    weights = "train.gepc_weight x GEPC MSE + train.contrastive_weight x contrastive InfoNCE"
    if record is not None:  # the run's own weights, the schema's defaults where it sets none
        train = {**TrainConfig().to_dict(), **record["config"].get("train", {})}
        weights = (
            f"{train['gepc_weight']:g} x GEPC MSE + {train['contrastive_weight']:g} x "
            "contrastive InfoNCE"
        )
    caption = (
        "Each quantity on its own axis (model/loss_curve.png). <b>Training</b>, per logged "
        f"step: the objective the optimizer minimises (masked expression MSE + {weights}), "
        "then each term alone: the expression head's MSE on masked tokens, the GEPC head's "
        "MSE (on the genes train.gepc_targets names: with <i>all</i>, the whole vocabulary "
        "profile, mostly zeros), the InfoNCE between two views of each cell. "
        "<b>Validation</b>, per epoch, with fixed masks: each head's MSE on masked tokens "
        "against predicting each cell's mean visible bin (dashed); lower is better, and a head "
        "below the dashed line has learnt more than each cell's average. The objective and "
        "the validation MSEs are different quantities: compare the training expression MSE "
        "with the validation expression MSE, not the objective with either."
    )
    epochs = _read_tsv(files.epochs_tsv)
    table = (
        f"<details><summary>Per-epoch table ({len(epochs)} epochs, epochs.tsv)</summary>"
        f"{_table(epochs, 'epochs')}</details>"
    )
    return "Pretraining", caption, _image(files.loss_curve_png) + table


def _model_sections(files: ReportInputs) -> list[tuple[str, str, str]]:
    metrics = _read_tsv(files.metrics_tsv)
    sections = [
        (
            "Cell embedding vs PCA",
            "How well the model's cell embedding tells the labelled cell types apart, "
            "next to PCA of log-normalized HVGs on the same cells; the better value is in bold "
            "(metrics.tsv). Metrics that do not apply to this run are left out. Rows named "
            "scib_* follow scib-metrics' definitions, scaled to [0, 1] with higher better, so "
            "they compare with published scIB tables."
            + _continued_model_caption(metrics["baseline_method"].astype(str)),
            metrics_html(metrics),
        ),
    ]
    if files.per_cell_type_tsv is not None:
        sections.append(per_cell_type_section(files.per_cell_type_tsv))
    if files.confusion_tsv is not None:
        sections.append(confusion_section(files.confusion_tsv))
    sections.append(
        (
            "UMAP by cell type",
            "UMAPs of the scLLM embedding and of the PCA baseline, coloured by cell type.",
            _image(files.umap_cell_type_png),
        )
    )
    return sections


# --- cell types: F1 per type and the confusions --------------------------------------------------

# The model's column in per_cell_type.tsv and its method in confusion.tsv; the baselines go by
# their names in metrics.tsv.
MODEL = "scllm"


def _method_name(method: str) -> str:
    return "scLLM" if method == MODEL else str(method)


def per_cell_type_html(frame: pd.DataFrame) -> str:
    """The per-cell-type F1 table (``per_cell_type.tsv``) as HTML: cell types x methods, the
    cell counts, the best value of each row in bold, and a last row of the means (macro-F1).

    Parameters
    ----------
    frame : pandas.DataFrame
        Columns cell_type, n_cells, then one F1 column per method.

    Returns
    -------
    str
        An HTML table.
    """
    methods = [c for c in frame.columns if c not in ("cell_type", "n_cells")]
    header = "".join(f"<th>{html.escape(_method_name(m))}</th>" for m in methods)
    rows = [
        (html.escape(str(r["cell_type"])), str(int(r["n_cells"])), r[methods].astype(float))
        for _, r in frame.iterrows()
    ]
    rows.append(
        (
            "<i>mean over types = macro-F1</i>",
            str(int(frame["n_cells"].sum())),
            frame[methods].mean(),
        )
    )
    body = []
    for name, count, values in rows:
        best = np.nanmax(values.to_numpy()) if values.notna().any() else np.nan
        cells = "".join(
            _cell(v, bool(np.isfinite(v) and np.isclose(v, best, rtol=0, atol=5e-4)))
            for v in values
        )
        body.append(f"<tr><td>{name}</td><td>{count}</td>{cells}</tr>")
    return f"<table><tr><th>cell type</th><th>cells</th>{header}</tr>{''.join(body)}</table>"


def per_cell_type_section(per_cell_type_tsv) -> tuple[str, str, str]:
    """The report section of the F1 of each cell type, for the model and each baseline.

    Parameters
    ----------
    per_cell_type_tsv : path
        Rule evaluate's ``per_cell_type.tsv``.

    Returns
    -------
    tuple of str
        Title, caption, HTML content.
    """
    caption = (
        "How well each cell type is recognised: the F1 of the kNN classifier's "
        "cross-validated predictions (the ones behind knn_macro_f1_cv) for each cell type, for "
        "the model's embedding and each baseline (evaluation/per_cell_type.tsv). F1 is in "
        "[0, 1], higher is better (1: every cell of the type labelled right and no other cell "
        "labelled as it); the best value of each row is in bold. Rare types weigh as much as "
        "common ones in the last row, the macro-F1 of the metrics table."
    )
    return "F1 per cell type", caption, per_cell_type_html(_read_tsv(per_cell_type_tsv))


def confusion_squares(confusion: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Method -> true type x predicted type counts, from ``confusion.tsv``'s long table; the
    types ordered by their number of cells, most first.

    Parameters
    ----------
    confusion : pandas.DataFrame
        Columns method, cell_type, predicted, n_cells.

    Returns
    -------
    dict
        One square table per method, in the file's order.
    """
    squares = {}
    for method, block in confusion.groupby("method", sort=False):
        square = block.pivot_table(
            index="cell_type", columns="predicted", values="n_cells", aggfunc="sum", fill_value=0
        )
        types = sorted(set(square.index) | set(square.columns))
        square = square.reindex(index=types, columns=types, fill_value=0)
        totals = square.sum(axis=1)
        order = sorted(types, key=lambda t: (-totals[t], t))
        squares[method] = square.loc[order, order].astype(int)
    return squares


def confusion_html(square: pd.DataFrame) -> str:
    """A confusion table as HTML: rows the true type (numbered, with its cells), columns the
    predicted type (by number), each count shaded by its share of the row, the diagonal (the
    correct predictions) outlined, zeros left blank.

    Parameters
    ----------
    square : pandas.DataFrame
        Counts, rows the true type, columns the predicted one, same order.

    Returns
    -------
    str
        An HTML table.
    """
    counts = square.to_numpy()
    totals = counts.sum(axis=1)
    header = "".join(
        f"<th title='{html.escape(str(t))}'>{i}</th>" for i, t in enumerate(square.columns, 1)
    )
    body = []
    for i, name in enumerate(square.index):
        cells = []
        for j, n in enumerate(counts[i]):
            share = n / totals[i] if totals[i] else 0.0
            outline = ";outline:2px solid #2c6e2c" if i == j else ""
            text = str(int(n)) if n else ""
            shade = f";background:rgba(44,110,44,{share:.2f})" if n else ""
            cells.append(
                f"<td style='text-align:right{shade}{';color:#fff' if share > 0.5 else ''}"
                f"{outline}'>{text}</td>"
            )
        label = f"{i + 1}. {html.escape(str(name))} ({int(totals[i])})"
        body.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>true \\ predicted</th>{header}</tr>{''.join(body)}</table>"


def confusion_section(confusion_tsv) -> tuple[str, str, str]:
    """The report section of the model's confusions and the best baseline's.

    Parameters
    ----------
    confusion_tsv : path
        Rule evaluate's ``confusion.tsv`` (every method); the baseline shown is the one with
        the best macro-F1.

    Returns
    -------
    tuple of str
        Title, caption, HTML content.
    """
    squares = confusion_squares(_read_tsv(confusion_tsv))
    baselines = {m: sq for m, sq in squares.items() if m != MODEL}
    shown = {m: squares[m] for m in (MODEL,) if m in squares}
    best = max(baselines, key=lambda m: f1_from_counts(baselines[m]).mean()) if baselines else None
    if best is not None:
        shown[best] = baselines[best]
    caption = (
        "Which cell types are mistaken for which (evaluation/confusion.tsv, every method): "
        "rows are the cells' true types, columns the type the cross-validated kNN classifier "
        "predicted, numbered as the rows. Each number counts cells; the shade is its share of "
        "the row (darker: more). The outlined diagonal holds the correct predictions; "
        "everything off it is a confusion, and fewer is better."
    )
    if best is not None:
        caption += (
            " Shown for the model and for the baseline with the best macro-F1 "
            f"({html.escape(best)})."
        )
    content = "".join(
        f"<h3>{html.escape(_method_name(m))} (macro-F1 {f1_from_counts(sq).mean():.3f})</h3>"
        + confusion_html(sq)
        for m, sq in shown.items()
    )
    return "Which cell types are confused", caption, content


def _continued_model_caption(methods: pd.Series) -> str:
    """What the train.init_from baselines mean, where the table has them."""
    caption = ""
    if (methods == "the continued model, zero-shot").any():
        caption += (
            " <i>The continued model, zero-shot</i>: the model this run continued "
            "(train.init_from), as it was before adapting to these cells; the adapted model "
            "should do better."
        )
    if methods.str.contains("continued model's training cells, projected").any():
        caption += (
            " <i>PCA of the continued model's training cells, projected</i>: a linear map "
            "learned from the cells that model learned from, applied to these cells."
        )
    return caption


def _heldout_section(files: ReportInputs) -> tuple[str, str, str]:
    """Scores on cells the model never saw (heldout.path), one table per baseline; the F1 per
    cell type where given."""
    table = _read_tsv(files.heldout_metrics_tsv)
    methods = table["baseline_method"].astype(str)
    caption = (
        f"{_heldout_cells(table['cells'])} that the model never saw (heldout.path), scored "
        "as above with the better value in bold (evaluation/heldout/metrics.tsv)."
    )
    if methods.str.endswith("(fitted on these cells)").any():
        caption += " <i>PCA fitted on these cells</i>: what the cells give with no model at all."
    if methods.str.endswith("training cells, projected (zero-shot)").any():
        caption += (
            " <i>The training cells' PCA, projected</i>: the zero-shot baseline, a linear map "
            "learned from the very cells the model learned from; a model that trails it has "
            "not carried over what its training cells hold."
        )
    content = metrics_html(table)
    if files.heldout_per_cell_type_tsv is not None:
        caption += (
            " Below the tables, the kNN F1 per cell type of these cells "
            "(evaluation/heldout/per_cell_type.tsv; best per row in bold)."
        )
        content += per_cell_type_html(_read_tsv(files.heldout_per_cell_type_tsv))
    if files.heldout_umap_png is not None:
        caption += " The UMAPs below are coloured by cell type."
        content += _image(files.heldout_umap_png)
    return "Cells the model never saw", caption, content


def _heldout_cells(cells: pd.Series) -> str:
    """'300 labelled cells of new.h5ad' from the cells column ('300 (held out: new.h5ad)')."""
    match = re.fullmatch(r"(\d+) \(held out: (.+)\)", str(cells.iloc[0]))
    if match is None:
        return f"Held-out cells ({html.escape(str(cells.iloc[0]))})"
    n, name = match.groups()
    return f"{n} labelled cells of <code>{html.escape(name)}</code>"


# --- the evaluation's own table and figures -----------------------------------------------------

TABLE_COLUMNS = ["metric", "scllm", "baseline", "baseline_method", "cells", "details"]


def _palette(n: int) -> list:
    from scanpy.plotting import palettes

    for pal in (palettes.default_20, palettes.default_28, palettes.default_102):
        if n <= len(pal):
            return list(pal)
    return [palettes.default_102[i % len(palettes.default_102)] for i in range(n)]


def plot_umaps(path, panels: dict[str, np.ndarray], colors, title: str, seed: int = 0) -> None:
    """Side-by-side UMAPs (one per representation) coloured by one categorical ``colors``.

    Parameters
    ----------
    path : path
        The PNG to write.
    panels : dict of str to numpy.ndarray
        Representation's name (the panel's title) -> its UMAP coordinates, cells x 2, the cells
        in the order of ``colors``.
    colors : array-like
        Each cell's category (compared as strings).
    title : str
        What the colours are (e.g. the label key): the legend's title and the figure's.
    seed : int
        Seed of the order the cells are drawn in (no category systematically on top).
    """
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


def format_value(v) -> str:
    """A value as the metrics TSV and the log show it.

    Parameters
    ----------
    v : object
        A metric's value, or any other cell of the table.

    Returns
    -------
    str
        "" for None or a NaN float, a float (numpy.float64 too) to 6 significant digits,
        anything else as ``str`` makes it.
    """
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], tsv_path, html_path=None, title: str = "") -> pd.DataFrame:
    """Write the metrics table as TSV and, where asked, as an HTML page.

    Parameters
    ----------
    rows : list of dict
        The table's rows, keyed by ``TABLE_COLUMNS`` (other keys are left out, missing ones
        left empty).
    tsv_path : path
        The TSV to write (values as ``format_value`` shows them).
    html_path : path, optional
        The HTML page to write (``metrics_html``); None: none.
    title : str
        The page's title and heading, as text (escaped: a file name may hold ``<`` or ``&``).

    Returns
    -------
    pandas.DataFrame
        The rows, in the columns ``TABLE_COLUMNS``, values unformatted.
    """
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    lines = ["\t".join(TABLE_COLUMNS)]
    lines += ["\t".join(format_value(r.get(c)) for c in TABLE_COLUMNS) for r in rows]
    with atomic_path(tsv_path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in lines))
    if html_path is not None:
        heading = html.escape(title)
        with atomic_path(html_path) as tmp:
            Path(tmp).write_text(
                f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{heading}</title>"
                f"{STYLE}</head><body><h3>{heading}</h3>{metrics_html(table)}</body></html>\n"
            )
    return table


def plot_one_colour_note(path, n_cells: int, name: str, value: str) -> None:
    """In place of a UMAP coloured by ``name`` when all cells share one value: it would be one
    colour.

    Parameters
    ----------
    path : path
        The PNG to write, a note in words.
    n_cells : int
        The cells, for the note.
    name : str
        What they would be coloured by (e.g. the batch key).
    value : str
        The value all of them share.
    """
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
