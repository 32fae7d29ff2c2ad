"""What the evaluation shows: the metrics table (TSV and HTML, the better side marked), the
UMAPs, and the run's report, one self-contained HTML page (results/<run>/report.html) with what
each stage did and what the model learned: QC and sample tables, the HVG list, the epochs table
and loss curve, the metrics, and the UMAPs, each with a caption; with heldout.path, the scores on
cells the model never saw too.

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
}
LOWER_IS_BETTER = {"masked_mse_expression", "masked_mse_gepc"}
CLOSER_TO_ZERO_IS_BETTER = {"silhouette_sample"}
MAX_ROWS = (
    200  # longer tables (samples of a real Census run, the HVG list) show this many, then say so
)

STYLE = (
    "<style>\n"
    "body{font-family:system-ui,sans-serif;font-size:14px;max-width:1100px;margin:2em auto;"
    "color:#222}\n"
    "h1{font-size:22px} h2{font-size:17px;margin-top:2em;border-bottom:1px solid #ccc}\n"
    "table{border-collapse:collapse;margin:.5em 0} "
    "td,th{padding:3px 9px;border-bottom:1px solid #e3e3e3;text-align:left}\n"
    "th{background:#f4f4f4} td.win{font-weight:bold;background:#e6f4e6} "
    "p.caption{color:#555;max-width:900px}\n"
    "img{max-width:100%;border:1px solid #eee}\n"
    "</style>"
)


def winner(metric: str, ours: float, baseline: float) -> str | None:
    """'scllm', 'baseline', 'tie' or None (no direction for this metric, or a value missing)."""
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
    baseline's name in the header (it is the same for a group of rows), details kept."""
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


def _cell(value: float, bold: bool) -> str:
    value = float(value)
    text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
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
    return pd.read_csv(path, sep="\t")


@dataclass(frozen=True)
class ReportInputs:
    """What the report shows, as the earlier rules wrote it."""

    qc_tsv: Path
    samples_tsv: Path
    hvg_tsv: Path
    epochs_tsv: Path
    loss_curve_png: Path
    metrics_tsv: Path
    umap_cell_type_png: Path
    umap_sample_png: Path
    # Given only when heldout.path is set (rule evaluate_heldout).
    heldout_metrics_tsv: Path | None = None
    heldout_umap_png: Path | None = None


def write_report(out_html, *, run: str, **inputs) -> list[str]:
    """Write the run's report from ``inputs`` (``ReportInputs``' fields, as keywords); returns
    the titles of the sections it holds."""
    files = ReportInputs(**inputs)
    samples_section, n_samples = _samples_section(files.samples_tsv)
    sections = [
        samples_section,
        *_preprocessing_sections(files.qc_tsv, files.hvg_tsv),
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
        sections.append(_heldout_section(files.heldout_metrics_tsv, files.heldout_umap_png))
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


def _preprocessing_sections(qc_tsv, hvg_tsv) -> list[tuple[str, str, str]]:
    hvgs = _read_tsv(hvg_tsv)
    return [
        (
            "Quality control",
            "Cells and genes before and after filter_qc, over all cells and per sample, "
            "with the thresholds used (qc.tsv).",
            _table(_read_tsv(qc_tsv), "rows"),
        ),
        (
            "Highly variable genes",
            f"The {len(hvgs)} HVGs, the model's vocabulary, in rank order (hvg.tsv); "
            "the 50 most variable first, all of them below.",
            _hvg_list(hvgs),
        ),
    ]


def _model_sections(files: ReportInputs) -> list[tuple[str, str, str]]:
    metrics = _read_tsv(files.metrics_tsv)
    return [
        (
            "Pretraining",
            "Train and validation losses per epoch (epochs.tsv); the validation masked-value "
            "error of each head against predicting each cell's mean visible bin, with fixed "
            "masks.",
            _table(_read_tsv(files.epochs_tsv), "epochs") + _image(files.loss_curve_png),
        ),
        (
            "Cell embedding vs PCA",
            "How well the model's cell embedding tells the labelled cell types apart, "
            "next to PCA of log-normalized HVGs on the same cells; the better value is in bold "
            "(metrics.tsv). Metrics that do not apply to this run are left out."
            + _continued_model_caption(metrics["baseline_method"].astype(str)),
            metrics_html(metrics),
        ),
        (
            "UMAP by cell type",
            "UMAPs of the scLLM embedding and of the PCA baseline, coloured by cell type.",
            _image(files.umap_cell_type_png),
        ),
    ]


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


def _heldout_section(metrics_tsv, umap_png) -> tuple[str, str, str]:
    """Scores on cells the model never saw (heldout.path), one table per baseline."""
    table = _read_tsv(metrics_tsv)
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
    if umap_png is not None:
        caption += " The UMAPs below are coloured by cell type."
        content += _image(umap_png)
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


def format_value(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_table(rows: list[dict], tsv_path, html_path=None, title: str = "") -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    lines = ["\t".join(TABLE_COLUMNS)]
    lines += ["\t".join(format_value(r.get(c)) for c in TABLE_COLUMNS) for r in rows]
    with atomic_path(tsv_path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in lines))
    if html_path is not None:
        with atomic_path(html_path) as tmp:
            Path(tmp).write_text(
                f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>{STYLE}"
                f"</head><body><h3>{title}</h3>{metrics_html(table)}</body></html>\n"
            )
    return table


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
