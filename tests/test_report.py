"""The run's report: metrics with the better side marked and n/a rows left out, every section
with its caption, the sample UMAP only with more than one sample; the F1 per cell type, the
confusions, how the run was made, and loss curves that label each quantity as what it is."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from scllm.eval.report import (
    TABLE_COLUMNS,
    ReportInputs,
    metrics_html,
    summary_html,
    winner,
    write_report,
    write_table,
)


@pytest.mark.parametrize(
    "metric, ours, baseline, expected",
    [
        ("knn_accuracy_cv", 0.9, 0.94, "baseline"),
        ("leiden_ari", 0.8, 0.7, "scllm"),
        ("masked_mse_expression", 138.7, 217.5, "scllm"),
        ("silhouette_sample", -0.02, 0.10, "scllm"),
        ("silhouette_label", 0.3, 0.3002, "tie"),
        ("scib_silhouette_label", 0.64, 0.59, "scllm"),
        ("scib_graph_connectivity", 0.90, 0.96, "baseline"),
        ("scib_silhouette_batch", 0.91, 0.85, "scllm"),
        ("scib_ilisi", 0.2, 0.3, "baseline"),
        ("knn_accuracy_cv", np.nan, 0.9, None),
        ("something_else", 1.0, 2.0, None),
    ],
)
def test_winner_follows_each_metrics_direction(metric, ours, baseline, expected):
    assert winner(metric, ours, baseline) == expected


def metrics_table() -> pd.DataFrame:
    rows = [
        ("knn_accuracy_cv", 0.905, 0.944, "PCA-50", "5-fold"),
        ("silhouette_label", 0.366, 0.180, "PCA-50", "x"),
        ("silhouette_sample", np.nan, np.nan, "PCA-50", "n/a: one sample"),
        ("masked_mse_expression", 138.7, 217.5, "mean bin", "expression head"),
        (
            "masked_mse_gepc",
            414.0,
            217.5,
            "mean bin",
            "GEPC head ... not comparable with the baseline",
        ),
    ]
    return pd.DataFrame(
        [
            dict(
                zip(["metric", "scllm", "baseline", "baseline_method", "details"], r), cells="2700"
            )
            for r in rows
        ],
        columns=TABLE_COLUMNS,
    )


def test_metrics_html_drops_na_rows_and_bolds_the_better_value():
    page = metrics_html(metrics_table())
    assert "silhouette_sample" not in page and "n/a" not in page
    rows = {m: row for m, row in re.findall(r"<tr><td>(\w+)</td>(.*?)</tr>", page)}
    assert set(rows) == {
        "knn_accuracy_cv",
        "silhouette_label",
        "masked_mse_expression",
        "masked_mse_gepc",
    }
    assert (
        "<td class='win'>0.944</td>" in rows["knn_accuracy_cv"]
        and "<td>0.905</td>" in rows["knn_accuracy_cv"]
    )
    assert "<td class='win'>0.366</td>" in rows["silhouette_label"]
    assert "<td class='win'>138.7</td>" in rows["masked_mse_expression"]
    assert (
        "class='win'" not in rows["masked_mse_gepc"]
        and "not comparable" in rows["masked_mse_gepc"]
    )
    # the baseline's name once per group, in the header, not on every row
    assert page.count("baseline: PCA-50") == 1 and page.count("baseline: mean bin") == 1


def test_evaluates_metrics_html_is_the_same_table(tmp_path):
    table = metrics_table()
    write_table(table.to_dict("records"), tmp_path / "m.tsv", tmp_path / "m.html", "title")
    assert metrics_html(table) in (tmp_path / "m.html").read_text()


def run_files(tmp_path, n_samples: int) -> dict:
    (tmp_path / "samples.tsv").write_text(
        "dataset_id\tdonor_id\tn_cells\tchosen\n"
        + "".join(f"d\tdonor{i}\t{100 + i}\t{i < n_samples}\n" for i in range(n_samples + 1))
    )
    (tmp_path / "qc.tsv").write_text("scope\tcells_in\tcells_out\nall\t300\t250\n")
    pd.DataFrame(
        {
            "feature_id": [f"ENSG{i:011d}" for i in range(60)],
            "feature_name": [f"GENE{i}" for i in range(60)],
            "rank": range(60),
            "variances_norm": np.linspace(9, 1, 60),
        }
    ).to_csv(tmp_path / "hvg.tsv", sep="\t", index=False)
    (tmp_path / "epochs.tsv").write_text(
        "epoch\tstep\ttrain_loss\tval_loss\n1\t10\t3.5\t3.1\n2\t20\t2.5\t2.9\n"
    )
    metrics_table().to_csv(tmp_path / "metrics.tsv", sep="\t", index=False)
    pngs = {}
    for name in ("loss_curve", "umap_cell_type", "umap_sample"):
        fig = Figure(figsize=(1, 1))
        fig.text(0.5, 0.5, name)
        fig.savefig(tmp_path / f"{name}.png")
        pngs[f"{name}_png"] = tmp_path / f"{name}.png"
    return dict(
        qc_tsv=tmp_path / "qc.tsv",
        samples_tsv=tmp_path / "samples.tsv",
        hvg_tsv=tmp_path / "hvg.tsv",
        epochs_tsv=tmp_path / "epochs.tsv",
        metrics_tsv=tmp_path / "metrics.tsv",
        **pngs,
    )


@pytest.mark.parametrize("n_samples", [1, 2])
def test_report_holds_every_section_with_a_caption_and_embeds_its_images(tmp_path, n_samples):
    files = run_files(tmp_path, n_samples)
    sections = write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    page = (tmp_path / "report.html").read_text()
    expected = [
        "In short",
        "Samples",
        "Quality control",
        "Highly variable genes",
        "Pretraining",
        "Cell embedding vs PCA",
        "UMAP by cell type",
    ] + (["UMAP by sample"] if n_samples > 1 else [])
    assert sections == expected
    assert re.findall(r"<h2>(.*?)</h2>\n<p class='caption'>.+?</p>", page) == expected
    assert f"{n_samples} sample(s) (dataset, donor) chosen of {n_samples + 1} eligible" in page
    assert "GENE0, GENE1" in page and "All 60 genes" in page and "<td>ENSG00000000059</td>" in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == (3 if n_samples > 1 else 2)
    assert base64.b64decode(images[0]) == files["loss_curve_png"].read_bytes()
    assert "silhouette_sample" not in page and "run trial" in page
    # without heldout.path: no held-out section, and no caption for baselines the run lacks
    assert "never saw" not in page and "continued model" not in page


FITTED = "PCA-50 of log-normalized vocabulary genes (fitted on these cells)"
PROJECTED = "PCA-50 of the training cells, projected (zero-shot)"


def heldout_files(tmp_path) -> dict:
    """evaluate_heldout's table (one group of rows per baseline) and UMAP."""
    rows = [
        dict(
            metric=m,
            scllm=0.8,
            baseline=b,
            baseline_method=method,
            cells="300 (held out: new_cells.h5ad)",
            details="x",
        )
        for method, b in ((FITTED, 0.9), (PROJECTED, 0.7))
        for m in ("knn_accuracy_cv", "leiden_ari")
    ]
    pd.DataFrame(rows, columns=TABLE_COLUMNS).to_csv(
        tmp_path / "heldout.tsv", sep="\t", index=False
    )
    fig = Figure(figsize=(1, 1))
    fig.text(0.5, 0.5, "held out")
    fig.savefig(tmp_path / "heldout.png")
    return dict(
        heldout_metrics_tsv=tmp_path / "heldout.tsv", heldout_umap_png=tmp_path / "heldout.png"
    )


