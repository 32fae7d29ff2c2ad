"""run.json: what a run was made from (scllm.provenance), and finding a run's shared data."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from scllm.provenance import run_data_files, write_run_record


def test_the_record_holds_config_data_commit_and_versions(tmp_path, monkeypatch):
    import numpy

    import scllm.provenance

    out = tmp_path / "results" / "demo" / "run.json"
    config = {"run": "demo", "hvg": {"n_top_genes": 800}}
    data = {"sample_census": "results/data/sample_census-0a1b2c3d"}
    write_run_record(
        out, config=config, data=data, benchmarks={"split": "x.tsv"}, named_by="my.yaml"
    )
    record = json.loads(out.read_text())
    assert record["config"] == config and record["data"] == data and record["run"] == "demo"
    assert record["named_by"] == "my.yaml"
    assert record["benchmarks"] == {"split": "x.tsv"}
    assert record["versions"]["numpy"] == numpy.__version__
    head = subprocess.run(
        ["git", "-C", str(Path(scllm.provenance.__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    )
    if head.returncode == 0:  # a git checkout (CI's clean clone is one)
        assert record["commit"] == head.stdout.strip() and isinstance(record["dirty"], bool)

    # outside a checkout, with a package missing: said as null, not as a made-up value
    monkeypatch.setattr(
        scllm.provenance,
        "software_provenance",
        lambda: {
            "scllm": "0.1.0",
            "git_commit": "unknown (not a git checkout)",
            "python": "3.11.7",
            "packages": {"torch": "not installed", "numpy": "2.0"},
        },
    )
    record = write_run_record(out, config=config, data=data, benchmarks={})
    assert (record["commit"], record["dirty"]) == (None, None)
    assert record["versions"] == {"scllm-pretrain": "0.1.0", "torch": None, "numpy": "2.0"}
    monkeypatch.setattr(
        scllm.provenance,
        "software_provenance",
        lambda: {"scllm": "0.1.0", "git_commit": "abc-dirty", "python": "3", "packages": {}},
    )
    record = write_run_record(out, config=config, data=data, benchmarks={})
    assert (record["commit"], record["dirty"]) == ("abc", True)


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


def test_data_folders_lists_each_folder_with_its_size_and_the_runs_that_read_it(tmp_path, capsys):
    from scllm.cli import main
    from scllm.provenance import data_folder_use

    results = tmp_path / "results"
    sizes = {"sample_census-0a1b2c3d": 1500, "split-00000001": 20, "split-00000002": 3_000_000}
    for name, size in sizes.items():
        (results / "data" / name / "sub").mkdir(parents=True)
        (results / "data" / name / "sub" / "x.bin").write_bytes(b"0" * size)
    (results / "data" / "notes").mkdir()  # not a stage's folder: not listed, never counted
    (results / "data" / "split-123").mkdir()
    for run, split in (("demo", "split-00000001"), ("hvg800", "split-00000001")):
        (results / run).mkdir()
        data = {
            "sample_census": "results/data/sample_census-0a1b2c3d",
            "split": f"results/data/{split}",
        }
        (results / run / "run.json").write_text(json.dumps({"run": run, "data": data}))
    (results / "broken").mkdir()
    (results / "broken" / "run.json").write_text("{")  # cut short: skipped

    folders = data_folder_use(results)
    assert [(f["folder"].name, f["bytes"], f["runs"]) for f in folders] == [
        ("sample_census-0a1b2c3d", 1500, ["demo", "hvg800"]),  # pipeline order, then name
        ("split-00000001", 20, ["demo", "hvg800"]),
        ("split-00000002", 3_000_000, []),
    ]
    assert main(["data-folders", "--results", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:] == ["1.5", "kB", "demo,", "hvg800"]
    assert lines[3].endswith("3.0 MB  no run")
    assert lines[4].startswith("1 of 3 folders (3.0 MB) are read by no run's run.json")
    assert all((results / "data" / name).is_dir() for name in sizes)  # nothing deleted
