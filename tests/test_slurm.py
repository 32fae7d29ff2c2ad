"""The workflow on a SLURM cluster through profiles/slurm: every rule is a SLURM job, pretrain gets
a GPU and the data rules do not, and the results equal a local run's.

Runs only where a SLURM cluster answers `sinfo` and has the partitions `cpu` and `gpu`. In CI,
.ci/run starts a single-node cluster with fake GPUs (tests/slurm/start_local_slurm.sh) with those
partitions. The test edits the profile's three placeholders in its copy of the workflow, as a
user does; the overlay profile profiles/slurm-ci adds what that cluster needs (no accounting
database, so status checks go through squeue).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
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

TIMEOUT = 900  # seconds for the whole SLURM run; `timeout -k` ends it (and its jobs) after that
PROFILES = [
    "--profile",
    "profiles/slurm",
    "--profile",
    "profiles/slurm-ci",
]  # the overlay wins per key
# What a user writes over the profile's placeholders; here, the test cluster's names.
EDITS = {"EDIT-ME-cpu-partition": "cpu", "EDIT-ME-gpu-partition": "gpu", "EDIT-ME-account": "ci"}


def edited(profile_text: str) -> str:
    for placeholder, value in EDITS.items():
        assert profile_text.count(f'"{placeholder}"') == 1, (
            f"profiles/slurm/config.yaml has no single {placeholder}"
        )
        profile_text = profile_text.replace(f'"{placeholder}"', f'"{value}"')
    return profile_text


def edit_profile(workdir: Path) -> None:
    """Replace the three placeholders of the workflow copy's profiles/slurm, as a user does."""
    path = workdir / "profiles/slurm/config.yaml"
    path.write_text(edited(path.read_text()))


PROFILE = yaml.safe_load(edited((REPO / "profiles/slurm/config.yaml").read_text()))
CPU_PARTITION = PROFILE["default-resources"]["slurm_partition"]
PRETRAIN = PROFILE["set-resources"]["pretrain"]


def cluster_problem() -> str | None:
    """Why the test cannot run here, or None."""
    how = "(.ci/run starts a test cluster: sudo bash tests/slurm/start_local_slurm.sh start)"
    if shutil.which("sinfo") is None:
        return f"no SLURM cluster here: `sinfo` is not installed {how}"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%P %G"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return f"no SLURM cluster reachable: `sinfo` timed out {how}"
    if proc.returncode != 0:
        return f"no SLURM cluster reachable: `sinfo` failed: {proc.stderr.strip()} {how}"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[cluster]')"
    gres = {}
    for line in proc.stdout.splitlines():
        name, node_gres = line.split(maxsplit=1)
        gres[name.rstrip("*")] = node_gres
    cpu, gpu = CPU_PARTITION, PRETRAIN["slurm_partition"]
    missing = sorted({cpu, gpu} - set(gres))
    if missing:
        return (
            f"the cluster has no partition {', '.join(missing)} "
            "(named in profiles/slurm/config.yaml); "
            f"this test runs on the test cluster of tests/slurm/start_local_slurm.sh"
        )
    if "gpu" not in gres[gpu]:
        return f"partition {gpu} has no GPUs (GRES: {gres[gpu]})"
    return None