def test_report_shows_the_heldout_cells_against_both_baselines(tmp_path):
    files = {**run_files(tmp_path, 1), **heldout_files(tmp_path)}
    sections = write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    assert sections[-1] == "Cells the model never saw"
    page = (tmp_path / "report.html").read_text()
    held = page[page.index("<h2>Cells the model never saw</h2>") :]
    caption = re.search(r"<p class='caption'>(.+?)</p>", held).group(1)
    assert "300 labelled cells of <code>new_cells.h5ad</code>" in caption
    assert "PCA fitted on these cells</i>: what the cells give with no model" in caption
    assert "the zero-shot baseline, a linear map learned from the very cells" in caption
    assert held.count("<table>") == 2
    assert f"baseline: {FITTED}" in held and f"baseline: {PROJECTED}" in held
    images = re.findall(r"src='data:image/png;base64,([^']+)'", held)
    assert [base64.b64decode(i) for i in images] == [files["heldout_umap_png"].read_bytes()]


def test_metrics_caption_says_what_the_continued_models_baselines_are(tmp_path):
    files = run_files(tmp_path, 1)
    continued = [
        ("the continued model, zero-shot", 0.85),
        ("PCA-50 of the continued model's training cells, projected (zero-shot)", 0.8),
    ]
    extra = pd.DataFrame(
        [
            dict(
                metric="knn_accuracy_cv",
                scllm=0.905,
                baseline=b,
                baseline_method=method,
                cells="2700",
                details="5-fold",
            )
            for method, b in continued
        ],
        columns=TABLE_COLUMNS,
    )
    pd.concat([metrics_table(), extra]).to_csv(files["metrics_tsv"], sep="\t", index=False)
    write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    page = (tmp_path / "report.html").read_text()
    metrics = page[page.index("<h2>Cell embedding vs PCA</h2>") :]
    caption = re.search(r"<p class='caption'>(.+?)</p>", metrics).group(1)
    assert (
        "<i>The continued model, zero-shot</i>: the model this run continued "
        "(train.init_from), as it was before adapting to these cells" in caption
    )
    assert "baseline: PCA-50 of the continued model&#x27;s training cells" in metrics
    assert "<i>PCA of the continued model's training cells, projected</i>: a linear map" in caption
    assert "baseline: the continued model, zero-shot" in metrics


