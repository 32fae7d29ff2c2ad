"""The Snakemake workflow end to end on the embedded default, in a temporary copy of the repo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
DATA_OUTPUTS = {  # rule -> an output it writes, in DAG order
    "build_local_census": "census_store",
    "sample_census": "cells.h5ad",
    "filter_qc": "filtered.h5ad",
    "select_hvg": "hvg.tsv",
    "normalize_bin": "binned.h5ad",
    "split": "split.tsv",
    "tokenize_shards": "shards/manifest.json",
    "pretrain": "model/best_model.pt",
    "embed": "embeddings.h5ad",
    "evaluate": "evaluation/metrics.tsv",
}
TINY_TRAINING = {"model": {"n_layers": 1, "n_heads": 2, "d_model": 16, "d_ff": 32, "dropout": 0.0},
                 "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 2}}

pytestmark = pytest.mark.workflow


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SNAKEMAKE, "--cores", "2", *args], cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_workflow(dest: Path) -> Path:
    for name in ("Snakefile", "rules", "workflow", "config", "envs", "profiles", "resources", "src"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def write_config(workdir: Path, name: str, overrides: dict) -> str:
    path = workdir / "config" / name
    path.write_text(yaml.safe_dump(overrides))
    return f"config/{name}"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """One full run of the embedded default (tiny model) shared by the tests below."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    tiny = write_config(workdir, "tiny.yaml", TINY_TRAINING)
    snakemake(workdir, "--configfile", tiny)
    return workdir


def test_full_run_writes_every_artifact_and_logs_counts(demo_run):
    results = demo_run / "results" / "demo"
    for rule, output in DATA_OUTPUTS.items():
        assert (results / output).exists(), f"{rule} did not write {output}"
        assert (results / "logs" / f"{rule}.log").stat().st_size > 0, f"{rule} wrote no log"
        assert (results / "benchmarks" / f"{rule}.tsv").exists(), f"{rule} wrote no benchmark"
    manifest = json.loads((results / "shards" / "manifest.json").read_text())
    n_cells = {split: sum(s["n_cells"] for s in shards) for split, shards in manifest["splits"].items()}
    assert n_cells["train"] + n_cells["validation"] == 2700  # PBMC 3k passes QC whole
    assert n_cells["validation"] == round(0.03 * 2700)
    assert manifest["n_genes"] == 1200 and manifest["cls_id"] == 1200 and manifest["pad_id"] == 1201
    assert "cells 2700 -> 2700" in (results / "logs" / "filter_qc.log").read_text()
    assert "1200 HVGs out" in (results / "logs" / "select_hvg.log").read_text()


