"""Rule pretrain: one process on a CPU or one GPU; one process per GPU (torchrun) for several, on
one node or on every node of a multi-node SLURM job (srun + torchrun, scllm.launch).

SIGTERM/SIGUSR1 (SLURM preemption) make training write a checkpoint and stop; the job then exits
with status 75 (scllm.train.PREEMPTED_EXIT_CODE) and a rerun resumes. Under torchrun the signal
reaches every worker (SLURM signals every process of the job; scllm.launch passes it on too), the
workers agree on a step, checkpoint it and stop, and the status is still 75."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
import json
import os
import sys
from pathlib import Path

import torch

from scllm.files import setup_logging

log = setup_logging(snakemake.log[0])
manifest = Path(snakemake.input.shards) / "manifest.json"
out_dir = Path(snakemake.output.model).parent
nodes = int(snakemake.resources.get("nodes", 1) or 1)
gpus = int(snakemake.resources.get("gpu", 0) or 0)  # in all, over every node (sbatch --gpus)
n_gpus = min(gpus, torch.cuda.device_count())
train_cfg = dict(snakemake.params.train)

if nodes > 1 or n_gpus > 1:
    from scllm.train.launch import launch_training

    out_dir.mkdir(parents=True, exist_ok=True)
    params_file = out_dir / "params.json"
    params_file.write_text(
        json.dumps({"model": snakemake.params.model, "train": train_cfg}, indent=1)
    )
    if nodes > 1:  # each node runs one process per GPU it sees (SLURM may spread --gpus unevenly)
        per_node = "gpu" if torch.cuda.is_available() else max(1, gpus // nodes)
    else:
        per_node = n_gpus
    log.info("training on %d node(s), %s process(es) per node", nodes, per_node)
    setup_logging(
        snakemake.log[0], append=True
    )  # reopened for appending: the launcher appends to it too
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [scllm_src.SRC, os.environ.get("PYTHONPATH")])),
    }
    returncode = launch_training(
        ["--manifest", str(manifest), "--out", str(out_dir), "--params", str(params_file)],
        snakemake.log[0],
        nodes=nodes,
        procs_per_node=per_node,
        env=env,
    )
    if returncode:  # the processes logged why, to the rule's log
        print(f"training processes exited with status {returncode}", file=sys.stderr)
        sys.exit(returncode)
else:
    from scllm.train.loop import PREEMPTED_EXIT_CODE, TrainingPreempted, pretrain

    train_cfg.setdefault("num_threads", snakemake.threads)
    try:
        pretrain(manifest, out_dir, snakemake.params.model, train_cfg, log=log)
    except (
        TrainingPreempted
    ):  # logged by pretrain; rerun (or requeue) to resume from the checkpoint
        sys.exit(PREEMPTED_EXIT_CODE)