# --- cell types: F1 per type and the confusions ------------------------------------------------

BASELINE = "PCA-50 of log-normalized HVGs"


def cell_type_files(tmp_path) -> dict:
    """evaluate's per_cell_type.tsv and confusion.tsv for three types, the model and two
    baselines ("other" is worse than BASELINE)."""
    pd.DataFrame(
        {
            "cell_type": ["T", "B", "NK"],
            "n_cells": [6, 3, 2],
            "scllm": [0.9, 0.5, 0.75],
            BASELINE: [0.8, 0.6, 0.75],
            "other": [0.1, 0.2, 0.3],
        }
    ).to_csv(tmp_path / "per_cell_type.tsv", sep="\t", index=False)
    squares = {
        # true x predicted, types T, B, NK
        "scllm": [[5, 1, 0], [1, 2, 0], [0, 0, 2]],
        BASELINE: [[6, 0, 0], [0, 3, 0], [0, 0, 2]],
        "other": [[2, 2, 2], [1, 1, 1], [1, 1, 0]],
    }
    types = ["T", "B", "NK"]
    rows = [
        (method, true, predicted, square[i][j])
        for method, square in squares.items()
        for i, true in enumerate(types)
        for j, predicted in enumerate(types)
    ]
    pd.DataFrame(rows, columns=["method", "cell_type", "predicted", "n_cells"]).to_csv(
        tmp_path / "confusion.tsv", sep="\t", index=False
    )
    return dict(
        per_cell_type_tsv=tmp_path / "per_cell_type.tsv", confusion_tsv=tmp_path / "confusion.tsv"
    )


def section_of(page: str, title: str) -> str:
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end > 0 else None]


def test_report_shows_the_f1_of_each_cell_type_best_per_row_in_bold(tmp_path):
    files = {**run_files(tmp_path, 1), **cell_type_files(tmp_path)}
    sections = write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    assert sections[5:8] == [
        "Cell embedding vs PCA",
        "F1 per cell type",
        "Which cell types are confused",
    ]
    table = section_of((tmp_path / "report.html").read_text(), "F1 per cell type")
    assert "higher is better" in table and "knn_macro_f1_cv" in table
    assert f"<th>cell type</th><th>cells</th><th>scLLM</th><th>{BASELINE}</th><th>other</th>" in (
        table
    )
    rows = dict(re.findall(r"<tr><td>(.*?)</td>(.*?)</tr>", table))
    assert rows["T"] == "<td>6</td><td class='win'>0.900</td><td>0.800</td><td>0.100</td>"
    assert rows["B"] == "<td>3</td><td>0.500</td><td class='win'>0.600</td><td>0.200</td>"
    # a tie: both bold
    assert (
        rows["NK"]
        == "<td>2</td><td class='win'>0.750</td><td class='win'>0.750</td><td>0.300</td>"
    )
    # the last row: the means, which are the macro-F1s; 11 cells in all
    mean = rows["<i>mean over types = macro-F1</i>"]
    assert mean == "<td>11</td><td class='win'>0.717</td><td class='win'>0.717</td><td>0.200</td>"


