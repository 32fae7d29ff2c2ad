"""run.json: what a run was made from (scllm.provenance), and finding a run's shared data."""

from __future__ import annotations

import json
import subprocess

import pytest

from scllm.provenance import run_data_files, source_commit, write_run_record


def test_the_record_holds_config_data_commit_and_versions(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "Snakefile").write_text("rule all:\n")
    git = ["git", "-C", str(code), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    (code / "results").mkdir()
    (code / "results" / "x.tsv").write_text("outputs are no change of the code\n")
    assert source_commit(code) == (head.strip(), False)

    out = tmp_path / "results" / "demo" / "run.json"
    config = {"run": "demo", "hvg": {"n_top_genes": 800}}
    data = {"sample_census": "results/data/sample_census-0a1b2c3d"}
    write_run_record(out, config=config, data=data, benchmarks={}, code_folder=code)
    record = json.loads(out.read_text())
    assert record["config"] == config and record["data"] == data and record["run"] == "demo"
    assert record["commit"] == head.strip() and record["dirty"] is False
    import numpy

    assert record["versions"]["numpy"] == numpy.__version__
    assert record["versions"]["cellxgene-census"] is None or record["versions"]["cellxgene-census"]

    (code / "Snakefile").write_text("rule all:\n    input: []\n")  # an uncommitted edit
    assert source_commit(code) == (head.strip(), True)
    assert source_commit(tmp_path / "nowhere") == (None, None)


def test_a_runs_data_files_are_found_through_its_record(tmp_path):
    run = tmp_path / "results" / "mine"
    folders = {
        rule: f"results/data/{rule}-00000000"
        for rule in ("sample_census", "filter_qc", "select_hvg", "normalize_bin", "split")
    }
    folders["tokenize_shards"] = "results/data/tokenize_shards-11111111"
    with pytest.raises(FileNotFoundError, match="holds no run.json: give a run's folder"):
        run_data_files(run)
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"data": folders}))
    files = run_data_files(run)
    assert files["shards"] == tmp_path / "results/data/tokenize_shards-11111111/shards"
    assert files["hvg"] == tmp_path / "results/data/select_hvg-00000000/hvg.tsv"
    assert files["qc_cells"].name == "qc_cells.tsv.gz"
