"""Rule pretrain: one process on a CPU or one GPU; one process per GPU (torchrun) for several, on
one node or on every node of a multi-node SLURM job (srun + torchrun, scllm.launch).

SIGTERM/SIGUSR1 (SLURM preemption) make training write a checkpoint and stop; the job then exits
with status 75 (scllm.train.PREEMPTED_EXIT_CODE) and a rerun resumes. Under torchrun the signal
reaches every worker (SLURM signals every process of the job; scllm.launch passes it on too), the
workers agree on a step, checkpoint it and stop, and the status is still 75."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
import sys
from pathlib import Path

from scllm.files import setup_logging
from scllm.train.launch import JobResources, pretrain_job

setup_logging(snakemake.log[0])
status = pretrain_job(
    Path(snakemake.input.shards) / "manifest.json",
    Path(snakemake.output.model).parent,
    {"model": snakemake.params.model, "train": dict(snakemake.params.train)},
    JobResources(
        nodes=int(snakemake.resources.get("nodes", 1) or 1),
        gpus=int(snakemake.resources.get("gpu", 0) or 0),  # in all, over every node (--gpus)
        threads=snakemake.threads,
    ),
    snakemake.log[0],
    pythonpath=scllm_src.SRC,
)
if status:  # 75: stopped by a signal with a checkpoint written; rerun to resume
    sys.exit(status)
