"""The run's report: metrics with the better side marked and n/a rows left out, every section
with its caption, the sample UMAP only with more than one sample."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from scllm.eval.report import TABLE_COLUMNS, metrics_html, winner, write_report, write_table


@pytest.mark.parametrize(
    "metric, ours, baseline, expected",
    [
        ("knn_accuracy_cv", 0.9, 0.94, "baseline"),
        ("leiden_ari", 0.8, 0.7, "scllm"),
        ("masked_mse_expression", 138.7, 217.5, "scllm"),
        ("silhouette_sample", -0.02, 0.10, "scllm"),
        ("silhouette_label", 0.3, 0.3002, "tie"),
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
    sections = write_report(tmp_path / "report.html", run="trial", **files)
    page = (tmp_path / "report.html").read_text()
    expected = [
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
    sections = write_report(tmp_path / "report.html", run="trial", **files)
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
    write_report(tmp_path / "report.html", run="trial", **files)
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
