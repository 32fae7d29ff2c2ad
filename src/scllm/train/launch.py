"""Launching the training processes: torchrun on each node, srun to start it on every node of a
SLURM job.

One command per node, the same on every node: ``python -m scllm.launch`` with torchrun's own
arguments (it is torchrun; see ``torchrun --help``), typically

    python -m scllm.launch --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:PORT --rdzv-id RUN -m scllm.train --manifest ... --out ...

Every node's torchrun meets the others at the c10d rendezvous on HOST:PORT (hosted by the
torchrun on HOST), which numbers the nodes and the processes; scllm.train then reads RANK,
WORLD_SIZE and LOCAL_RANK. What this adds to torchrun:

- SIGUSR1 is forwarded to the workers too (SLURM's early warning before a time limit), and they
  get ``SHUTDOWN_TIMEOUT`` seconds to write their checkpoint before torchrun kills them.
- The exit status: torchrun reports any worker failure as 1. Here a run whose workers stopped on
  a signal (or whose torchrun was signalled) exits with scllm.train's PREEMPTED_EXIT_CODE (75),
  so a job script or SLURM requeue can tell "rerun to resume" from an error.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from scllm.errors import InputError
from scllm.files import setup_logging
from scllm.train.distributed import PREEMPTED_EXIT_CODE, TrainingPreempted

# SIGTERM: preemption, scancel, time limit; SIGUSR1: `sbatch --signal=USR1@SECONDS`.
SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# Seconds the workers get, after a signal, to agree on a step, checkpoint it and exit.
SHUTDOWN_TIMEOUT = 120


def torchrun_args(
    nnodes: int, nproc_per_node: int | str, rdzv_endpoint: str, rdzv_id: str
) -> list[str]:
    """torchrun's arguments for one node of ``nnodes``, meeting the others at ``rdzv_endpoint``.

    Besides the rendezvous, they name the signals torchrun passes on to its workers (SIGNALS) and
    the time the workers get to checkpoint after one (SHUTDOWN_TIMEOUT).

    Parameters
    ----------
    nnodes : int
        Nodes in the run, at least 1.
    nproc_per_node : int or str
        Processes on each node, or torchrun's "gpu" (one per GPU the node sees).
    rdzv_endpoint : str
        HOST:PORT of the c10d rendezvous.
    rdzv_id : str
        The run's rendezvous id (the same on every node).

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        ``nnodes`` below 1.
    """
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, not {nnodes}")
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id={rdzv_id}",
        f"--signals-to-handle={SIGNALS}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT}",
    ]


def node_command(
    nnodes: int, nproc_per_node: int | str, rdzv_endpoint: str, rdzv_id: str, train_args: list[str]
) -> list[str]:
    """The command each node runs: this module (torchrun) starting ``scllm.train train_args``.

    Parameters
    ----------
    nnodes : int
        Nodes in the run.
    nproc_per_node : int or str
        Processes on each node, or "gpu".
    rdzv_endpoint : str
        HOST:PORT of the c10d rendezvous.
    rdzv_id : str
        The run's rendezvous id.
    train_args : list of str
        The arguments of ``python -m scllm.train``.

    Returns
    -------
    list of str
    """
    return [
        sys.executable,
        "-m",
        "scllm.launch",
        *torchrun_args(nnodes, nproc_per_node, rdzv_endpoint, rdzv_id),
        "-m",
        "scllm.train",
        *train_args,
    ]


def slurm_nodes(env=os.environ) -> list[str]:
    """Host names of the SLURM job's nodes, in SLURM's order ([] outside a SLURM job).

    Parameters
    ----------
    env : mapping, default os.environ
        The environment to read SLURM_JOB_NODELIST (or SLURM_NODELIST) from.

    Returns
    -------
    list of str

    Raises
    ------
    InputError
        ``scontrol show hostnames`` fails.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return []
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        raise InputError(
            f"cannot list the nodes of SLURM job {env.get('SLURM_JOB_ID')} ({nodelist}): {err}"
        ) from err
    return out.stdout.split()