def slurm_jobs(workdir: Path) -> dict[str, dict[str, str]]:
    """rule -> `scontrol show job -d` fields of the SLURM job that ran it from ``workdir``.

    The plugin names every job of a run alike and puts `rule_<name>` in the comment; finished
    jobs stay visible to squeue/scontrol for MinJobAge (600 s on the test cluster).
    """
    listing = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i|%k|%Z"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    jobs = {}
    for line in listing.splitlines():
        job_id, comment, job_dir = line.split("|")
        if Path(job_dir) != workdir:
            continue
        show = subprocess.run(
            ["scontrol", "show", "job", "-d", "-o", job_id],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        fields = dict(item.split("=", 1) for item in show.split() if "=" in item)
        rule = comment.strip().removeprefix("rule_")
        assert rule not in jobs, (
            f"rule {rule} ran as two SLURM jobs ({jobs.get(rule, {}).get('JobId')}, {job_id})"
        )
        jobs[rule] = fields
    return jobs


def cancel_leftover_jobs(workdir: Path) -> None:
    listing = subprocess.run(
        ["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True, timeout=60
    )
    ids = [
        line.split("|")[0]
        for line in listing.stdout.splitlines()
        if Path(line.split("|")[1]) == workdir
    ]
    if ids:
        subprocess.run(["scancel", *ids], timeout=60)


def slurm_logs(workdir: Path) -> str:
    logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "\n".join(f"--- {log.relative_to(workdir)}\n{log.read_text()[-3000:]}" for log in logs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, dict[str, dict[str, str]]]:
    """The embedded default (tiny model) on SLURM and, at the same time, locally with --cores 2."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
    cluster = copy_workflow(tmp_path_factory.mktemp("slurm")).resolve()
    edit_profile(cluster)
    local = copy_workflow(tmp_path_factory.mktemp("local")).resolve()
    tiny = write_config(cluster, "tiny.yaml", TINY_TRAINING)
    write_config(local, "tiny.yaml", TINY_TRAINING)

    with open(local / "snakemake.out", "w") as local_out:
        local_run = subprocess.Popen(
            [
                "timeout",
                "-k",
                "30",
                str(TIMEOUT),
                *SNAKEMAKE,
                "--cores",
                "2",
                "--configfile",
                tiny,
            ],
            cwd=local,
            stdout=local_out,
            stderr=subprocess.STDOUT,
        )
        try:
            proc = subprocess.run(
                ["timeout", "-k", "30", str(TIMEOUT), *SNAKEMAKE, *PROFILES, "--configfile", tiny],
                cwd=cluster,
                capture_output=True,
                text=True,
                timeout=TIMEOUT + 60,
            )
        finally:
            cancel_leftover_jobs(cluster)
            local_rc = local_run.wait(timeout=TIMEOUT + 60)
    output = proc.stdout[-6000:] + proc.stderr[-6000:]
    if proc.returncode in (124, 137):
        raise AssertionError(
            f"the SLURM run did not finish within {TIMEOUT} s:\n{output}\n{slurm_logs(cluster)}"
        )
    if proc.returncode != 0:
        raise AssertionError(
            f"the SLURM run failed (exit {proc.returncode}):\n{output}\n{slurm_logs(cluster)}"
        )
    assert local_rc == 0, f"the local run failed:\n{(local / 'snakemake.out').read_text()[-6000:]}"
    return cluster, local, slurm_jobs(cluster)


def test_every_rule_ran_as_a_completed_slurm_job(runs):
    cluster, _, jobs = runs
    assert set(DATA_OUTPUTS) <= set(jobs), f"SLURM jobs per rule: {sorted(jobs)}"
    for rule, job in jobs.items():
        assert job["JobState"] == "COMPLETED", (
            f"{rule}: SLURM job {job['JobId']} ended {job['JobState']}"
        )
    for rule in DATA_OUTPUTS:
        assert run_output(cluster, rule).exists(), f"{rule} did not write its output"
        assert run_log(cluster, rule).stat().st_size > 0, f"{rule} wrote no log"


def test_pretrain_job_gets_a_gpu_and_data_jobs_do_not(runs):
    _, _, jobs = runs
    pretrain = jobs["pretrain"]
    # requested (--gpus=1, from the rule's gpu=1) and granted (JOB_GRES lists the allocated GPU)
    assert pretrain.get("TresPerJob") == "gres:gpu:1", pretrain
    assert pretrain.get("JOB_GRES", "(null)").startswith("gpu:"), pretrain
    assert pretrain["Partition"] == PRETRAIN["slurm_partition"]
    assert pretrain.get("CpusPerTres") == f"gres:gpu:{PRETRAIN['cpus_per_gpu']}", pretrain
    assert pretrain["NumCPUs"] == str(PRETRAIN["cpus_per_gpu"])
    assert pretrain.get("MinMemoryNode") == f"{PRETRAIN['mem_mb']}M", (
        pretrain
    )  # one memory size: --mem
    for rule in DATA_OUTPUTS.keys() - {"pretrain"}:
        job = jobs[rule]
        assert job["Partition"] == CPU_PARTITION, f"{rule} ran in {job['Partition']}"
        assert job.get("JOB_GRES") == "(null)", f"{rule} was granted {job.get('JOB_GRES')}"
        assert not any(
            "gpu" in job.get(key, "") for key in ("TresPerJob", "TresPerNode", "TresPerTask")
        ), job


def test_results_equal_a_local_run(runs):
    cluster, local, _ = runs
    shards = {run: run_output(run, "tokenize_shards").parent for run in (cluster, local)}
    ours = sorted(p.relative_to(cluster) for p in shards[cluster].rglob("*"))
    theirs = sorted(p.relative_to(local) for p in shards[local].rglob("*"))
    assert ours == theirs
    for path in ours:
        if (cluster / path).is_file():
            assert (cluster / path).read_bytes() == (local / path).read_bytes(), (
                f"{path} differs from the local run"
            )

    model = "results/demo/model"
    a = torch.load(cluster / model / "best_model.pt", weights_only=True)
    b = torch.load(local / model / "best_model.pt", weights_only=True)
    assert a.keys() == b.keys()
    epochs_a, epochs_b = (
        pd.read_csv(run / model / "epochs.tsv", sep="\t") for run in (cluster, local)
    )
    threads = {
        json.loads((run / model / "args.json").read_text())["train"]["num_threads"]
        for run in (cluster, local)
    }
    if len(threads) == 1:  # same seed, data and CPU thread count: bit for bit the same training
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} differs from the local run"
        pd.testing.assert_frame_equal(epochs_a, epochs_b)
    else:  # other thread counts sum in another order: float rounding only (about 1e-7 with 1 vs 2)
        for name in a:
            torch.testing.assert_close(
                a[name], b[name], rtol=0, atol=1e-5, msg=f"{name} ({threads} threads)"
            )
        pd.testing.assert_frame_equal(epochs_a, epochs_b, rtol=1e-4)


def test_an_unedited_profile_is_refused_naming_the_three_values(workflow_copy):
    """Needs no cluster: the check runs when the workflow is parsed, before any job is
    submitted."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    workdir = workflow_copy
    proc = subprocess.run(
        [*SNAKEMAKE, "--profile", "profiles/slurm", "-n"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    for line in (
        "default-resources: slurm_partition: EDIT-ME-cpu-partition",
        "default-resources: slurm_account: EDIT-ME-account",
        "set-resources: pretrain: slurm_partition: EDIT-ME-gpu-partition",
        "Edit these three values in profiles/slurm/config.yaml",
    ):
        assert line in output, output
    assert (
        not (workdir / ".snakemake" / "slurm_logs").exists() and not (workdir / "results").exists()
    )
    # the three edits are all it takes: the same dry run now plans every job
    edit_profile(workdir)
    proc = subprocess.run(
        [*SNAKEMAKE, "--profile", "profiles/slurm", "-n"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "This was a dry-run" in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )


def test_a_multi_node_pretrain_without_its_srun_settings_is_refused(workflow_copy):
    """Needs no cluster: nodes: 2 alone would run the rule in a one-node `srun -n1` step; the
    workflow stops at parse time naming the three lines docs/cluster.md asks for, and runs with
    them."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    workdir = workflow_copy
    edit_profile(workdir)
    path = workdir / "profiles/slurm/config.yaml"
    text = path.read_text()
    assert text.count("    nodes: 1 ") == 1
    path.write_text(
        text.replace("    nodes: 1 ", "    nodes: 2 ").replace("    gpu: 1 ", "    gpu: 4 ")
    )
    proc = subprocess.run(
        [*SNAKEMAKE, "--profile", "profiles/slurm", "-n"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    asked = ('mpi: "srun"', "tasks: 2", "tasks_per_gpu: 0", "docs/cluster.md, 'Several nodes'")
    for line in asked:
        assert line in output, output
    # the profile's commented lines, switched on
    path.write_text(
        path.read_text().replace("    # mpi:", "    mpi:").replace("    # tasks", "    tasks")
    )
    proc = subprocess.run(
        [*SNAKEMAKE, "--profile", "profiles/slurm", "-n"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "This was a dry-run" in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
