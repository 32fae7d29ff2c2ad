"""Training on several nodes: torchrun on each node meeting at a c10d rendezvous (scllm.launch).

Two nodes are two local launcher processes here (each one training process, gloo on CPU), which
run the command the pretrain rule starts on every node of a SLURM job. They must end with the
same weights, bit for bit, as one launcher running both processes: the ranks, their batches,
masks and dropout draws, and the gradient all-reduce over two gloo processes are the same, only
the process placement differs. A SIGTERM to one node must make both checkpoint the same step,
exit with 75, and resume to the same weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch

from scllm.train.checkpoint import CHECKPOINT
from scllm.train.distributed import PREEMPTED_EXIT_CODE
from scllm.train.launch import free_port, launch_training, node_command

from conftest import TINY_MODEL, child_env, write_synthetic_shards

# 160 cells / (8 per batch x 2 processes) -> 10 steps per epoch, 20 in all
TRAIN = {
    "epochs": 2,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "checkpoint_every_steps": 1000,
    "log_every_steps": 1,
    "bucket_size_batches": 2,
    "num_threads": 1,
    "device": "cpu",
}
TOTAL_STEPS = 20
TIMEOUT = 240


def environment() -> dict:
    return child_env(OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), n_train=160, n_val=8)


def train_args(shards: Path, out: Path, log: Path | None = None) -> list[str]:
    params = out.parent / f"{out.name}_params.json"
    params.write_text(json.dumps({"model": TINY_MODEL, "train": TRAIN}))
    return ["--manifest", str(shards), "--out", str(out), "--params", str(params)] + (
        ["--log-file", str(log)] if log else []
    )


def start_nodes(
    n_nodes: int, per_node: int, args: list[str], tmp_path: Path
) -> list[subprocess.Popen]:
    """``n_nodes`` launchers (the nodes) meeting at a rendezvous on a free local port."""
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"test{time.monotonic_ns()}"
    procs = []
    for node in range(n_nodes):
        with open(tmp_path / f"node{node}_{run_id}.out", "w") as out:
            procs.append(
                subprocess.Popen(
                    node_command(n_nodes, per_node, endpoint, run_id, args),
                    env=environment(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def finish(procs: list[subprocess.Popen], tmp_path: Path) -> list[int]:
    try:
        return [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def outputs(tmp_path: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("node*.out"))
    )


def weights(out: Path) -> dict:
    return torch.load(out / CHECKPOINT, weights_only=True)


def assert_same_training(a: dict, b: dict) -> None:
    assert a["done"] and b["done"] and a["global_step"] == b["global_step"] == TOTAL_STEPS
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{key} differs"
    for key in b["optimizer"]["state"]:
        for name, value in b["optimizer"]["state"][key].items():
            assert torch.equal(a["optimizer"]["state"][key][name], value), (
                f"optimizer state {key}.{name} differs"
            )
    assert [r["val_loss"] for r in a["epochs"]] == [r["val_loss"] for r in b["epochs"]]


@pytest.fixture(scope="module")
def one_node(shards, tmp_path_factory) -> dict:
    """Both processes under one launcher, as the pretrain rule starts them on one node: the
    reference."""
    tmp = tmp_path_factory.mktemp("one_node")
    status = launch_training(
        train_args(shards, tmp / "run"),
        tmp / "pretrain.log",
        nodes=1,
        procs_per_node=2,
        env=environment(),
    )
    assert status == 0, (tmp / "pretrain.log").read_text()[-4000:]
    assert (
        "--nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=localhost:0"
        in (tmp / "pretrain.log").read_text()
    )
    return weights(tmp / "run")


def test_two_nodes_end_with_the_weights_of_one_node(shards, one_node, tmp_path):
    out = tmp_path / "run"
    procs = start_nodes(2, 1, train_args(shards, out, tmp_path / "train.log"), tmp_path)
    assert finish(procs, tmp_path) == [0, 0], outputs(tmp_path)
    assert_same_training(weights(out), one_node)
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
    log = (tmp_path / "train.log").read_text()
    assert "2 process(es)" in log and re.search(
        r"process 0 of 2 on .* \(node \d, local rank 0\)", log
    )
    # each node's own output holds its rank's lines, marked with the rank
    ranks = {
        m for p in tmp_path.glob("node*.out") for m in re.findall(r"\[rank (\d)\]", p.read_text())
    }
    assert ranks == {"0", "1"}, outputs(tmp_path)


def test_sigterm_on_one_node_checkpoints_every_node_and_resumes(shards, one_node, tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.log"
    args = train_args(shards, out, log)
    procs = start_nodes(2, 1, args, tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while not (log.exists() and re.search(r" step [3-9]/20 ", log.read_text())):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, outputs(
            tmp_path
        )
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)  # the second node only
    assert finish(procs, tmp_path) == [PREEMPTED_EXIT_CODE] * 2, outputs(tmp_path)
    found = re.search(
        r"stopped by (SIGTERM|a signal on another process) in epoch \d, batch \d+/10: "
        r"checkpoint at step (\d+)",
        log.read_text(),
    )
    assert found, log.read_text()[-3000:]
    stopped = weights(out)
    assert stopped["global_step"] == int(found.group(2)) < TOTAL_STEPS and not stopped["done"]

    procs = start_nodes(2, 1, args, tmp_path)  # the requeued job
    assert finish(procs, tmp_path) == [0, 0], outputs(tmp_path)
    assert re.search(rf"resuming from .*step {stopped['global_step']}\b", log.read_text())
    assert_same_training(weights(out), one_node)


def test_the_rules_launcher_starts_every_node_through_srun(shards, one_node, tmp_path):
    """launch_training as the pretrain rule calls it in a two-node SLURM job. ``srun`` and
    ``scontrol`` are stand-ins that start the tasks on this machine, as SLURM would on each node:
    the run must match one node's, and the rule log must hold the lines of both ranks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho nodeA; echo nodeB\n")
    # srun --overlap --nodes=N --ntasks=N ... --label CMD...: N copies of CMD, output prefixed
    # "task: "
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "n=1; while [[ $1 == -* ]]; do [[ $1 == --ntasks=* ]] && n=${1#--ntasks=}; shift; done\n"
        'pids=(); for ((t=0; t<n; t++)); do SLURM_PROCID=$t "$@" 2>&1 | sed -u "s/^/$t: /" & '
        "pids+=($!); done\n"
        'rc=0; for p in "${pids[@]}"; do wait $p || rc=$?; done; exit $rc\n'
    )
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {
        **environment(),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[A-B]",
    }
    out, log = tmp_path / "run", tmp_path / "pretrain.log"
    status = launch_training(train_args(shards, out), log, nodes=2, procs_per_node=1, env=env)
    text = log.read_text()
    assert status == 0, text[-4000:]
    assert_same_training(weights(out), one_node)
    assert re.search(
        r"launching: srun --overlap --nodes=2 --ntasks=2 .* -m scllm\.launch --nnodes=2 "
        r"--nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=\S+:\d+ --rdzv-id=4242",
        text,
    ), text[:2000]
    for rank in (0, 1):  # every rank's lines, through each node's torchrun
        assert re.search(rf"^[01]: .*\[rank {rank}\] INFO process {rank} of 2 on", text, re.M), (
            text[-4000:]
        )
    assert re.search(r"^[01]: .*\[rank 0\] INFO epoch 2/2 done", text, re.M)


