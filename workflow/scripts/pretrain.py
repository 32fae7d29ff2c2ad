"""Rule pretrain: one process on a CPU or one GPU; one process per GPU (torchrun) for several.

SIGTERM/SIGUSR1 (SLURM preemption) make training write a checkpoint and stop; the job then exits
with status 75 (scllm.train.PREEMPTED_EXIT_CODE) and a rerun resumes. Under torchrun each worker
handles the signal (SLURM signals every process of the job) and the status is torchrun's."""
import scllm_src  # noqa: F401  (makes src/ importable; must come first)
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from scllm.io import setup_logging

log = setup_logging(snakemake.log[0])
manifest = Path(snakemake.input.shards) / "manifest.json"
out_dir = Path(snakemake.output.model).parent
n_gpus = min(int(snakemake.resources.get("gpu", 0) or 0), torch.cuda.device_count())
train_cfg = dict(snakemake.params.train)

if n_gpus > 1:
    out_dir.mkdir(parents=True, exist_ok=True)
    params_file = out_dir / "params.json"
    params_file.write_text(json.dumps({"model": snakemake.params.model, "train": train_cfg}, indent=1))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}",
        "-m", "scllm.train", "--manifest", str(manifest), "--out", str(out_dir),
        "--params", str(params_file), "--log-file", snakemake.log[0],
    ]
    log.info("launching %d processes: %s", n_gpus, " ".join(command))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [scllm_src.SRC, os.environ.get("PYTHONPATH")]))}
    returncode = subprocess.run(command, env=env).returncode
    if returncode:  # the workers logged why, to the rule's log
        print(f"torchrun exited with status {returncode}", file=sys.stderr)
        sys.exit(returncode)
else:
    from scllm.train import PREEMPTED_EXIT_CODE, TrainingPreempted, pretrain

    train_cfg.setdefault("num_threads", snakemake.threads)
    try:
        pretrain(manifest, out_dir, snakemake.params.model, train_cfg, log=log)
    except TrainingPreempted:  # logged by pretrain; rerun (or requeue) to resume from the checkpoint
        sys.exit(PREEMPTED_EXIT_CODE)