def test_report_shows_the_confusions_of_the_model_and_of_the_best_baseline(tmp_path):
    files = {**run_files(tmp_path, 1), **cell_type_files(tmp_path)}
    write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    section = section_of((tmp_path / "report.html").read_text(), "Which cell types are confused")
    # the model and the baseline with the best macro-F1 (the perfect one), not "other"
    titles = re.findall(r"<h3>(.*?)</h3>", section)
    assert titles == ["scLLM (macro-F1 0.833)", f"{BASELINE} (macro-F1 1.000)"]  # by hand below
    assert "other" not in section.split("</p>", 1)[1]
    model = section[section.index("<h3>scLLM") : section.index(f"<h3>{BASELINE}")]
    # rows: true types, most cells first, numbered; columns by number; zeros blank
    first, second, third = re.findall(r"<tr><th>(\d\. .*?)</th>(.*?)</tr>", model)
    assert first[0] == "1. T (6)" and second[0] == "2. B (3)" and third[0] == "3. NK (2)"
    assert re.findall(r">(\d*)</td>", first[1]) == ["5", "1", ""]
    assert "outline" in re.findall(r"<td[^>]*>", first[1])[0]  # the diagonal: correct ones
    assert "outline" not in re.findall(r"<td[^>]*>", first[1])[1]
    assert "rows are the cells' true types" in section and "fewer is better" in section


def test_f1_of_a_confusion_table_by_hand():
    from scllm.eval.metrics import f1_from_counts

    # T: 5 right of 6, 6 predicted T -> F1 2*5/(6+6); B: 2 of 3, 3 predicted -> 4/6; NK: 1
    square = pd.DataFrame([[5, 1, 0], [1, 2, 0], [0, 0, 2]], index=["T", "B", "NK"])
    assert f1_from_counts(square).to_dict() == pytest.approx({"T": 10 / 12, "B": 4 / 6, "NK": 1})


# --- how the run was made ------------------------------------------------------------------------


def run_record(tmp_path, benchmarks: dict) -> Path:
    record = {
        "run": "trial",
        "config": {"run": "trial", "train": {"contrastive_weight": 10.0, "gepc_weight": 1.0}},
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "dirty": True,
        "versions": {"torch": "2.13.0", "scanpy": "1.11.5"},
        "python": "3.11.7",
        "data": {"split": "results/data/split-0123abcd"},
        "benchmarks": {rule: str(path) for rule, path in benchmarks.items()},
    }
    (tmp_path / "run.json").write_text(json.dumps(record))
    return tmp_path / "run.json"