def test_several_nodes_outside_slurm_are_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    with pytest.raises(Exception, match="needs a SLURM job holding them.*Several nodes"):
        launch_training(["--manifest", "m"], tmp_path / "log", nodes=2, env=env)


def test_the_rule_trains_in_one_process_unless_given_several_gpus_or_nodes():
    from scllm.train.launch import JobResources, processes_per_node

    assert processes_per_node(JobResources(), visible_gpus=0, cuda=False) is None
    assert processes_per_node(JobResources(gpus=1), visible_gpus=1, cuda=True) is None
    # one node: one process per GPU of the job that this process sees
    assert processes_per_node(JobResources(gpus=4), visible_gpus=4, cuda=True) == 4
    assert processes_per_node(JobResources(gpus=4), visible_gpus=2, cuda=True) == 2
    assert processes_per_node(JobResources(gpus=4), visible_gpus=1, cuda=True) is None
    # several nodes: each node's torchrun starts one process per GPU it sees
    assert processes_per_node(JobResources(nodes=2, gpus=16), visible_gpus=8, cuda=True) == "gpu"
    # the CPU stand-in of the tests: the GPUs shared out over the nodes, at least one each
    assert processes_per_node(JobResources(nodes=2, gpus=4), visible_gpus=0, cuda=False) == 2
    assert processes_per_node(JobResources(nodes=2), visible_gpus=0, cuda=False) == 1
