"""The Snakemake workflow end to end on the embedded default, in a temporary copy of the repo."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import (
    DATA_OUTPUTS,
    REPO,
    SNAKEMAKE,
    TINY_TRAINING,
    copy_workflow,
    run_log,
    run_output,
    write_config,
)

pytestmark = pytest.mark.workflow


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*SNAKEMAKE, "--cores", "2", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """One full run of the embedded default (tiny model) shared by the tests below."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    tiny = write_config(workdir, "tiny.yaml", TINY_TRAINING)
    proc = snakemake(workdir, "--configfile", tiny)
    (workdir / "snakemake.out").write_text(proc.stdout + proc.stderr)
    return workdir


def test_full_run_writes_every_artifact_and_logs_counts(demo_run):
    results = demo_run / "results" / "demo"
    assert (
        "Shell command: None" not in (demo_run / "snakemake.out").read_text()
    )  # script rules: no noise
    # progress a person can plan around: elapsed time per sample, a line per evaluation step
    logs = results / "logs"
    assert re.search(
        r"evaluate: \d+ x \d+: Leiden at \d+ resolutions done", (logs / "evaluate.log").read_text()
    )
    # the demo's h5ad is read directly, in row blocks, with progress
    assert re.search(
        r"ingest: read 2700/2700 cells of the input, wrote 2700/2700 chosen cells "
        r"\(elapsed \d:\d\d:\d\d",
        run_log(demo_run, "sample_census").read_text(),
    )
    assert not (results / "census_store").exists()
    report = (results / "report.html").read_text()  # the run's report, under the run's folder
    assert "<h2>Cell embedding vs PCA</h2>" in report and "<h2>Pretraining</h2>" in report
    assert (
        "UMAP by sample" not in report and "silhouette_sample" not in report
    )  # one sample: left out
    assert (results / "logs" / "report.log").stat().st_size > 0 and not (
        demo_run / "report.html"
    ).exists()
    record = json.loads((results / "run.json").read_text())
    assert set(record["data"]) == set(list(DATA_OUTPUTS)[:6]) and record["run"] == "demo"
    assert record["config"]["hvg"]["n_top_genes"] == 1200 and record["versions"]["torch"]
    assert record["named_by"] is None  # tiny.yaml sets run: demo
    for rule in DATA_OUTPUTS:
        assert run_output(demo_run, rule).exists(), f"{rule} did not write its output"
        assert run_log(demo_run, rule).stat().st_size > 0, f"{rule} wrote no log"
        assert (demo_run / record["benchmarks"][rule]).exists(), f"{rule} wrote no benchmark"
    manifest = json.loads(run_output(demo_run, "tokenize_shards").read_text())
    n_cells = {
        split: sum(s["n_cells"] for s in shards) for split, shards in manifest["splits"].items()
    }
    assert n_cells["train"] + n_cells["validation"] == 2700  # PBMC 3k passes QC whole
    assert n_cells["validation"] == round(0.03 * 2700)
    assert (
        manifest["n_genes"] == 1200 and manifest["cls_id"] == 1200 and manifest["pad_id"] == 1201
    )
    assert "cells 2700 -> 2700" in run_log(demo_run, "filter_qc").read_text()
    assert "1200 HVGs out" in run_log(demo_run, "select_hvg").read_text()


def copy_finished_run(demo_run: Path, tmp_path: Path) -> Path:
    """A workflow copy holding the demo run's results and Snakemake's records of them."""
    workdir = copy_workflow(tmp_path)
    shutil.copytree(demo_run / "results", workdir / "results")
    shutil.copytree(
        demo_run / ".snakemake",
        workdir / ".snakemake",
        ignore=shutil.ignore_patterns("conda", "singularity"),
    )
    return workdir


def output_times(workdir: Path, run: str = "demo") -> dict:
    """rule -> (its output's path, modification time), for DATA_OUTPUTS."""
    paths = {rule: run_output(workdir, rule, run) for rule in DATA_OUTPUTS}
    return {rule: (path, path.stat().st_mtime_ns) for rule, path in paths.items()}


def rewritten(before: dict) -> set:
    """The rules whose outputs (as recorded in ``before``) changed since."""
    return {rule for rule, (path, time_ns) in before.items() if path.stat().st_mtime_ns != time_ns}


def scheduled_jobs(dry_run_output: str) -> set:
    """The rules a dry run's "Job stats" table lists."""
    table = dry_run_output.split("Job stats:")[1].split("\n\n")[0]
    rows = (line.split() for line in table.splitlines())
    return {row[0] for row in rows if len(row) == 2 and row[1].isdigit() and row[0] != "total"}


