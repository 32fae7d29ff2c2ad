"""Where a training process runs: its rank among the processes, its device and precision, and the
signals that stop it.

One process per GPU under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK): the processes form a
DDP group (NCCL on GPUs, gloo on CPUs). SIGTERM and SIGUSR1 (SLURM preemption, a time limit) do
not kill a process: they set a flag, the processes agree on a step, checkpoint it and stop with
PREEMPTED_EXIT_CODE, which asks the job to be rerun.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scllm.config import TrainConfig

# Exit status after SIGTERM/SIGUSR1 with a checkpoint written: EX_TEMPFAIL ("try again later"),
# distinct from errors (1) and from being killed (128 + signal), so a job script can requeue.
PREEMPTED_EXIT_CODE = 75


class TrainingPreempted(RuntimeError):
    """SIGTERM or SIGUSR1 arrived; a checkpoint of the current step was saved. Rerun to resume.

    Attributes
    ----------
    exit_code : int
        PREEMPTED_EXIT_CODE, the exit status that asks for a requeue.
    """

    exit_code = PREEMPTED_EXIT_CODE


@dataclass(frozen=True)
class Environment:
    """Where this process runs: its rank among world_size, its device and precision.

    Made by ``Environment.start``; ``close`` undoes what it set up.

    Attributes
    ----------
    rank, world_size : int
        This process's rank and the number of processes.
    device : torch.device
        The training device.
    own_group : bool
        Whether this process created the process group (and so destroys it).
    use_bf16 : bool
        Whether the forward passes run under bf16 autocast.
    autocast : context manager
        The autocast context (a no-op without bf16).
    signals : StopSignals
        The installed stop-signal handlers.
    threads : int
        The caller's torch thread count, restored by ``close``.
    """

    rank: int
    world_size: int
    device: torch.device
    own_group: bool  # whether we created the process group (and so destroy it)
    use_bf16: bool
    autocast: object
    signals: StopSignals
    threads: int  # the caller's torch thread count, restored at the end

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes the outputs and logs to the file."""
        return self.rank == 0

    @classmethod
    def start(cls, cfg: TrainConfig) -> Environment:
        """Set up this process: process group (torchrun), device, precision, threads, signals.

        Parameters
        ----------
        cfg : TrainConfig
            Reads device, amp and num_threads.

        Returns
        -------
        Environment

        Raises
        ------
        RuntimeError
            ``train.device`` is "cuda" but no CUDA device is visible.
        """
        rank, world_size, device, own_group = setup_distributed(cfg.device)
        use_bf16 = cfg.amp == "bf16" or (
            cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        threads = torch.get_num_threads()
        if cfg.num_threads:
            torch.set_num_threads(int(cfg.num_threads))
        # Last: nothing after it can fail, so the caller's handlers are always restored (close).
        signals = StopSignals().install()
        return cls(rank, world_size, device, own_group, use_bf16, autocast, signals, threads)

    def close(self) -> None:
        """Restore the signal handlers and thread count; end the process group if it made it."""
        self.signals.restore()
        torch.set_num_threads(self.threads)
        if self.own_group:
            dist.destroy_process_group()


def setup_distributed(device_setting: str):
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run as the only process.

    Parameters
    ----------
    device_setting : str
        ``train.device``: "auto" (a GPU when one is visible), "cuda" or "cpu".

    Returns
    -------
    rank, world_size : int
    device : torch.device
        Under torchrun the GPU of the process's LOCAL_RANK.
    own_group : bool
        Whether this call created the process group.

    Raises
    ------
    RuntimeError
        "cuda" asked for but no CUDA device is visible.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible")
    if world_size <= 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu"), False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    logging.getLogger("scllm").info(
        "process %d of %d on %s (node %s, local rank %d), device %s",
        dist.get_rank(),
        dist.get_world_size(),
        socket.gethostname(),
        os.environ.get("GROUP_RANK", "?"),
        local_rank,
        device,
    )
    return dist.get_rank(), dist.get_world_size(), device, own


def all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum a tensor over the processes, in place (nothing to do for one process).

    Parameters
    ----------
    t : torch.Tensor
        The tensor, on the process's device.
    world_size : int
        The number of processes.

    Returns
    -------
    torch.Tensor
        ``t``, now the sum.
    """
    if world_size > 1:
        dist.all_reduce(t)
    return t


class StopSignals:
    """SIGTERM and SIGUSR1 set a flag (they do not kill the process).

    The training loop then writes a checkpoint and stops. SLURM sends SIGTERM on preemption or
    cancellation, and SIGUSR1 ahead of the time limit when asked (``sbatch --signal=USR1@120``).

    Attributes
    ----------
    received : str or None
        The name of the signal that arrived, if one did.
    """

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
    )

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def install(self) -> StopSignals:
        """Install the handlers (only in the main thread, where Python allows it).

        Returns
        -------
        StopSignals
            Itself.
        """
        if (
            threading.current_thread() is threading.main_thread()
        ):  # Python sets handlers there only
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def agreed(self, world_size: int, device) -> bool:
        """Whether to stop now; with several processes (a collective call), if any got a signal.

        Parameters
        ----------
        world_size : int
            The number of processes (every one must call it at the same step).
        device : torch.device
            The process's device, for the collective.

        Returns
        -------
        bool
        """
        if world_size == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        return bool(all_reduce(flag, world_size).item())