def test_changing_one_setting_reruns_that_stage_and_later_only(demo_run, tmp_path):
    workdir = copy_workflow(tmp_path)
    shutil.copytree(demo_run / "results", workdir / "results")
    shutil.copytree(demo_run / ".snakemake", workdir / ".snakemake", ignore=shutil.ignore_patterns("conda", "singularity"))
    tiny = write_config(workdir, "tiny.yaml", TINY_TRAINING)
    dry = snakemake(workdir, "--configfile", tiny, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr

    results = workdir / "results" / "demo"
    before = {rule: (results / out).stat().st_mtime_ns for rule, out in DATA_OUTPUTS.items()}
    time.sleep(1.1)
    changed = write_config(workdir, "changed.yaml", {**TINY_TRAINING, "normalize_bin": {"n_bins": 21}})
    snakemake(workdir, "--configfile", changed)
    rerun = {rule for rule, out in DATA_OUTPUTS.items() if (results / out).stat().st_mtime_ns != before[rule]}
    assert rerun == {"normalize_bin", "split", "tokenize_shards", "pretrain", "embed", "evaluate"}
    assert json.loads((results / "shards" / "manifest.json").read_text())["n_bins"] == 21

    # chunk_size bounds memory, not results: changing it reruns nothing
    rechunked = write_config(workdir, "rechunked.yaml", {**TINY_TRAINING, "normalize_bin": {"n_bins": 21}, "chunk_size": 500})
    dry = snakemake(workdir, "--configfile", rechunked, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_same_inputs_and_seed_give_byte_identical_shards(demo_run, tmp_path):
    workdir = copy_workflow(tmp_path)
    snakemake(workdir, "tokenize_shards")
    ours = sorted((workdir / "results/demo/shards").rglob("*"))
    theirs = sorted((demo_run / "results/demo/shards").rglob("*"))
    assert [p.relative_to(workdir / "results/demo/shards") for p in ours] == \
        [p.relative_to(demo_run / "results/demo/shards") for p in theirs]
    for a, b in zip(ours, theirs):
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs"
    with h5py.File(workdir / "results/demo/shards/train/shard_00000.h5") as f:
        assert f["gene_ids"].dtype == "int32" and f["values"].dtype == "int16"


def test_invalid_config_value_fails_before_any_job_and_names_the_key(tmp_path):
    workdir = copy_workflow(tmp_path)
    bad = write_config(workdir, "bad.yaml", {"qc": {"min_genes_per_cell": "many"}})
    proc = snakemake(workdir, "--configfile", bad, check=False)
    assert proc.returncode != 0
    assert "min_genes_per_cell" in proc.stderr + proc.stdout
    assert not (workdir / "results").exists()


def test_misspelt_config_key_is_rejected(tmp_path):
    workdir = copy_workflow(tmp_path)
    bad = write_config(workdir, "typo.yaml", {"hvg": {"n_top_gene": 1000}})
    proc = snakemake(workdir, "--configfile", bad, "-n", check=False)
    assert proc.returncode != 0
    assert "n_top_gene" in proc.stderr + proc.stdout


def test_real_census_offline_fails_at_once_with_guidance(tmp_path):
    workdir = copy_workflow(tmp_path)
    dry = snakemake(workdir, "--configfile", "config/config.yaml", "-n")
    stats = (dry.stdout + dry.stderr).split("Job stats:")[1]
    jobs = [line.split()[0] for line in stats.splitlines() if line.split()[:1] and line.split()[0] in DATA_OUTPUTS]
    assert jobs == ["sample_census", "filter_qc", "select_hvg", "normalize_bin", "split", "tokenize_shards", "pretrain",
                    "embed", "evaluate"]

    started = time.time()
    proc = snakemake(workdir, "sample_census", "--configfile", "config/config.yaml", check=False, timeout=300)
    assert proc.returncode != 0
    assert time.time() - started < 120
    log = (workdir / "results/census_blood_300k/logs/sample_census.log").read_text()
    assert "Census cannot be reached" in log
    assert "snakemake --cores" in log
    assert not (workdir / "results/census_blood_300k/cells.h5ad").exists()


def test_a_damaged_shard_stops_pretrain_and_the_fix_it_names_works(demo_run, tmp_path, flip_bytes):
    """Deleting one shard would not make Snakemake rerun tokenize_shards (its output folder
    exists), so the refusal names --forcerun; this runs exactly that."""
    workdir = copy_workflow(tmp_path)
    shutil.copytree(demo_run / "results", workdir / "results")
    shutil.copytree(demo_run / ".snakemake", workdir / ".snakemake", ignore=shutil.ignore_patterns("conda", "singularity"))
    tiny = write_config(workdir, "tiny.yaml", TINY_TRAINING)
    results = workdir / "results" / "demo"
    checkpoint = (results / "model/last_checkpoint.pt").read_bytes()
    flip_bytes(results / "shards/train/shard_00000.h5", "gene_ids")

    proc = snakemake(workdir, "--configfile", tiny, "--forcerun", "pretrain", check=False)
    assert proc.returncode != 0
    log = (results / "logs/pretrain.log").read_text()
    assert "shards/train/shard_00000.h5 has sha256" in log and "Traceback" not in log
    fix = log.split("Rewrite the shards with `")[1].split("`")[0]
    assert fix == "snakemake --forcerun tokenize_shards"
    assert (results / "model/last_checkpoint.pt").read_bytes() == checkpoint, "a step on damaged data was saved"

    snakemake(workdir, "--configfile", tiny, *fix.split()[1:])  # the fix, as the message words it
    assert (results / "model/best_model.pt").exists()
    assert "shard_00000.h5 has sha256" not in (results / "logs/pretrain.log").read_text()