def test_changing_one_setting_reruns_that_stage_and_later_only(demo_run, tmp_path):
    workdir = copy_finished_run(demo_run, tmp_path)
    tiny = write_config(workdir, "tiny.yaml", TINY_TRAINING)
    dry = snakemake(workdir, "--configfile", tiny, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr

    before = output_times(workdir)
    time.sleep(1.1)
    changed = write_config(
        workdir, "changed.yaml", {**TINY_TRAINING, "normalize_bin": {"n_bins": 21}}
    )
    snakemake(workdir, "--configfile", changed)
    after = output_times(workdir)
    # the stages before normalize_bin are read from the same folders, untouched
    kept = {rule for rule in DATA_OUTPUTS if after[rule][0] == before[rule][0]}
    assert kept == {"sample_census", "filter_qc", "select_hvg", "pretrain", "embed", "evaluate"}
    assert rewritten(before) == {"pretrain", "embed", "evaluate"}  # the old data, not rewritten
    assert json.loads(after["tokenize_shards"][0].read_text())["n_bins"] == 21

    # chunk_size bounds memory and cells_per_shard how cells are split into files, not results:
    # changing them reruns nothing, the model included
    rechunked = write_config(
        workdir,
        "rechunked.yaml",
        {
            **TINY_TRAINING,
            "normalize_bin": {"n_bins": 21},
            "chunk_size": 500,
            "tokenize": {"cells_per_shard": 1000},
        },
    )
    dry = snakemake(workdir, "--configfile", rechunked, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_two_runs_share_their_data_stages_and_neither_overwrites_the_other(demo_run, tmp_path):
    """The issue's first experiment: a copy of the demo's config with 800 HVGs, as a new run."""
    workdir = copy_finished_run(demo_run, tmp_path)
    demo = {**TINY_TRAINING}
    demo.pop("run")  # as config/demo.yaml: the run is named after the file
    experiment = {**demo, "hvg": {"n_top_genes": 800}}
    (workdir / "hvg800.yaml").write_text(yaml.safe_dump(experiment))
    dry = snakemake(workdir, "--configfile", "hvg800.yaml", "-n")
    assert scheduled_jobs(dry.stdout) == {
        "select_hvg", "normalize_bin", "split", "tokenize_shards", "pretrain", "training_pca",
        "run_record", "embed", "evaluate", "report", "all",
    }  # fmt: skip

    before = output_times(workdir)
    demo_model = (workdir / "results/demo/model/best_model.pt").read_bytes()
    snakemake(workdir, "--configfile", "hvg800.yaml")
    assert rewritten(before) == set()  # the demo run: not a file rewritten
    assert (workdir / "results/demo/model/best_model.pt").read_bytes() == demo_model
    mine = output_times(workdir, "hvg800")
    shared = {rule for rule in DATA_OUTPUTS if mine[rule][0] == before[rule][0]}
    assert shared == {"sample_census", "filter_qc"}
    assert json.loads(mine["tokenize_shards"][0].read_text())["n_genes"] == 800
    args = json.loads((workdir / "results/hvg800/model/args.json").read_text())
    assert args["model"]["n_layers"] == TINY_TRAINING["model"]["n_layers"]
    # both records name their data; the demo's is unchanged
    record = json.loads((workdir / "results/hvg800/run.json").read_text())
    assert record["run"] == "hvg800" and record["config"]["hvg"]["n_top_genes"] == 800
    assert record["named_by"] == "hvg800.yaml"  # it sets no run:
    # the same experiment from the command line, nested numbers as users type them
    dry = snakemake(
        workdir, "--configfile", "hvg800.yaml", "--config", 'hvg={"n_top_genes": 800}', "-n"
    )
    assert "Nothing to be done" in dry.stdout + dry.stderr
    # a file of the same name elsewhere: with the same settings it replaces nothing (only the
    # record of what named the run is rewritten); with others it is refused
    (workdir / "exp").mkdir()
    shutil.copy(workdir / "hvg800.yaml", workdir / "exp/hvg800.yaml")
    dry = snakemake(workdir, "--configfile", "exp/hvg800.yaml", "-n")
    assert scheduled_jobs(dry.stdout) == {"run_record", "report", "all"}
    (workdir / "exp/hvg800.yaml").write_text(yaml.safe_dump({**demo, "hvg": {"n_top_genes": 700}}))
    proc = snakemake(workdir, "--configfile", "exp/hvg800.yaml", "-n", check=False)
    assert proc.returncode != 0 and (
        "results/hvg800/ holds the run named by hvg800.yaml (its run.json), made with other "
        "settings"
    ) in " ".join(proc.stdout.split())


def test_same_inputs_and_seed_give_byte_identical_shards(demo_run, tmp_path):
    workdir = copy_workflow(tmp_path)
    snakemake(workdir, "tokenize_shards")
    # the embedded default's data settings are the demo run's: the same folder names
    ours_root = run_output(demo_run, "tokenize_shards").parent
    ours_root = workdir / ours_root.relative_to(demo_run)
    theirs_root = run_output(demo_run, "tokenize_shards").parent
    ours, theirs = sorted(ours_root.rglob("*")), sorted(theirs_root.rglob("*"))
    assert [p.relative_to(ours_root) for p in ours] == [p.relative_to(theirs_root) for p in theirs]
    for a, b in zip(ours, theirs):
        if a.is_file():
            assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs"
    with h5py.File(ours_root / "train/shard_00000.h5") as f:
        assert f["gene_ids"].dtype == "int32" and f["values"].dtype == "int16"


# The embedded default's token shards, pinned. Every machine must compute exactly these bytes:
# a failure here means this machine (CPU, library build) tokenizes the shipped data differently,
# and models trained here are not comparable with the README's figures. (Before HVG variances
# were rounded, AVX2 and AVX-512 machines ordered tied genes differently: other vocabularies.)
PINNED_SHARDS = {
    "train/shard_00000.h5": "78463cc1e63e952b7d3b1c0f8d06016a9a5fde356c7933db75c6487ab08f11ff",
    "validation/shard_00000.h5": (
        "85b02a3cb1e73bf8d8d98c915ec04393d2e916cd78a96c77bf99bb75633a7406"
    ),
}
# (row in the train shard, cell_index, tokens, first 8 gene ids, first 8 values, sum of ids,
# sum of values)
PINNED_CELLS = [
    (0, 0, 108, [1200, 3, 5, 7, 11, 12, 35, 37], [0, 38, 48, 45, 32, 15, 23, 44], 58787, 2839),
    (
        1000,
        1031,
        111,
        [1200, 1, 3, 5, 7, 10, 11, 17],
        [0, 47, 49, 50, 48, 45, 40, 43],
        57548,
        2867,
    ),
    (2618, 2699, 90, [1200, 1, 3, 5, 7, 17, 26, 52], [0, 18, 17, 49, 48, 37, 21, 44], 47658, 2108),
]


def test_embedded_default_shards_are_the_pinned_bytes(demo_run):
    import hashlib

    shards = run_output(demo_run, "tokenize_shards").parent
    with h5py.File(
        shards / "train/shard_00000.h5", "r"
    ) as f:  # tokens first: they say what differs
        offsets, gene_ids, values, cell_index = (
            f[k][:] for k in ("offsets", "gene_ids", "values", "cell_index")
        )
    for row, index, n, first_ids, first_values, id_sum, value_sum in PINNED_CELLS:
        a, b = offsets[row], offsets[row + 1]
        assert (int(cell_index[row]), int(b - a)) == (index, n)
        assert (
            gene_ids[a : a + 8].tolist() == first_ids
            and values[a : a + 8].tolist() == first_values
        )
        assert (int(gene_ids[a:b].sum()), int(values[a:b].sum())) == (id_sum, value_sum)
    for name, sha in PINNED_SHARDS.items():
        actual = hashlib.sha256((shards / name).read_bytes()).hexdigest()
        assert actual == sha, f"{name} has sha256 {actual}, not the pinned {sha}"


def test_a_cell_gets_the_pipelines_embedding_from_scllm_embed(demo_run):
    """scllm.embed on the pipeline's filtered.h5ad (counts, all genes) reproduces
    embeddings.h5ad."""
    import scllm

    results = demo_run / "results" / "demo"
    pipeline = ad.read_h5ad(results / "embeddings.h5ad")
    cells = ad.read_h5ad(run_output(demo_run, "filter_qc"))[
        pipeline.obs_names[::-1]
    ].copy()  # another order
    scllm.embed(cells, results / "model", device="cpu", batch_size=7)
    np.testing.assert_allclose(
        cells.obsm["X_scllm"][::-1], pipeline.obsm["X_scllm"], rtol=0, atol=1e-5
    )


def test_heldout_evaluation_rule_runs_only_when_asked_and_reruns_nothing_else(demo_run, tmp_path):
    workdir = copy_finished_run(demo_run, tmp_path)
    results = workdir / "results" / "demo"
    before = output_times(workdir)
    # A labelled h5ad of "new" cells: PBMC 3k's first 300 cells under other names.
    cells = ad.read_h5ad(REPO / "resources" / "pbmc3k" / "pbmc3k.h5ad")[:300].copy()
    cells.obs_names = [f"new_{i}" for i in range(cells.n_obs)]
    cells.write_h5ad(workdir / "new_cells.h5ad")
    config = write_config(
        workdir,
        "heldout.yaml",
        {
            **TINY_TRAINING,
            "heldout": {
                "path": "new_cells.h5ad",
                "label_key": "celltype",
                "gene_id_column": "gene_ids",
            },
        },
    )
    snakemake(workdir, "--configfile", config)
    assert rewritten(before) == set()
    table = pd.read_csv(results / "evaluation" / "heldout" / "metrics.tsv", sep="\t")
    methods = table["baseline_method"].unique().tolist()
    assert len(methods) == 2 and "training cells, projected (zero-shot)" in methods[1]
    table = table[table["baseline_method"] == methods[0]].set_index("metric")
    assert table.loc["knn_accuracy_cv", "cells"] == "300 (held out: new_cells.h5ad)"
    assert 0.5 < table.loc["knn_accuracy_cv", "baseline"] <= 1.0 and np.isfinite(
        table.loc["knn_accuracy_cv", "scllm"]
    )
    emb = ad.read_h5ad(results / "evaluation" / "heldout" / "embeddings.h5ad")
    assert list(emb.obs_names[:2]) == ["new_0", "new_1"]
    log = (results / "logs" / "evaluate_heldout.log").read_text()
    assert (
        "baselines on the held-out cells: PCA of 300 cells" in log
        and "300 cells, 300 scored" in log
    )
    # the report shows them against both baselines
    report = (results / "report.html").read_text()
    held = report[report.index("<h2>Cells the model never saw</h2>") :]
    assert "300 labelled cells of <code>new_cells.h5ad</code>" in held
    assert all(f"baseline: {method}" in held for method in methods)


def test_a_config_file_without_run_gets_its_own_results_folder(tmp_path):
    workdir = copy_workflow(tmp_path)
    (workdir / "my experiment.yaml").write_text(yaml.safe_dump({"evaluate": {"n_neighbors": 10}}))
    dry = snakemake(workdir, "--configfile", "my experiment.yaml", "-n")
    out = dry.stdout + dry.stderr
    assert "run: not set in my experiment.yaml; outputs go to results/my_experiment/" in out
    assert "results/my_experiment/evaluation/metrics.tsv" in out and "results/demo/" not in out
    named = write_config(workdir, "named.yaml", {"run": "mine"})
    assert (
        "results/mine/evaluation/metrics.tsv"
        in snakemake(workdir, "--configfile", named, "-n").stdout
    )
    # --config run=... counts as setting it, and without config files the embedded default is the
    # demo
    forced = snakemake(workdir, "--configfile", "my experiment.yaml", "--config", "run=demo", "-n")
    forced = forced.stdout + forced.stderr
    assert "results/demo/evaluation/metrics.tsv" in forced and "not set" not in forced
    assert "results/demo/evaluation/metrics.tsv" in snakemake(workdir, "-n").stdout
    # a file of the same name elsewhere would write over the run its namesake named: refused
    (workdir / "results/demo").mkdir(parents=True)
    made = {"run": "demo", "named_by": "config/demo.yaml"}  # as run_record writes it
    (workdir / "results/demo/run.json").write_text(json.dumps(made))
    (workdir / "exp").mkdir()
    shutil.copy(workdir / "config/demo.yaml", workdir / "exp/demo.yaml")
    proc = snakemake(workdir, "--configfile", "exp/demo.yaml", "-n", check=False)
    assert proc.returncode != 0 and (
        "run: not set in exp/demo.yaml, so the run would be named demo; but results/demo/ holds "
        "the run named by config/demo.yaml (its run.json)"
    ) in " ".join(proc.stdout.split())
    assert "Set run: in exp/demo.yaml to write beside it, or add --config run=demo" in " ".join(
        proc.stdout.split()
    )
    # the file that made it still runs under its name; and the fixes the message names work
    same = snakemake(workdir, "--configfile", "config/demo.yaml", "-n")
    assert "results/demo/evaluation/metrics.tsv" in same.stdout
    for fix in (["--config", "run=demo"], ["--config", "run=exp_demo"]):
        assert snakemake(workdir, "--configfile", "exp/demo.yaml", *fix, "-n").returncode == 0
    # a run named by its run: setting is not taken over by a file of that name either
    (workdir / "results/demo/run.json").write_text(json.dumps({"run": "demo", "named_by": None}))
    for args in (["--configfile", "config/demo.yaml"], []):  # the embedded default, as a file
        proc = snakemake(workdir, *args, "-n", check=False)
        assert proc.returncode != 0, args
        assert "holds the run named by its run: setting" in " ".join(proc.stdout.split())


def test_invalid_config_value_fails_before_any_job_and_names_the_key(tmp_path):
    workdir = copy_workflow(tmp_path)
    bad = write_config(workdir, "bad.yaml", {"qc": {"min_genes_per_cell": "many"}})
    proc = snakemake(workdir, "--configfile", bad, check=False)
    assert proc.returncode != 0
    assert "min_genes_per_cell" in proc.stderr + proc.stdout
    assert not (workdir / "results").exists()


def test_a_run_named_data_is_refused_it_would_mix_with_the_shared_folders(tmp_path):
    workdir = copy_workflow(tmp_path)
    (workdir / "data.yaml").write_text(yaml.safe_dump({"hvg": {"n_top_genes": 800}}))
    for args in (["--configfile", "data.yaml"], ["--config", "run=data"]):
        proc = snakemake(workdir, *args, "-n", check=False)
        assert proc.returncode != 0 and "run: data is taken" in proc.stdout, args
    assert not (workdir / "results").exists()
    fixed = snakemake(workdir, "--configfile", "data.yaml", "--config", "run=hvg800", "-n")
    assert "results/hvg800/evaluation/metrics.tsv" in fixed.stdout


@pytest.mark.parametrize("run", ["..", ".", "../elsewhere", ".hidden", "a/b"])
def test_a_run_name_that_leaves_results_is_refused_and_a_plain_one_works(tmp_path, run):
    workdir = copy_workflow(tmp_path)
    bad = write_config(workdir, "bad.yaml", {"run": run})
    proc = snakemake(workdir, "--configfile", bad, "-n", check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "run" in out and "does not match" in out
    assert not (workdir / "results").exists() and not (workdir / "benchmarks").exists()
    # the fix: a plain folder name
    good = write_config(workdir, "good.yaml", {"run": "elsewhere"})
    assert (
        "results/elsewhere/evaluation/metrics.tsv"
        in snakemake(workdir, "--configfile", good, "-n").stdout
    )


def test_own_h5ad_without_its_path_is_named_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path)
    bad = write_config(
        workdir, "nopath.yaml", {"census": {"source": "h5ad", "h5ad": {"path": None}}}
    )
    proc = snakemake(workdir, "--configfile", bad, "-n", check=False)
    assert proc.returncode != 0
    assert (
        "census.source: h5ad reads census.h5ad.path (your h5ad of raw counts), which is not set"
        in proc.stderr + proc.stdout
    )
    assert not (workdir / "results").exists()


def test_own_h5ad_takes_none_of_the_demos_description_of_its_file(tmp_path):
    # demo.yaml describes PBMC 3k (donor pbmc3k_donor, var column gene_ids): a config naming
    # its own file gets the schema's defaults for what it leaves out, not the demo's
    workdir = copy_workflow(tmp_path)
    shutil.copy(workdir / "resources/pbmc3k/pbmc3k.h5ad", workdir / "mine.h5ad")
    own = {"path": "mine.h5ad", "dataset_id": "mine", "cell_type_column": "celltype"}
    mine = write_config(workdir, "mine.yaml", {"census": {"h5ad": own}})
    snakemake(workdir, "sample_census", "--configfile", mine)
    samples = pd.read_csv(
        next((workdir / "results/data").glob("sample_census-*/samples.tsv")), sep="\t"
    )
    assert samples["dataset_id"].tolist() == ["mine"]
    assert samples["donor_id"].tolist() == ["donor_0"]  # not the demo's pbmc3k_donor


def test_a_missing_h5ad_or_a_file_in_the_runs_place_is_named_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path)
    missing = write_config(workdir, "missing.yaml", {"census": {"h5ad": {"path": "my.h5ad"}}})
    proc = snakemake(workdir, "--configfile", missing, "-n", check=False)
    assert proc.returncode != 0
    assert "census.h5ad.path: my.h5ad is not a file (a relative path is read from" in proc.stdout
    assert not (workdir / "results").exists()
    # the results folder a run would write to is a file of the user's: refused, and kept
    (workdir / "results").mkdir()
    (workdir / "results" / "notes").write_text("mine")
    proc = snakemake(workdir, "--config", "run=notes", "-n", check=False)
    assert proc.returncode != 0
    assert "run: notes writes to results/notes/, but results/notes is a file" in proc.stdout
    assert (workdir / "results" / "notes").read_text() == "mine"
    # the fixes: the file's own path; a run name of digits, taken as written (not the number 7)
    shutil.copy(workdir / "resources/pbmc3k/pbmc3k.h5ad", workdir / "my.h5ad")
    fixed = snakemake(workdir, "--configfile", missing, "--config", "run=007", "-n")
    assert "results/007/evaluation/metrics.tsv" in fixed.stdout


def test_misspelt_config_key_is_rejected(tmp_path):
    workdir = copy_workflow(tmp_path)
    bad = write_config(workdir, "typo.yaml", {"hvg": {"n_top_gene": 1000}})
    proc = snakemake(workdir, "--configfile", bad, "-n", check=False)
    assert proc.returncode != 0
    assert "unknown setting hvg.n_top_gene: did you mean hvg.n_top_genes?" in proc.stdout
    # an abbreviation's long form, one paragraph (not the schema), and the fix it names works
    bad = write_config(workdir, "typo.yaml", {"train": {"learning_rate": 0.001}})
    proc = snakemake(workdir, "--configfile", bad, "-n", check=False)
    message = proc.stdout[proc.stdout.index("unknown setting") :].split("\n")[0]
    assert message.startswith("unknown setting train.learning_rate: did you mean train.lr? ")
    assert "epochs, batch_size, lr," in message  # the section's settings, in one paragraph
    assert "properties" not in proc.stdout and len(proc.stdout.splitlines()) < 10
    fixed = write_config(workdir, "fixed.yaml", {"train": {"lr": 0.001}})
    assert snakemake(workdir, "--configfile", fixed, "-n").returncode == 0
    # a key in the wrong section is pointed to its own
    proc = snakemake(workdir, "--config", 'hvg={"n_bins": 21}', "-n", check=False)
    assert (
        "unknown setting hvg.n_bins: n_bins is a setting of normalize_bin.n_bins: move it"
        in proc.stdout
    )


def test_nested_numbers_on_the_command_line_are_numbers(tmp_path):
    workdir = copy_workflow(tmp_path)
    proc = snakemake(
        workdir,
        "--config",
        'hvg={"n_top_genes": 800}',
        'train={"lr": 1e-3, "mask_ratios": [0.5], "seed": 3}',
        'census={"census_version": "2025-01-30"}',
        "--printshellcmds",
        "-n",
    )
    assert "select_hvg" in proc.stdout
    from scllm.workflow_config import typed_overrides

    typed = typed_overrides(
        {"hvg": {"n_top_genes": "800"}, "train": {"lr": "1e-3", "mask_ratios": ["0.5"]}},
        yaml.safe_load((workdir / "config" / "schema.yaml").read_text()),
    )
    assert typed == {"hvg": {"n_top_genes": 800}, "train": {"lr": 0.001, "mask_ratios": [0.5]}}
    bad = snakemake(workdir, "--config", 'hvg={"n_top_genes": "many"}', "-n", check=False)
    assert "hvg.n_top_genes: 'many' is not of type 'integer'" in bad.stdout
    # what a config file quotes stays text: a donor id "1" is a name, not a number
    h5ad = {"path": "resources/pbmc3k/pbmc3k.h5ad", "donor_id": "1"}
    quoted = write_config(workdir, "quoted.yaml", {"census": {"h5ad": h5ad}})
    assert "'1'" in (workdir / quoted).read_text()
    snakemake(workdir, "--configfile", quoted, "-n")
    # census.h5ad is taken whole: without its path, none of the demo's is kept, and that is said
    del h5ad["path"]
    nopath = write_config(workdir, "nopath.yaml", {"census": {"h5ad": h5ad}})
    proc = snakemake(workdir, "--configfile", nopath, "-n", check=False)
    assert (
        proc.returncode != 0
        and (
            "(a config that gives census.h5ad gives all of it: none of the demo's description of "
            "its own file is kept)"
        )
        in proc.stdout
    )


def test_real_census_offline_fails_at_once_with_guidance(tmp_path):
    workdir = copy_workflow(tmp_path)
    dry = snakemake(workdir, "--configfile", "config/config.yaml", "-n")
    stats = (dry.stdout + dry.stderr).split("Job stats:")[1]
    jobs = [
        line.split()[0]
        for line in stats.splitlines()
        if line.split()[:1] and line.split()[0] in DATA_OUTPUTS
    ]
    assert jobs == [
        "sample_census",
        "filter_qc",
        "select_hvg",
        "normalize_bin",
        "split",
        "tokenize_shards",
        "pretrain",
        "embed",
        "evaluate",
    ]

    started = time.time()
    proc = snakemake(
        workdir, "sample_census", "--configfile", "config/config.yaml", check=False, timeout=300
    )
    assert proc.returncode != 0
    assert time.time() - started < 120
    (folder,) = (workdir / "results/data").glob("sample_census-*")
    log = (folder / "sample_census.log").read_text()
    assert "Census cannot be reached" in log
    assert "snakemake --cores" in log
    assert not (folder / "cells.h5ad").exists()


def test_a_damaged_shard_stops_pretrain_and_the_fix_it_names_works(demo_run, tmp_path, flip_bytes):
    """Deleting one shard would not make Snakemake rerun tokenize_shards (its output folder
    exists), so the refusal names --forcerun; this runs exactly that."""
    workdir = copy_finished_run(demo_run, tmp_path)
    tiny = write_config(workdir, "tiny.yaml", TINY_TRAINING)
    results = workdir / "results" / "demo"
    checkpoint = (results / "model/last_checkpoint.pt").read_bytes()
    flip_bytes(run_output(workdir, "tokenize_shards").parent / "train/shard_00000.h5", "gene_ids")

    proc = snakemake(workdir, "--configfile", tiny, "--forcerun", "pretrain", check=False)
    assert proc.returncode != 0
    log = (results / "logs/pretrain.log").read_text()
    assert "shards/train/shard_00000.h5 has sha256" in log and "Traceback" not in log
    fix = log.split("Rewrite the shards with `")[1].split("`")[0]
    assert fix == "snakemake --forcerun tokenize_shards"
    assert (results / "model/last_checkpoint.pt").read_bytes() == checkpoint, (
        "a step on damaged data was saved"
    )

    snakemake(workdir, "--configfile", tiny, *fix.split()[1:])  # the fix, as the message words it
    assert (results / "model/best_model.pt").exists()
    assert "shard_00000.h5 has sha256" not in (results / "logs/pretrain.log").read_text()


def thinned_pbmc_copies(n_copies: int, prefix: str, seed: int) -> ad.AnnData:
    """PBMC 3k ``n_copies`` times over, each copy a donor of its own whose counts are binomially
    thinned (p = 0.8): real cell-type structure, and no two cells identical."""
    pbmc = ad.read_h5ad(REPO / "resources" / "pbmc3k" / "pbmc3k.h5ad")
    rng = np.random.default_rng(seed)
    copies = []
    for i in range(n_copies):
        counts = pbmc.X.copy()
        counts.data = rng.binomial(counts.data.astype(np.int64), 0.8).astype(np.float32)
        counts.eliminate_zeros()
        obs = pbmc.obs[["celltype"]].assign(donor=f"donor{i}")
        obs.index = [f"{prefix}{i}_{name}" for name in pbmc.obs_names]
        copies.append(ad.AnnData(X=counts, obs=obs, var=pbmc.var))
    return ad.concat(copies, merge="same")


LABEL_METRICS = [
    "knn_accuracy_cv",
    "knn_macro_f1_cv",
    "knn_accuracy_heldout_sample",
    "knn_macro_f1_heldout_sample",
    "leiden_ari",
    "leiden_nmi",
    "silhouette_label",
    "silhouette_sample",
    "scib_silhouette_label",
    "scib_graph_connectivity",
    "scib_silhouette_batch",
    "scib_ilisi",
]


def test_a_real_datasets_size_embeds_evaluates_and_reports(tmp_path):
    """Past the 8,192 cells where scanpy's own choice of neighbour search breaks: evaluate scores
    all of ~21,600 cells (eight donors) and evaluate_heldout 21,600 other cells, tiny model."""
    workdir = copy_workflow(tmp_path)
    thinned_pbmc_copies(8, "run", seed=1).write_h5ad(workdir / "cells.h5ad")
    thinned_pbmc_copies(8, "new", seed=2).write_h5ad(workdir / "new_cells.h5ad")
    source = {"path": "cells.h5ad", "dataset_id": "pbmc3k_x8", "donor_id": None}
    config = write_config(
        workdir,
        "large.yaml",
        {
            **TINY_TRAINING,
            "run": "large",
            "census": {"h5ad": {**source, "donor_column": "donor"}},
            "hvg": {"n_top_genes": 300},  # shorter cells: training and embedding take less time
            "train": {**TINY_TRAINING["train"], "batch_size": 256},
            "embed": {"cells": "all"},
            "evaluate": {"max_cells": 50_000},
            "heldout": {
                "path": "new_cells.h5ad",
                "label_key": "celltype",
                "batch_key": "donor",
                "gene_id_column": "gene_ids",
            },
        },
    )
    snakemake(workdir, "--configfile", config, timeout=1200)
    results = workdir / "results" / "large"

    n_cells = ad.read_h5ad(results / "embeddings.h5ad", backed="r").n_obs
    assert n_cells > 20_000  # a few thinned cells may fall under QC's gene minimum
    tables = {  # the held-out cells are scored against two baselines, a group of rows each
        "evaluation": (f"{n_cells} (all)", ["masked_mse_expression", "masked_mse_gepc"]),
        "evaluation/heldout": ("21600 (held out: new_cells.h5ad)", LABEL_METRICS),
    }
    for folder, (cells, other_rows) in tables.items():
        table = pd.read_csv(results / folder / "metrics.tsv", sep="\t").set_index("metric")
        assert list(table.index) == LABEL_METRICS + other_rows, folder
        table = table[~table.index.duplicated()]  # the first baseline's group
        assert (table.loc[LABEL_METRICS, "cells"] == cells).all(), folder
        assert np.isfinite(table[["scllm", "baseline"]].to_numpy(float)).all(), folder
        # eight cell types, each in every donor: the baseline tells them apart
        assert table.loc["knn_accuracy_cv", "baseline"] > 0.8, folder
        for output in ("metrics.html", "umap_cell_type.png"):
            assert (results / folder / output).stat().st_size > 0, f"{folder}/{output}"
    assert f"{n_cells} cells in, {n_cells} scored" in (results / "logs/evaluate.log").read_text()
    log = (results / "logs" / "evaluate_heldout.log").read_text()
    assert "21600 cells, 21600 scored" in log
    report = (results / "report.html").read_text()
    for section in ("Cell embedding vs PCA", "UMAP by cell type", "UMAP by sample"):
        assert f"<h2>{section}</h2>" in report
    assert f"{n_cells} (all)" in report and "silhouette_sample" in report  # eight samples


def test_a_run_continues_a_trained_model_on_its_own_cells(demo_run, tmp_path):
    """train.init_from: the vocabulary comes from the model (genes these cells lack never
    appear), its weights are the start, the parent is recorded, and the evaluation sets the
    model as it was beside the adapted one. Mismatches stop the run before any job."""
    from scllm.checks import file_sha256

    workdir = copy_workflow(tmp_path)
    parent = demo_run / "results" / "demo" / "model"
    genes = pd.read_csv(parent / "genes.tsv", sep="\t")
    lacking = set(genes["feature_id"][::7])  # these cells lack every 7th vocabulary gene
    cells = ad.read_h5ad(REPO / "resources" / "pbmc3k" / "pbmc3k.h5ad")
    cells = cells[:, ~cells.var["gene_ids"].isin(lacking)].copy()
    cells.write_h5ad(workdir / "my_cells.h5ad")
    adapt = {
        **TINY_TRAINING,
        "run": "adapted",
        "census": {"h5ad": {"path": "my_cells.h5ad", "dataset_id": "mine"}},
        "train": {**TINY_TRAINING["train"], "init_from": str(parent), "lr": 1e-7},
    }
    for change, message in (
        ({"model": {**TINY_TRAINING["model"], "d_model": 32}}, "model.d_model: 32 here, 16 in"),
        ({"train": {**adapt["train"], "init_from": str(tmp_path)}}, "is not a trained model"),
    ):
        bad = write_config(workdir, "bad.yaml", {**adapt, **change})
        proc = snakemake(workdir, "--configfile", bad, "-n", check=False)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr
        assert not (workdir / "results").exists()

    snakemake(workdir, "--configfile", write_config(workdir, "adapt.yaml", adapt))
    results = workdir / "results" / "adapted"
    vocabulary = pd.read_csv(run_output(workdir, "select_hvg", "adapted"), sep="\t")
    assert vocabulary["feature_id"].tolist() == genes["feature_id"].tolist()
    assert set(vocabulary["feature_id"][~vocabulary["in_data"]]) == lacking
    assert (results / "model" / "vocab.json").read_bytes() == (parent / "vocab.json").read_bytes()
    binned = ad.read_h5ad(run_output(workdir, "normalize_bin", "adapted"))
    assert binned[:, list(lacking)].X.nnz == 0  # never a token
    args = json.loads((results / "model" / "args.json").read_text())
    assert args["parent"]["path"] == str(parent)
    assert args["parent"]["best_model_sha256"] == file_sha256(parent / "best_model.pt")
    # an epoch at lr 1e-7 leaves the parent's weights nearly as they were: they were loaded
    import torch

    before = torch.load(parent / "best_model.pt", weights_only=True)
    after = torch.load(results / "model" / "best_model.pt", weights_only=True)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-3
    assert "weights from" in (results / "logs" / "pretrain.log").read_text()
    methods = pd.read_csv(results / "evaluation" / "metrics.tsv", sep="\t")["baseline_method"]
    assert "the continued model, zero-shot" in set(methods)
    assert any("continued model's training cells, projected" in m for m in set(methods))