def test_report_says_how_the_run_was_made_and_a_missing_benchmark_is_not_run(tmp_path):
    (tmp_path / "pretrain.tsv").write_text(
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        "3725.51\t1:02:05\t8123.40\t9000\t8000\t8100\t1\t2\t99\t3700\n"
    )
    (tmp_path / "split.tsv").write_text("s\th:m:s\tmax_rss\n0.42\t0:00:00\tNA\n")
    record = run_record(
        tmp_path,
        {
            "pretrain": tmp_path / "pretrain.tsv",
            "split": tmp_path / "split.tsv",
            "evaluate": tmp_path / "missing" / "evaluate.tsv",
        },
    )
    files = {**run_files(tmp_path, 1), "run_record_json": record}
    sections = write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    assert sections[-1] == "How this run was made"
    section = section_of((tmp_path / "report.html").read_text(), "How this run was made")
    assert "0123456789abcdef0123456789abcdef01234567</code> (with uncommitted changes)" in section
    assert "Python 3.11.7" in section
    rows = dict(
        re.findall(
            r"<tr><td>(\w+)(?: <i>\(shared data folder\)</i>)?</td>(.*?)</tr>",
            section.split("<details>")[0],  # the time table, not the data folders'
        )
    )
    assert rows["pretrain"] == "<td>3,725.5</td><td>1:02:06</td><td>8,123</td>"
    assert rows["split"] == "<td>0.4</td><td>0:00:00</td><td>n/a</td>"  # too short to sample
    # a data stage's folder may come from another run: said so
    assert "<td>split <i>(shared data folder)</i></td>" in section
    assert "<td>pretrain <i>(shared" not in section
    assert rows["evaluate"] == "<td colspan='3'>not run</td>"
    # totals: the run's own rules (pretrain), then with the shared stages (pretrain + split)
    assert (
        "<td><i>this run's own rules</i></td><td>3,725.5</td><td>1:02:06</td><td>8,123 (largest)"
    ) in section
    assert (
        "<td><i>with the shared data stages</i></td><td>3,725.9</td><td>1:02:06</td>"
        "<td>8,123 (largest)"
    ) in section
    assert "<td>torch</td><td>2.13.0</td>" in section
    assert "<summary>Resolved configuration (YAML)</summary><pre>run: trial\ntrain:\n" in section
    assert "  contrastive_weight: 10.0\n" in section
    # the pretraining caption states the run's own weights
    page = (tmp_path / "report.html").read_text()
    assert "masked expression MSE + 1 x GEPC MSE + 10 x contrastive InfoNCE" in page


