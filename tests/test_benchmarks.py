"""The benchmark scripts: the training one runs the training step and counts real tokens only; the
shard-check one times a shard that passes its checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_training_benchmark_counts_cells_and_padding(tmp_path):
    out = tmp_path / "train.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train.py"),
            "--device",
            "cpu",
            "--layers",
            "1",
            "--heads",
            "2",
            "--d-model",
            "16",
            "--d-ff",
            "16",
            "--cells",
            "64",
            "--mean-length",
            "20",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--steps",
            "3",
            "--variants",
            "pad1201_fp32",
            "grouped_fp32",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    pad, grouped = result["results"]
    assert (pad["variant"], grouped["variant"]) == ("pad1201_fp32", "grouped_fp32")
    for row in (pad, grouped):
        # Exactly steps x batch size cells are timed, and every cell has <cls> plus genes.
        assert round(row["cells_per_s"] * row["seconds"]) == 3 * 4
        assert row["tokens_per_s"] / row["cells_per_s"] >= 2
        assert row["mfu"] is None  # no MFU on a CPU
        # torch's CPU fused kernel takes no attention dropout (0.2 here); update if torch lifts
        # that.
        assert row["attention"] == "math"
    # Both time the same cells; padded to 1,201 nearly all computed tokens are padding.
    mean_real = pad["tokens_per_s"] / pad["cells_per_s"]
    assert abs(mean_real - grouped["mean_timed_length"]) < 1e-6
    assert abs(pad["padding_fraction"] - (1 - mean_real / 1201)) < 1e-9
    assert grouped["padding_fraction"] < 0.5 < pad["padding_fraction"]
    assert (
        result["step_overhead"]["ops_per_step"] > 100
        and result["input_pipeline"][0]["cells_per_s"] > 0
    )


def test_shard_check_benchmark_times_a_valid_shard(tmp_path):
    out = tmp_path / "shard_check.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "shard_check.py"),
            "--cells",
            "500",
            "--mean-length",
            "50",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["cells"] == 500 and 2 * 500 <= result["tokens"] <= 1201 * 500
    assert all(result[k] > 0 for k in ("read_s", "check_s", "sha256_s", "listed_s", "file_mb"))
    assert abs(result["sha256_gb_per_s"] - result["file_mb"] / 1e3 / result["sha256_s"]) < 1e-9


def test_embedding_ablation_table_and_relative_settings(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "embedding_ablation", REPO / "benchmarks" / "embedding_ablation.py"
    )
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    metrics = {m: 0.5 for m in ablation.METRICS}
    rows = [
        {"variant": "default", "seed": s, "train_s": 10.0, **metrics, "knn_accuracy_cv": acc}
        for s, acc in ((0, 0.90), (1, 0.92), (2, 0.94))
    ]
    rows.append({"variant": "readout_cls", "seed": 0, "train_s": 12.0, **metrics})
    reference = {m: 0.9 for m in ablation.METRICS[:5]}
    table = ablation.summarise(rows, reference, ["default", "readout_cls", "wide"]).splitlines()
    assert table[2].startswith(
        "| default | 0,1,2 | 0.920 ± 0.020 |"
    )  # mean ± sample sd over seeds
    assert table[3].startswith("| readout_cls | 0 | 0.500 |") and "wide" not in "".join(table)
    assert table[-1].startswith("| PCA-50 (reference) | - | 0.900 |")
    # "half", "double", "third", "triple" resolve against config/demo.yaml's values
    assert ablation.RELATIVE["half"](12) == 6 and ablation.RELATIVE["triple"](0.002) == 0.006
    assert set(ablation.VARIANTS["seeds_recipe"][2]) >= {"gepc_targets", "gene_emb_init", "lr"}


def test_lazy_shards_benchmark_times_both_ways_of_reading_on_valid_shards(tmp_path):
    out = tmp_path / "lazy.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "lazy_shards.py"),
            "--cells",
            "384",
            "--validation-cells",
            "40",
            "--mean-length",
            "30",
            "--max-length",
            "60",
            "--steps",
            "3",
            "--batches",
            "5",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--modes",
            "lazy,in_memory",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert (
        result["cells"] == 384
        and 20 < result["mean_length"] <= 60
        and result["longest_batch_tokens"] <= 60
    )
    for mode in ("lazy", "in_memory"):
        data = result[f"data_{mode}"]
        # 384 cells = 12 full batches: 5 of 32 cells timed per run, two runs, the median reported
        assert (
            data["cells"] == 5 * 32
            and len(data["cells_per_s_runs"]) == 2
            and data["cells_per_s"] > 0
        )
        assert data["peak_rss_mb"] > 100 and result[f"train_{mode}"]["peak_rss_mb"] > 100
    assert not (tmp_path / "work" / "shards_384_30_60").exists()  # removed without --keep


def test_preprocess_benchmark_with_ingest_times_every_stage_from_a_users_h5ad(tmp_path):
    out = tmp_path / "ingest.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "preprocess.py"),
            "--ingest",
            "h5ad",
            "--cells",
            "3000",
            "--genes",
            "4000",
            "--samples",
            "3",
            "--min-expressed",
            "400",
            "--max-expressed",
            "600",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    stages = result["stages"]
    assert list(stages) == [
        "sample_census",
        "filter_qc",
        "select_hvg",
        "normalize_bin",
        "split_cells",
        "tokenize_shards",
    ]
    # every cell of the user's file comes in (the cap is all cells), with every stored value
    assert stages["sample_census"]["cells_in"] == stages["sample_census"]["cells_out"] == 3000
    assert (
        stages["sample_census"]["nnz_out"]
        == result["input"]["nnz"]
        == stages["filter_qc"]["nnz_in"]
    )
    assert stages["tokenize_shards"]["cells_out"] == stages["filter_qc"]["cells_out"]
    assert all(s["peak_rss_mb"] > 0 and s["wall_s"] > 0 for s in stages.values())
    assert result["total_wall_s"] == round(sum(s["wall_s"] for s in stages.values()), 1)
    assert not (tmp_path / "work").exists()  # the scratch folder is removed