def srun_command(nnodes: int, command: list[str]) -> list[str]:
    """``command`` once on each of the job's ``nnodes`` nodes: one task per node.

    Each task starts that node's training processes. ``--overlap``: the rule's own job step may
    hold the CPUs of the first node; ``--wait``: a node whose torchrun ended (an error) ends the
    others a while later instead of leaving them waiting in a collective (a normal end or a
    preemption ends all nodes within seconds: every process waits for the checkpoint);
    ``--label``: each line says which node printed it.

    Parameters
    ----------
    nnodes : int
        The job's nodes to run on.
    command : list of str
        The command of each node (``node_command``).

    Returns
    -------
    list of str
    """
    return [
        "srun",
        "--overlap",
        f"--nodes={nnodes}",
        f"--ntasks={nnodes}",
        "--ntasks-per-node=1",
        f"--wait={SHUTDOWN_TIMEOUT}",
        "--label",
        *command,
    ]


def launch_training(
    train_args: list[str],
    log_file: str | Path,
    *,
    nodes: int = 1,
    procs_per_node: int | str = 1,
    env: dict | None = None,
) -> int:
    """Run ``scllm.train train_args`` in several processes, on this node or on every job node.

    On one node torchrun starts ``procs_per_node`` processes here; on several, srun starts torchrun
    on each of ``nodes`` nodes of the current SLURM job, meeting at a c10d rendezvous on this
    node. Every line any process prints (every rank's log lines, torchrun's messages, tracebacks)
    is appended to ``log_file`` and echoed to stderr. SIGTERM and SIGUSR1 reaching this process
    are passed on, so the training checkpoints and stops wherever the signal arrived.

    Parameters
    ----------
    train_args : list of str
        The arguments of ``python -m scllm.train``.
    log_file : str or Path
        The log to append to.
    nodes : int, default 1
        Nodes to train on (more than 1 needs a SLURM job holding them).
    procs_per_node : int or str, default 1
        Processes on each node, or "gpu" (one per GPU the node sees).
    env : dict or None, default None
        The processes' environment; None: this process's.

    Returns
    -------
    int
        The exit status: 0, 75 (PREEMPTED_EXIT_CODE: stopped by a signal with a checkpoint
        written; rerun to resume) or another failure.

    Raises
    ------
    InputError
        Several nodes asked for, but the SLURM job holds fewer (or there is none).
    """
    env = dict(os.environ if env is None else env)
    if nodes > 1:
        hosts = slurm_nodes(env)
        if len(hosts) < nodes:
            raise InputError(
                f"training on {nodes} nodes needs a SLURM job holding them (this process sees "
                f"{len(hosts) or 'no SLURM job with'} node(s)). Run it with the SLURM profile "
                "(see docs/cluster.md, 'Several nodes'), or set nodes: 1."
            )
        # The rendezvous (a TCP store) lives in this node's torchrun; the other nodes connect to
        # it.
        endpoint = f"{socket.gethostname()}:{free_port()}"
        run_id = env.get("SLURM_JOB_ID") or uuid.uuid4().hex
        command = srun_command(
            nodes, node_command(nodes, procs_per_node, endpoint, run_id, train_args)
        )
    else:
        command = node_command(1, procs_per_node, "localhost:0", uuid.uuid4().hex, train_args)
    with open(log_file, "a") as log:
        log.write("launching: " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            bufsize=1,
        )
        forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stderr.write(line)
            return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# --- rule pretrain: one process here, or one per GPU on one or several nodes ---------------------


@dataclass(frozen=True)
class JobResources:
    """What the pretrain job was given.

    Attributes
    ----------
    nodes : int, default 1
        Nodes.
    gpus : int, default 0
        GPUs in all, over every node (``sbatch --gpus``).
    threads : int, default 1
        CPU threads (a single training process uses them all).
    """

    nodes: int = 1
    gpus: int = 0
    threads: int = 1