def test_a_run_record_without_its_fields_is_refused_with_the_fix(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run": "trial", "config": {}}))
    files = {**run_files(tmp_path, 1), "run_record_json": tmp_path / "run.json"}
    with pytest.raises(ValueError, match=r"lacks commit, dirty, .*--forcerun"):
        write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")


# --- pretraining: loss curves, the epochs table folded away, the QC figure ---------------------


DEMO_TRAIN = {"gepc_weight": 1.0, "gepc_targets": "all", "contrastive_weight": 10.0}


def loss_rows() -> tuple[list[dict], list[dict]]:
    metrics = [
        dict(step=s, train_loss=300 - s, expr_mse=200 - s, gepc_mse=60, contrastive_loss=2.0)
        for s in (10, 20, 30, 40)
    ]
    epochs = [
        dict(epoch=e, step=20 * e, train_loss=280 - 20 * e, val_loss=500 - e, val_expr_mse=150,
             val_gepc_mse=350 - e, val_mean_bin_baseline_mse=217, train_expr_mse=180,
             train_gepc_mse=60, train_contrastive=2.0)
        for e in (1, 2)
    ]  # fmt: skip
    return metrics, epochs


def test_loss_curves_put_each_quantity_on_its_own_axis_labelled_as_what_it_is():
    from scllm.train.loss_curve import loss_figure

    fig = loss_figure(*loss_rows(), DEMO_TRAIN)
    axes = [ax for ax in fig.axes if ax.axison]
    titles = [ax.get_title() for ax in axes]
    assert titles == [
        "Training objective",
        "Training: expression head, masked MSE",
        "Training: GEPC head MSE\n(whole vocabulary profile, mostly zeros)",
        "Training: contrastive InfoNCE (two views)",
        "Validation: masked-token MSE (fixed masks)",
    ]
    assert [ax.get_ylabel() for ax in axes] == [
        "objective (weighted sum)",
        "MSE (bins²)",
        "MSE (bins²)",
        "InfoNCE (nats)",
        "MSE (bins²)",
    ]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
    # the objective names every term and weight; the train and validation quantities never
    # share an axis
    assert legends[0] == ["expression MSE + 1 x GEPC MSE + 10 x InfoNCE", "epoch mean"]
    assert legends[4][0] == "expression head" and legends[4][2].startswith("baseline")
    assert "predicts them low" in legends[4][1]  # GEPC trained on the whole profile
    assert legends[4][3] == "best epoch (best_model.pt)"
    # without the contrastive term, no panel for it; scGPT's masked GEPC needs no warning
    fig = loss_figure(*loss_rows(), {"gepc_targets": "masked"})
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert "Training: contrastive InfoNCE (two views)" not in titles
    assert titles[2] == "Training: GEPC head MSE\n(masked tokens)"
    validation = [ax for ax in fig.axes if ax.get_title().startswith("Validation")][0]
    assert [t.get_text() for t in validation.get_legend().get_texts()][1] == (
        "GEPC head (cell embedding)"
    )


def test_report_explains_the_loss_curves_and_folds_the_epochs_table_away(tmp_path):
    files = run_files(tmp_path, 1)
    write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    section = section_of((tmp_path / "report.html").read_text(), "Pretraining")
    caption = re.search(r"<p class='caption'>(.+?)</p>", section).group(1)
    for words in (
        "Each quantity on its own axis",
        "the objective the optimizer minimises",
        "the expression head's MSE on masked tokens",
        "the InfoNCE between two views",
        "against predicting each cell's mean visible bin (dashed); lower is better",
        "The objective and the validation MSEs are different quantities",
    ):
        assert words in caption, words
    assert "<details><summary>Per-epoch table (2 epochs, epochs.tsv)</summary><table" in section
    assert section.index("<img") < section.index("<details>")  # the curves first


def test_report_embeds_a_qc_figure_with_its_caption(tmp_path):
    files = run_files(tmp_path, 1)
    fig = Figure(figsize=(1, 1))
    fig.text(0.5, 0.5, "qc")
    fig.savefig(tmp_path / "qc.png")
    write_report(
        tmp_path / "report.html",
        ReportInputs(**files),
        run="trial",
        qc_plot_png=tmp_path / "qc.png",
    )
    section = section_of((tmp_path / "report.html").read_text(), "Quality control")
    assert "qc.max_mito_fraction" in section and "were removed" in section
    images = re.findall(r"src='data:image/png;base64,([^']+)'", section)
    assert [base64.b64decode(i) for i in images] == [(tmp_path / "qc.png").read_bytes()]
    write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    section = section_of((tmp_path / "report.html").read_text(), "Quality control")
    assert "<img" not in section and "mito" not in section


def test_heldout_section_shows_the_f1_of_each_cell_type_where_given(tmp_path):
    per_type = cell_type_files(tmp_path)["per_cell_type_tsv"]
    files = {
        **run_files(tmp_path, 1),
        **heldout_files(tmp_path),
        "heldout_per_cell_type_tsv": per_type,
    }
    write_report(tmp_path / "report.html", ReportInputs(**files), run="trial")
    held = section_of((tmp_path / "report.html").read_text(), "Cells the model never saw")
    assert "evaluation/heldout/per_cell_type.tsv" in held
    assert "<td>T</td><td>6</td><td class='win'>0.900</td>" in held
    assert held.count("<table>") == 3  # a metrics table per baseline, then the F1 per type


def test_in_short_says_which_scores_the_model_wins_and_loses_against_each_baseline():
    rows = [
        ("knn_accuracy_cv", 0.936, 0.944, "PCA", "2700 (all)", ""),
        ("silhouette_label", 0.285, 0.180, "PCA", "2700 (all)", ""),
        ("leiden_ari", 0.8, 0.8, "PCA", "2700 (all)", ""),
        ("scib_silhouette_label", 0.6425, 0.59, "PCA", "2700 (all)", ""),  # silhouette again
        ("knn_accuracy_heldout_sample", np.nan, np.nan, "PCA", "2700 (all)", "n/a: one sample"),
        ("masked_mse_expression", 141.4, 217.5, "mean bin", "81 (validation)", ""),
        ("masked_mse_gepc", 342.3, 217.5, "mean bin", "81 (validation)", "not comparable"),
    ]
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    first, second = summary_html(table).split("</p>")[:2]
    assert first == (
        "<p>Against <b>PCA</b> (2700 (all) cells), the model is better on 1 of 3: "
        "silhouette_label (0.285 vs 0.180); level on leiden_ari (0.800 vs 0.800); "
        "worse on knn_accuracy_cv (0.936 vs 0.944)."
    )
    # a row without both values or without a comparable baseline is not counted
    assert second == (
        "<p>Against <b>mean bin</b> (81 (validation) cells), the model is better on 1 of 1: "
        "masked_mse_expression (141.4 vs 217.5)."
    )
