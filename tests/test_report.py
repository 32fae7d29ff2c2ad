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