def processes_per_node(resources: JobResources, visible_gpus: int, cuda: bool) -> int | str | None:
    """How the job trains: one process here, or how many processes torchrun starts on each node.

    On several nodes one per GPU the node sees ("gpu": SLURM may spread --gpus unevenly over the
    nodes; without CUDA, the job's GPUs divided by its nodes); on one node one per GPU of the job
    that this process sees.

    Parameters
    ----------
    resources : JobResources
        What the job was given.
    visible_gpus : int
        GPUs this process sees.
    cuda : bool
        Whether CUDA is available.

    Returns
    -------
    int or str or None
        None for one process here (on a CPU or one GPU), else torchrun's ``--nproc-per-node``.
    """
    n_gpus = min(resources.gpus, visible_gpus)
    if resources.nodes <= 1 and n_gpus <= 1:
        return None
    if resources.nodes > 1:
        return "gpu" if cuda else max(1, resources.gpus // resources.nodes)
    return n_gpus


def pretrain_job(
    manifest, out_dir, params: dict, resources: JobResources, log_file, pythonpath=None
) -> int:
    """Rule pretrain: train in this process, or launch one process per GPU.

    Several processes are started by torchrun (through srun on every node of a SLURM job with
    several nodes), appending to ``log_file``.

    Parameters
    ----------
    manifest : str or Path
        The shards' manifest.json.
    out_dir : str or Path
        The run's folder.
    params : dict
        The ``model`` and ``train`` sections.
    resources : JobResources
        What the job was given.
    log_file : str or Path
        The rule's log.
    pythonpath : str or None, default None
        Put first on the processes' PYTHONPATH (the checkout's src/).

    Returns
    -------
    int
        The exit status: 0, PREEMPTED_EXIT_CODE (stopped by a signal with a checkpoint written:
        rerun to resume) or the processes' failure.
    """
    import torch

    out_dir = Path(out_dir)
    per_node = processes_per_node(resources, torch.cuda.device_count(), torch.cuda.is_available())
    if per_node is None:
        return _train_here(manifest, out_dir, params, resources.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    params_file = out_dir / "params.json"
    params_file.write_text(json.dumps(params, indent=1))
    log = logging.getLogger("scllm")
    log.info("training on %d node(s), %s process(es) per node", resources.nodes, per_node)
    setup_logging(log_file, append=True)  # reopened for appending: the launcher appends to it too
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")])),
    }
    returncode = launch_training(
        ["--manifest", str(manifest), "--out", str(out_dir), "--params", str(params_file)],
        log_file,
        nodes=resources.nodes,
        procs_per_node=per_node,
        env=env,
    )
    if returncode:  # the processes logged why, to the rule's log
        print(f"training processes exited with status {returncode}", file=sys.stderr)
    return returncode


def _train_here(manifest, out_dir: Path, params: dict, threads: int) -> int:
    """One training process: this one, with the job's threads unless train.num_threads is set."""
    from scllm.train.loop import pretrain

    train = dict(params["train"])
    train.setdefault("num_threads", threads)
    try:
        pretrain(manifest, out_dir, params["model"], train, log=logging.getLogger("scllm"))
    except TrainingPreempted:  # logged by pretrain; rerun (or requeue) to resume
        return PREEMPTED_EXIT_CODE
    return 0


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it).

    Returns
    -------
    int
    """
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """torchrun with this project's exit status (``python -m scllm.launch``).

    Parameters
    ----------
    argv : list of str or None, default None
        torchrun's arguments; None reads sys.argv.

    Returns
    -------
    int
        0; PREEMPTED_EXIT_CODE when the workers stopped on a signal with a checkpoint written (or
        torchrun itself was signalled); 1 when a worker failed otherwise.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        # 75: the worker checkpointed and stopped; a negative code: killed by a signal (here,
        # torchrun's shutdown of a node whose peers stopped) - either way a rerun resumes.
        if PREEMPTED_EXIT_CODE in codes and all(c == PREEMPTED_EXIT_CODE or c < 0 for c in codes):
            return PREEMPTED_EXIT_CODE
        return 1
    except (
        SignalException
    ) as err:  # this node's torchrun was signalled; its workers were told to stop
        print(
            f"scllm.launch: stopped by {err.sigval.name}; exiting with {PREEMPTED_EXIT_CODE} "
            "(rerun to resume)",
            file=sys.stderr,
            flush=True,
        )
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
