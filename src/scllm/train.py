"""Pretraining loop: masked expression prediction with an scGPT-style encoder.

``pretrain`` reads top to bottom: settings -> data -> run identity -> resume point -> model and
optimizer -> epochs (each: training steps, then validation) -> outputs. A training step is
forward -> backward -> optimizer step -> log (``_Training.train_step`` and ``.log_window``).

Everything the run produces is derived from ``last_checkpoint.pt`` (weights, optimizer,
scheduler, RNG states, data position, metrics so far, best weights), so a killed job resumes
exactly where its last checkpoint left it, and a finished one is a no-op when rerun.
SIGTERM or SIGUSR1 (SLURM preemption or time limit) writes a checkpoint at the current step and
exits with PREEMPTED_EXIT_CODE; a NaN or infinite loss stops the run without overwriting the
last good checkpoint. Launch on several GPUs with
``torchrun --nproc_per_node N -m scllm.train ...``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from scllm.checks import load_torch_file
from scllm.config import TrainConfig
from scllm.data import (
    PROFILE_KEYS,
    TRAINING_BATCH_KEYS,
    LengthGroupedBatchSampler,
    ShardDataset,
    check_vocab,
    collate,
    mask_values,
    prefetched,
    training_batch,
)
from scllm.errors import CorruptArtifactError, InputError
from scllm.io import (
    Progress,
    atomic_path,
    remove_stale_temporaries,
    setup_logging,
    software_provenance,
)
from scllm.model import (
    CellTransformer,
    ModelConfig,
    contrastive_loss,
    count_params_text,
    ecs_loss,
    masked_mse,
    peak_flops,
    variance_covariance_loss,
)
from scllm.tokens import read_manifest

# Derived from the data, not settable in the model section.
DATA_MODEL_KEYS = ("vocab_size", "n_bins", "pad_id", "mask_value", "pad_value")

# metrics.tsv (one row per log step) and epochs.tsv (one row per epoch, after validation).
METRIC_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "expr_mse", "gepc_mse", "ecs_loss", "contrastive_loss",
    "cells_per_s", "tokens_per_s", "mfu",
]  # fmt: skip
EPOCH_COLUMNS = [
    "epoch", "step", "train_loss", "val_loss", "val_expr_mse", "val_gepc_mse",
    "val_mean_bin_baseline_mse",
]  # fmt: skip
CHECKPOINT = "last_checkpoint.pt"
OUTPUTS = (
    "best_model.pt",
    "args.json",
    "vocab.json",
    "metrics.tsv",
    "epochs.tsv",
    "loss_curve.png",
)
# Exit status after SIGTERM/SIGUSR1 with a checkpoint written: EX_TEMPFAIL ("try again later"),
# distinct from errors (1) and from being killed (128 + signal), so a job script can requeue.
PREEMPTED_EXIT_CODE = 75


class TrainingPreempted(RuntimeError):
    """SIGTERM or SIGUSR1 arrived; a checkpoint of the current step was saved. Rerun to resume."""

    exit_code = PREEMPTED_EXIT_CODE


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite; nothing was saved after the last good
    state."""


def pretrain(
    manifest_path,
    out_dir,
    model_cfg: dict | None = None,
    train_cfg: dict | None = None,
    log: logging.Logger | None = None,
) -> dict:
    """Pretrain on the shards of ``manifest_path`` and write the model and metrics to ``out_dir``.

    Returns a summary: global_step, epochs_done, best_val_loss, done (False when max_steps
    stopped it).
    """
    log = log or logging.getLogger("scllm")
    cfg = TrainConfig.from_dict(train_cfg)
    out, manifest_path = Path(out_dir), Path(manifest_path)
    env = _Environment.start(cfg)
    try:
        data = _TrainingData.load(manifest_path, cfg, env)
        mcfg = _model_config(model_cfg, data.manifest)
        args = _run_args(mcfg, cfg, data, out, env.world_size)
        ckpt = _resume_point(out, args, env, log)
        if ckpt is not None and _nothing_to_do(ckpt, cfg, out, args, data, env, log):
            return _summary(ckpt)
        training = _Training(cfg, mcfg, data, env, out, args, ckpt, log)
        training.announce()
        return training.run()
    finally:
        env.close()


# --- processes, device, precision ----------------------------------------------------------------


@dataclass
class _Environment:
    """Where this process runs: its rank among world_size, its device and precision."""

    rank: int
    world_size: int
    device: torch.device
    own_group: bool  # whether we created the process group (and so destroy it)
    use_bf16: bool
    autocast: object
    signals: _StopSignals
    threads: int  # the caller's torch thread count, restored at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, cfg: TrainConfig) -> _Environment:
        rank, world_size, device, own_group = _setup_distributed(cfg.device)
        use_bf16 = cfg.amp == "bf16" or (
            cfg.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        threads = torch.get_num_threads()
        if cfg.num_threads:
            torch.set_num_threads(int(cfg.num_threads))
        # Last: nothing after it can fail, so the caller's handlers are always restored (close).
        signals = _StopSignals().install()
        return cls(rank, world_size, device, own_group, use_bf16, autocast, signals, threads)

    def close(self) -> None:
        self.signals.restore()
        torch.set_num_threads(self.threads)
        if self.own_group:
            dist.destroy_process_group()


# --- data ----------------------------------------------------------------------------------------


@dataclass
class _TrainingData:
    """The shards, their batches for this process, and the run's length in steps."""

    manifest_path: Path
    manifest: dict
    train_ds: ShardDataset
    val_ds: ShardDataset
    train_sampler: LengthGroupedBatchSampler
    val_batches: list  # [(batch index, cell indices)], this rank's share, the same every epoch
    steps_per_epoch: int
    total_steps: int

    @property
    def shard_dir(self) -> Path:
        return self.manifest_path.parent

    @classmethod
    def load(cls, manifest_path: Path, cfg: TrainConfig, env: _Environment) -> _TrainingData:
        manifest = read_manifest(manifest_path)
        check_vocab(manifest, manifest_path.parent / "vocab.json", manifest_path)
        train_ds = ShardDataset(manifest_path, "train")
        val_ds = ShardDataset(manifest_path, "validation")
        if len(val_ds) == 0:
            raise ValueError(
                f"{manifest_path} has no validation cells; pretrain needs them to choose "
                "best_model.pt: raise split.validation_fraction or sample more cells"
            )
        sampler = partial(
            LengthGroupedBatchSampler,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            bucket_size_batches=cfg.bucket_size_batches,
        )
        train_sampler = sampler(train_ds.lengths, rank=env.rank, world_size=env.world_size)
        # Validation: the same batches every epoch (no shuffle), this rank's share of them.
        val_batches = sampler(val_ds.lengths, shuffle=False).all_batches(0)
        val_batches = list(enumerate(val_batches))[env.rank :: env.world_size]
        steps_per_epoch = len(train_sampler)
        if steps_per_epoch == 0:
            raise ValueError(
                f"{len(train_ds)} training cells make no batch for {env.world_size} process(es)"
            )
        return cls(
            manifest_path,
            manifest,
            train_ds,
            val_ds,
            train_sampler,
            val_batches,
            steps_per_epoch,
            cfg.epochs * steps_per_epoch,
        )


def _run_args(mcfg: ModelConfig, cfg: TrainConfig, data: _TrainingData, out: Path, world_size):
    """args.json: the run's settings and data; all but provenance must match to resume."""
    return {
        "model": asdict(mcfg),
        "train": cfg.to_dict(),
        "data": {
            # relative to the model directory: a results folder moved or copied whole stays valid
            "manifest": os.path.relpath(data.manifest_path.resolve(), out.resolve()),
            "vocab_sha256": data.manifest["vocab_sha256"],
            # The cells themselves: other shards (new split, bins, cells) must not resume this run.
            "shards_sha256": _shards_fingerprint(data.manifest_path, data.manifest),
            "binning": data.manifest.get("binning"),
            "n_genes": data.manifest["n_genes"],
            "max_seq_len": data.manifest.get("max_seq_len"),
            "n_train_cells": len(data.train_ds),
            "n_validation_cells": len(data.val_ds),
        },
        "world_size": world_size,
        "provenance": software_provenance(),  # not part of the run's identity: resume ignores it
    }


# --- resume --------------------------------------------------------------------------------------


def _resume_point(out: Path, args: dict, env: _Environment, log) -> dict | None:
    """The checkpoint to resume from, or None for a fresh start (which clears earlier outputs)."""
    if env.is_main:
        for path in remove_stale_temporaries(out):
            log.info("removed %s, a temporary left by a killed run", path)
    ckpt = _load_checkpoint(out / CHECKPOINT, args, log)
    if ckpt is None and env.is_main:  # no output of an earlier run may pair with this one
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    return ckpt


def _nothing_to_do(ckpt: dict, cfg: TrainConfig, out: Path, args, data, env, log) -> bool:
    """A finished run (outputs rewritten if missing), or one already at max_steps."""
    if ckpt["done"]:
        if env.is_main and not all((out / name).exists() for name in OUTPUTS):
            log.info("run in %s is complete; rewriting missing outputs from %s", out, CHECKPOINT)
            _write_outputs(out, ckpt, args, data.shard_dir, plot=False)
        else:
            log.info(
                "run in %s is already complete (%d steps); nothing to do", out, ckpt["global_step"]
            )
        return True
    if cfg.max_steps is not None and ckpt["global_step"] >= cfg.max_steps:
        log.info(
            "checkpoint is at step %d >= max_steps=%d; nothing to do",
            ckpt["global_step"],
            cfg.max_steps,
        )
        return True
    return False


# --- the run's state and the training loop -------------------------------------------------------


@dataclass
class RunState:
    """Where the run is and what it has measured: saved in every checkpoint (besides weights,
    optimizer, scheduler and RNG states), so a resumed run continues with the same values."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch done
    global_step: int = 0
    best_val_loss: float = math.inf
    best_model: dict | None = None  # weights of the best epoch so far (CPU tensors)
    metrics: list = field(default_factory=list)  # rows of metrics.tsv
    epochs: list = field(default_factory=list)  # rows of epochs.tsv
    epoch_loss_sum: float = 0.0  # this epoch's training loss, summed over checkpointed segments
    epoch_steps: int = 0
    done: bool = False

    def as_dict(self) -> dict:  # no deep copy (asdict would clone best_model's tensors)
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Window:
    """Sums since the last log line: losses stay on the device (no sync per step)."""

    def __init__(self, device):
        self.loss = torch.zeros(
            5, dtype=torch.float64, device=device
        )  # total, expr, gepc, ecs, contrastive
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.counts = 0, np.zeros(3)  # cells, real tokens, useful FLOPs
        self.start, self.paused = time.perf_counter(), 0.0  # paused: checkpoints and validation

    def seconds(self) -> float:
        return max(time.perf_counter() - self.start - self.paused, 1e-9)


def _model_and_optimizer(cfg, mcfg, data, env, ckpt, log, checkpoint_path):
    """Model, optimizer, scheduler and run state: fresh (seeded, the same weights on every rank)
    or as the checkpoint left them."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    raw_model = CellTransformer(mcfg)
    if cfg.gene_emb_init == "pca" and ckpt is None:
        init_gene_embeddings_from_pca(
            raw_model, data.train_ds, cfg.seed, log if env.is_main else None
        )
    raw_model = raw_model.to(env.device)
    optimizer = _make_optimizer(raw_model, cfg, env.device)
    lr_lambda = _lr_lambda(cfg.warmup_steps, data.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    torch.manual_seed(_seed(cfg.seed, 3, env.rank))  # dropout RNG: different per rank
    if ckpt is None:
        return raw_model, optimizer, scheduler, RunState()
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    _set_rng_state(ckpt["rng"][env.rank], env.device)
    state = RunState(**{f.name: ckpt[f.name] for f in fields(RunState)})
    log.info(
        "resuming from %s: epoch %d, batch %d, step %d",
        checkpoint_path,
        state.epoch + 1,
        state.batch,
        state.global_step,
    )
    return raw_model, optimizer, scheduler, state


class _Training:
    """One run's model, optimizer and state, and the steps of the training loop."""

    def __init__(self, cfg, mcfg, data, env, out, args, ckpt, log):
        self.cfg, self.mcfg, self.data, self.env = cfg, mcfg, data, env
        self.out, self.args, self.log = out, args, log
        self.raw_model, self.optimizer, self.scheduler, self.state = _model_and_optimizer(
            cfg, mcfg, data, env, ckpt, log, out / CHECKPOINT
        )
        self.last_good_step = ckpt["global_step"] if ckpt is not None else None
        self.model = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.raw_model, dynamic=True)
        if env.world_size > 1:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = DDP(self.model, device_ids=device_ids)
        self.views = 2 if cfg.contrastive_weight else 1
        self.peak = peak_flops(env.device) if env.use_bf16 else None
        self.window = _Window(env.device)
        # Time left at this process's rate, validation and checkpoints included.
        self.progress = Progress(self.state.global_step, data.total_steps)
        self.epoch_loss = torch.zeros(2, dtype=torch.float64, device=env.device)  # sum, steps

    def announce(self) -> None:
        """Log the setup; write args.json and the vocabulary next to the model (rank 0)."""
        env, data, mcfg = self.env, self.data, self.mcfg
        if not env.is_main:
            return
        device = env.device
        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        self.log.info(
            "device %s%s; %s; attention: torch scaled_dot_product_attention; %d process(es)",
            device,
            gpu,
            "bf16 autocast" if env.use_bf16 else "fp32",
            env.world_size,
        )
        self.log.info(
            "model: %s parameters, %d layers, d_model %d; %d train / %d validation cells; "
            "%d steps per epoch, %d in total",
            count_params_text(self.raw_model),
            mcfg.n_layers,
            mcfg.d_model,
            len(data.train_ds),
            len(data.val_ds),
            data.steps_per_epoch,
            data.total_steps,
        )
        _write_json(self.out / "args.json", self.args)
        _copy(data.shard_dir / "vocab.json", self.out / "vocab.json")
        _copy(data.shard_dir / "genes.tsv", self.out / "genes.tsv")

    # --- the epoch loop ------------------------------------------------------------------------

    def run(self) -> dict:
        for epoch in range(self.state.epoch, self.cfg.epochs):
            if not self.train_epoch(epoch):  # max_steps reached
                return _summary(self.state.as_dict())
            self.end_epoch(epoch)
        if not self.state.done:  # only with epochs == 0
            self.state.done = True
            self.save_checkpoint(plot=True)
        return _summary(self.state.as_dict())

    def train_epoch(self, epoch: int) -> bool:
        """Train from the current batch to the end of the epoch; False if max_steps stopped it."""
        self.model.train()
        batches = self.data.train_sampler.epoch_batches(epoch)
        make_batch = partial(self.make_batch, epoch, batches)
        first = self.state.batch
        # The next batches are collated and masked in a background thread during this step.
        for b, batch in enumerate(prefetched(make_batch, range(first, len(batches))), first):
            losses, lr = self.train_step(batch)
            self.state.global_step += 1
            self.state.batch = b + 1
            self.count(batch, losses)
            if self.state.global_step % self.cfg.log_every_steps == 0:
                self.log_window(epoch, lr)
            if self.checkpoint_or_stop(epoch, f"batch {b + 1}/{len(batches)}"):
                return False
        return True

    def make_batch(self, epoch: int, batches: list, b: int) -> dict:
        # Masks depend only on (seed, epoch, batch): identical after a resume.
        cfg, env = self.cfg, self.env
        gen = torch.Generator().manual_seed(
            _seed(cfg.seed, 1, epoch, b * env.world_size + env.rank)
        )
        cells = self.data.train_ds.cells(batches[b])
        return training_batch(
            cells,
            self.mcfg.pad_id,
            cfg.mask_ratios,
            gen,
            env.device.type == "cuda",
            self.views,
            cfg.contrastive_view_genes,
        )

    def train_step(self, batch: dict) -> tuple[list, float]:
        """forward -> loss -> backward -> clip -> optimizer step. Returns the losses, the lr."""
        device, cfg = self.env.device, self.cfg
        gene_ids, values, padding_mask, masked, mask = (
            batch[key].to(device, non_blocking=True) for key in TRAINING_BATCH_KEYS
        )
        profile = None
        if PROFILE_KEYS[0] in batch:
            profile = tuple(batch[key].to(device, non_blocking=True) for key in PROFILE_KEYS)
        with self.env.autocast:
            pred = self.model(
                gene_ids, masked, padding_mask, all_genes=cfg.gepc_targets != "masked"
            )
        losses = objective(pred, gene_ids, values, mask, cfg, self.views, profile)
        self.optimizer.zero_grad(set_to_none=True)
        losses[0].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return losses, lr

    def count(self, batch: dict, losses: list) -> None:
        """Add the step to the log window and the epoch's loss."""
        lengths, window = batch["lengths"], self.window
        flops = float((lengths * self.raw_model.estimate_flops_per_token(lengths)).sum())
        window.loss += torch.stack(losses).detach().double()
        # cells (each counted once, whatever the views), real tokens, useful FLOPs
        window.counts += (len(lengths) // self.views, lengths.sum(), flops)
        window.steps += 1
        one = torch.ones((), dtype=torch.float64, device=self.env.device)
        self.epoch_loss += torch.stack([losses[0].detach().double(), one])

    def log_window(self, epoch: int, lr: float) -> None:
        """Append a metrics.tsv row (means over the window, all processes) and log it."""
        env, window, step = self.env, self.window, self.state.global_step
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        seconds = window.seconds()
        sums = torch.cat([window.loss, torch.as_tensor(window.counts, device=env.device)])
        totals = _all_reduce(sums, env.world_size).tolist()
        if not math.isfinite(totals[0]):
            raise _non_finite(step, epoch + 1, self.last_good_step, self.out / CHECKPOINT)
        mean = [v / (window.steps * env.world_size) for v in totals[:5]]
        peak = self.peak
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "train_loss": mean[0],
            "expr_mse": mean[1],
            "gepc_mse": mean[2],
            "ecs_loss": mean[3] if self.cfg.ecs_weight else None,
            "contrastive_loss": mean[4] if self.views > 1 else None,
            "cells_per_s": totals[5] / seconds,
            "tokens_per_s": totals[6] / seconds,
            "mfu": totals[7] / seconds / (peak * env.world_size) if peak else None,
        }
        self.state.metrics.append(row)
        if env.is_main:
            self.log.info(
                "epoch %d/%d step %d/%d loss %.2f (expr %.2f, gepc %.2f) lr %.2e %.0f cells/s "
                "%.0f tokens/s%s; %s",
                epoch + 1,
                self.cfg.epochs,
                step,
                self.data.total_steps,
                mean[0],
                mean[1],
                mean[2],
                row["lr"],
                row["cells_per_s"],
                row["tokens_per_s"],
                f" mfu {row['mfu']:.1%}" if peak else "",
                self.progress.text(step),
            )
        window.reset()

    def checkpoint_or_stop(self, epoch: int, where: str) -> bool:
        """After a step: checkpoint when due, at max_steps or on a signal; True at max_steps."""
        cfg, env, step = self.cfg, self.env, self.state.global_step
        stop = cfg.max_steps is not None and step >= cfg.max_steps
        # A signal is acted on after the step it arrived in (with several processes, at the
        # next log step, where they agree on it: all must checkpoint the same step).
        agree_now = env.world_size == 1 or step % cfg.log_every_steps == 0
        preempt = agree_now and env.signals.agreed(env.world_size, env.device)
        if stop or preempt or step % cfg.checkpoint_every_steps == 0:
            t0 = time.perf_counter()
            _fold_epoch_loss(self.state, self.epoch_loss, env.world_size)
            self.save_checkpoint(plot=stop)
            self.window.paused += time.perf_counter() - t0
        if preempt:
            raise self.preempted(f"in epoch {epoch + 1}, {where}")
        if stop:
            self.log.info(
                "stopping at max_steps=%d (epoch %d, %s); rerun to resume", step, epoch + 1, where
            )
        return stop

    # --- validation, best model, end-of-epoch checkpoint ----------------------------------------

    def end_epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        state, env = self.state, self.env
        _fold_epoch_loss(state, self.epoch_loss, env.world_size)
        val = validation_loss(
            self.raw_model,
            self.data.val_ds,
            self.data.val_batches,
            self.mcfg.pad_id,
            self.cfg.mask_ratios,
            self.cfg.seed,
            env.device,
            env.autocast,
            env.world_size,
        )
        self.ensure_finite(val["val_loss"])
        train_loss = state.epoch_loss_sum / max(state.epoch_steps, 1)
        state.epochs.append(
            {"epoch": epoch + 1, "step": state.global_step, "train_loss": train_loss, **val}
        )
        improved = val["val_loss"] < state.best_val_loss
        if improved:
            self.keep_best(val["val_loss"])
        if env.is_main:
            self.log.info(
                "epoch %d/%d done: train loss %.2f, validation loss %.2f (expression MSE %.2f vs "
                "mean-bin baseline %.2f)%s; %s",
                epoch + 1,
                self.cfg.epochs,
                train_loss,
                val["val_loss"],
                val["val_expr_mse"],
                val["val_mean_bin_baseline_mse"],
                ", new best" if improved else "",
                self.progress.text(state.global_step),
            )
        state.epoch, state.batch, state.epoch_loss_sum, state.epoch_steps = epoch + 1, 0, 0.0, 0
        state.done = epoch + 1 == self.cfg.epochs
        self.save_checkpoint(plot=True)
        self.window.paused += time.perf_counter() - t0
        if not state.done and env.signals.agreed(env.world_size, env.device):
            raise self.preempted(f"at the end of epoch {epoch + 1}")

    def keep_best(self, val_loss: float) -> None:
        self.state.best_val_loss = val_loss
        self.state.best_model = {
            k: v.detach().cpu().clone() for k, v in self.raw_model.state_dict().items()
        }
        if self.env.is_main:
            with atomic_path(self.out / "best_model.pt") as tmp:
                torch.save(self.state.best_model, tmp)

    # --- checkpoints -----------------------------------------------------------------------------

    def ensure_finite(self, *losses: float) -> None:
        """Never save a non-finite state: stop, leaving the last good checkpoint in place."""
        finite = all(math.isfinite(v) for v in (self.state.epoch_loss_sum, *losses))
        if finite:  # a step with a finite loss can still leave NaN weights (an infinite gradient)
            params = self.raw_model.parameters()
            finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if not finite:
            raise _non_finite(
                self.state.global_step,
                self.state.epoch + 1,
                self.last_good_step,
                self.out / CHECKPOINT,
            )

    def save_checkpoint(self, plot: bool) -> None:
        self.ensure_finite()
        env = self.env
        rng = _rng_state(env.device)
        rngs = [rng]
        if env.world_size > 1:
            rngs = [None] * env.world_size
            dist.all_gather_object(rngs, rng)
        if env.is_main:
            ckpt = {
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "args": _identity(self.args),
                **self.state.as_dict(),
            }
            with atomic_path(self.out / CHECKPOINT) as tmp:
                torch.save(ckpt, tmp)
            _write_outputs(self.out, ckpt, self.args, self.data.shard_dir, plot)
        if (
            env.world_size > 1
        ):  # no process stops (preemption, max_steps, the end) before the checkpoint is written
            dist.barrier()
        self.last_good_step = self.state.global_step

    def preempted(self, where: str) -> TrainingPreempted:
        signal_name = self.env.signals.received or "a signal on another process"
        message = (
            f"stopped by {signal_name} {where}: checkpoint at step {self.state.global_step} "
            f"saved to {self.out / CHECKPOINT}; exiting with code {PREEMPTED_EXIT_CODE} "
            "so the job can be requeued. Rerun to resume."
        )
        self.log.warning("%s", message)
        return TrainingPreempted(message)


def init_gene_embeddings_from_pca(
    model: CellTransformer, cells, seed: int, log=None, max_cells: int = 20_000
):
    """Set the gene embeddings (rows 0..n_genes-1) to the genes' loadings on the top d_model
    principal axes of the cells' binned profiles (a seeded sample of at most ``max_cells``),
    weighted by each axis's singular value and scaled to the random init's std (0.02)."""
    n_genes, d = model.cfg.vocab_size - 2, model.cfg.d_model
    rng = np.random.default_rng(_seed(seed, 4))
    rows = np.sort(rng.choice(len(cells), min(len(cells), max_cells), replace=False))
    profiles = np.zeros((len(rows), n_genes), dtype=np.float32)
    for r, i in enumerate(rows):
        genes, values = cells.cell(i)
        profiles[r, genes[1:]] = values[1:]  # position 0 is <cls>
    profiles -= profiles.mean(axis=0)
    _, singular, axes = np.linalg.svd(profiles, full_matrices=False)
    if not singular.size or singular[0] <= 1e-6 * max(1.0, float(np.abs(profiles).max())):
        # one cell (or identical cells) has no principal axes: the loadings would be 0/0 = NaN
        raise InputError(
            f"train.gene_emb_init: pca needs training cells that differ, and the {len(rows)} "
            "training cell(s) have identical bins, so they have no principal axes. Set "
            "train.gene_emb_init: random, or train on more cells."
        )
    k = min(d, len(singular))
    loadings = axes[:k].T * (singular[:k] / singular[0])  # [n_genes, k]
    loadings *= 0.02 / max(float(loadings.std()), 1e-12)
    with torch.no_grad():
        model.gene_emb.weight[:n_genes] = 0.0
        model.gene_emb.weight[:n_genes, :k] = torch.from_numpy(loadings)
    if log is not None:
        explained = float((singular[:k] ** 2).sum() / (singular**2).sum())
        log.info(
            "gene embeddings: loadings on the top %d principal axes of %d cells' bins "
            "(%.0f%% of their variance)",
            k,
            len(rows),
            100 * explained,
        )


def objective(
    pred: dict,
    gene_ids: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    cfg: TrainConfig,
    views: int = 1,
    profile: tuple | None = None,
) -> list:
    """[total loss, expression MSE, GEPC MSE, ECS loss, contrastive loss] of one training batch;
    the total weighs each term by its ``*_weight`` setting (terms with weight 0 are not computed
    and read 0). With ``views`` > 1 the batch holds that many masked views of its cells;
    ``profile`` (gene ids, values) holds the whole cells behind the rows (default: the rows)."""
    zero = torch.zeros((), device=values.device)
    expr = masked_mse(pred["expr_pred"], values, mask)
    if cfg.gepc_targets != "masked":
        gepc = gepc_profile_mse(
            pred["gepc_all_pred"], gene_ids, values, mask, cfg.gepc_targets == "all", profile
        )
    else:
        gepc = masked_mse(pred["gepc_pred"], values, mask)
    ecs = ecs_loss(pred["cell_emb"], cfg.ecs_threshold) if cfg.ecs_weight else zero
    contrastive = zero
    if cfg.contrastive_weight:
        embedding = pred.get("contrastive_z", pred["cell_emb"])
        contrastive = contrastive_loss(embedding, views, cfg.contrastive_temperature)
    total = (
        expr + cfg.gepc_weight * gepc + cfg.ecs_weight * ecs + cfg.contrastive_weight * contrastive
    )
    if cfg.vc_weight:
        total = total + cfg.vc_weight * variance_covariance_loss(pred["cell_emb"])
    return [total, expr, gepc, ecs, contrastive]


def gepc_profile_mse(
    all_genes_pred, gene_ids, values, mask, visible_too: bool = False, profile: tuple | None = None
) -> torch.Tensor:
    """GEPC's MSE over each cell's vocabulary profile: every gene the cell does not express
    (target 0) and every gene it expresses but the model did not see (masked, or left out of a
    contrastive view: target its bin); the visible genes too with ``visible_too``.

    ``gene_ids``/``values``/``mask`` are the model's input rows; ``profile`` = (gene ids, values)
    of the whole cells behind them (default: the rows themselves).
    """
    n_genes = all_genes_pred.shape[1]
    vocab_size = n_genes + 2
    profile_ids, profile_values = profile if profile is not None else (gene_ids, values)
    rows = len(gene_ids)
    # Scatter into [B, vocab_size]: <cls> and <pad> ids land in the last two columns, dropped.
    target = torch.zeros(rows, vocab_size, device=values.device).scatter(
        1, profile_ids, profile_values.float().clamp(min=0)
    )
    visible = torch.zeros(rows, vocab_size, dtype=torch.bool, device=values.device).scatter(
        1, gene_ids, ~mask
    )
    scored = torch.ones_like(visible) if visible_too else ~visible
    return masked_mse(all_genes_pred, target[:, :n_genes], scored[:, :n_genes])


@torch.no_grad()
def validation_loss(
    model, dataset, batches, pad_id, ratios, seed, device, autocast=None, world_size=1
) -> dict:
    """Masked MSE over the validation cells with fixed masks: batch i is masked at ratio
    ``ratios[i % len(ratios)]`` with a generator seeded by (seed, i), so every epoch sees the same.

    Baseline: each cell's masked tokens predicted by the mean bin of its unmasked gene tokens
    (what the model sees); a cell with none left visible falls back to the batch's visible mean.
    All MSEs are token-weighted over every masked position of the split.
    """
    autocast = autocast if autocast is not None else nullcontext()
    was_training = model.training
    model.eval()
    sums = torch.zeros(
        4, dtype=torch.float64, device=device
    )  # expr SE, GEPC SE, baseline SE, n masked
    for i, idx in batches:
        batch = collate(dataset.cells(idx), pad_id)
        gen = torch.Generator().manual_seed(_seed(seed, 2, i))
        masked, mask = mask_values(
            batch["values"], batch["padding_mask"], ratios[i % len(ratios)], gen
        )
        visible = ~batch["padding_mask"] & ~mask
        visible[:, 0] = False
        target = batch["values"].double()
        fallback = (
            target[visible].mean() if visible.any() else torch.zeros((), dtype=torch.float64)
        )
        per_cell = (target * visible).sum(1) / visible.sum(1).clamp(min=1)
        per_cell = torch.where(visible.any(1), per_cell, fallback)
        baseline_se = ((per_cell[:, None] - target) ** 2)[mask].sum()
        with autocast:
            pred = model(
                *(t.to(device) for t in (batch["gene_ids"], masked, batch["padding_mask"]))
            )
        target, mask = target.to(device), mask.to(device)
        sums += torch.stack(
            [
                ((pred["expr_pred"].double() - target) ** 2)[mask].sum(),
                ((pred["gepc_pred"].double() - target) ** 2)[mask].sum(),
                baseline_se.to(device),
                mask.sum().double(),
            ]
        )
    expr, gepc, baseline, n = _all_reduce(sums, world_size).tolist()
    model.train(was_training)
    n = max(n, 1.0)
    return {
        "val_loss": (expr + gepc) / n,
        "val_expr_mse": expr / n,
        "val_gepc_mse": gepc / n,
        "val_mean_bin_baseline_mse": baseline / n,
    }


# --- settings ------------------------------------------------------------------------------------


def _model_config(model_cfg: dict | None, manifest: dict) -> ModelConfig:
    model_cfg = dict(model_cfg or {})
    known = {f.name for f in fields(ModelConfig)} - set(DATA_MODEL_KEYS)
    unknown = set(model_cfg) - known - set(DATA_MODEL_KEYS)
    if unknown:
        raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
    data = {
        "vocab_size": manifest["vocab_size"],
        "n_bins": manifest["n_bins"],
        "pad_id": manifest["pad_id"],
        "mask_value": manifest.get("mask_value", -1),
        "pad_value": manifest.get("pad_value", -2),
    }
    for key in DATA_MODEL_KEYS:
        if key in model_cfg and model_cfg.pop(key) != data[key]:
            raise ValueError(
                f"model.{key} is set by the shards ({data[key]}); "
                "remove it from the model settings"
            )
    return ModelConfig(**data, **model_cfg)


def _shards_fingerprint(manifest_path: Path, manifest: dict) -> str:
    """The data a checkpoint was trained on: a sha256 over the shards' own sha256s, which
    ShardDataset has just checked against the files (so the bytes are not hashed twice)."""
    listed = [
        (split, shard["path"], shard["sha256"])
        for split in sorted(manifest["splits"])
        for shard in manifest["splits"][split]
    ]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def _identity(args: dict) -> dict:
    """What must match for a checkpoint to be resumed: everything but operational settings."""
    train = {k: v for k, v in args["train"].items() if k not in TrainConfig.OPERATIONAL}
    data = {k: v for k, v in args["data"].items() if k != "manifest"}
    return {"model": args["model"], "train": train, "data": data, "world_size": args["world_size"]}


def _lr_lambda(warmup_steps: int, total_steps: int):
    def lr_factor(step: int) -> float:  # linear warmup, then cosine to 0 at total_steps
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return lr_factor


def _make_optimizer(model, cfg, device) -> torch.optim.AdamW:
    # Decay matrices (linear weights, embeddings); not biases or LayerNorm gains.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def _seed(*keys: int) -> int:
    return int(
        np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


# --- processes and devices -----------------------------------------------------------------------


def _setup_distributed(device_setting: str):
    """(rank, world_size, device, whether we created the process group); torchrun sets
    WORLD_SIZE."""
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


def _all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


def _fold_epoch_loss(state: RunState, epoch_loss: torch.Tensor, world_size: int) -> None:
    """Move this segment's loss sums into ``state`` (so they survive a checkpoint)."""
    total, steps = _all_reduce(epoch_loss.clone(), world_size).tolist()
    state.epoch_loss_sum += total / world_size
    state.epoch_steps += int(round(steps / world_size))
    epoch_loss.zero_()


# --- checkpoints and RNG -------------------------------------------------------------------------


def _rng_state(device) -> dict:
    """RNG states as tensors and plain types, so ``torch.load(weights_only=True)`` reads them."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_checkpoint(path: Path, args: dict, log) -> dict | None:
    if not path.exists():
        return None
    try:
        ckpt = load_torch_file(path, "Starting from scratch; the file will be overwritten.")
    except CorruptArtifactError as err:  # a damaged (or foreign) file must not block a fresh start
        log.warning("%s", err)
        return None
    identity = _identity(args)
    if ckpt.get("args") != identity:
        old = ckpt.get("args") or {}
        changed = sorted(
            f"{section}.{key}"
            for section in identity
            if isinstance(identity[section], dict)
            for key in set(identity[section]) | set(old.get(section) or {})
            if identity[section].get(key) != (old.get(section) or {}).get(key)
        )
        changed += [
            s for s in identity if not isinstance(identity[s], dict) and identity[s] != old.get(s)
        ]
        log.warning(
            "%s belongs to a run with other settings (%s differ); starting from scratch and "
            "overwriting it",
            path,
            ", ".join(changed) or "format",
        )
        return None
    # Written before the GEPC columns were renamed (mvc_mse -> gepc_mse): same values.
    for table in ("metrics", "epochs"):
        ckpt[table] = [
            {k.replace("mvc_mse", "gepc_mse"): v for k, v in row.items()} for row in ckpt[table]
        ]
    return ckpt


def _non_finite(
    step: int, epoch: int, last_good_step: int | None, checkpoint: Path
) -> NonFiniteLossError:
    kept = (
        f"{checkpoint} keeps the last good state (step {last_good_step})"
        if last_good_step is not None
        else "no checkpoint had been written yet"
    )
    return NonFiniteLossError(
        f"the training loss became NaN or infinite by step {step} (epoch {epoch}); stopped "
        f"without saving that state: {kept}, and best_model.pt holds only finite weights. Lower "
        "train.lr or raise train.warmup_steps (with bf16 autocast, try train.amp: fp32), then "
        "rerun: changed train settings start a fresh run."
    )


class _StopSignals:
    """SIGTERM and SIGUSR1 set a flag (they do not kill the process); the training loop then
    writes a checkpoint and stops. SLURM sends SIGTERM on preemption or cancellation, and SIGUSR1
    ahead of the time limit when asked (``sbatch --signal=USR1@120``)."""

    SIGNALS = tuple(
        getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
    )

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def install(self) -> _StopSignals:
        if (
            threading.current_thread() is threading.main_thread()
        ):  # Python sets handlers there only
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self.previous = {}

    def agreed(self, world_size: int, device) -> bool:
        """Whether to stop now; with several processes (a collective call), if any got a signal."""
        if world_size == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        return bool(_all_reduce(flag, world_size).item())


def _summary(state: dict) -> dict:
    return {
        "global_step": state["global_step"],
        "epochs_done": state["epoch"],
        "best_val_loss": state["best_val_loss"],
        "done": state["done"],
    }


# --- outputs -------------------------------------------------------------------------------------


def _write_outputs(out: Path, ckpt: dict, args: dict, shard_dir: Path, plot: bool) -> None:
    """Write the human-facing outputs from checkpoint contents (rank 0 only).

    Outputs deleted since the checkpoint (Snakemake removes the outputs of an incomplete job
    before rerunning it) are recreated, so the resumed run ends with all of them.
    """
    _write_tsv(out / "metrics.tsv", METRIC_COLUMNS, ckpt["metrics"])
    _write_tsv(out / "epochs.tsv", EPOCH_COLUMNS, ckpt["epochs"])
    if ckpt["best_model"] is not None and not (out / "best_model.pt").exists():
        with atomic_path(out / "best_model.pt") as tmp:
            torch.save(ckpt["best_model"], tmp)
    if plot or not (out / "loss_curve.png").exists():
        _plot(out / "loss_curve.png", ckpt["metrics"], ckpt["epochs"])
    if not (out / "args.json").exists():
        _write_json(out / "args.json", args)
    for name in ("vocab.json", "genes.tsv"):
        if not (out / name).exists():
            _copy(shard_dir / name, out / name)


def _write_tsv(path: Path, columns: list[str], rows: list[dict]) -> None:
    def fmt(v):
        return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))

    lines = ["\t".join(columns)] + ["\t".join(fmt(row.get(c)) for c in columns) for row in rows]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1) + "\n")


def _copy(src: Path, dst: Path) -> None:
    if src.exists():
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _plot(path: Path, metrics: list[dict], epochs: list[dict]) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    if metrics:
        ax1.plot(
            [r["step"] for r in metrics],
            [r["train_loss"] for r in metrics],
            label="train loss (expr + GEPC)",
        )
    if epochs:
        ax1.plot(
            [r["step"] for r in epochs],
            [r["val_loss"] for r in epochs],
            "o-",
            label="validation loss",
        )
        x = [r["epoch"] for r in epochs]
        ax2.plot(x, [r["val_expr_mse"] for r in epochs], "o-", label="model: expression MSE")
        ax2.plot(
            x, [r["val_gepc_mse"] for r in epochs], "^-", label="model: GEPC (cell embedding) MSE"
        )
        ax2.plot(
            x,
            [r["val_mean_bin_baseline_mse"] for r in epochs],
            "s--",
            label="baseline: cell's mean bin",
        )
    ax1.set(xlabel="step", ylabel="masked MSE", title="training")
    ax2.set(xlabel="epoch", ylabel="masked MSE (bins²)", title="validation")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# --- command line --------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the cell transformer on token shards.")
    parser.add_argument(
        "--manifest", required=True, help="manifest.json written by tokenize_shards"
    )
    parser.add_argument(
        "--out", required=True, help="output directory (resumed if it holds a checkpoint)"
    )
    parser.add_argument("--params", help='JSON file {"model": {...}, "train": {...}}')
    # --log-file too: torchrun's parser rejects "--log" as an ambiguous prefix of its --log-dir.
    parser.add_argument(
        "--log", "--log-file", dest="log", help="log file (rank 0); use --log-file under torchrun"
    )
    args = parser.parse_args(argv)
    params = json.loads(Path(args.params).read_text()) if args.params else {}
    unknown = set(params) - {"model", "train"}
    if unknown:
        parser.error(
            f"{args.params}: unknown sections {sorted(unknown)}; expected 'model' and 'train'"
        )
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # append: under torchrun the launching rule script has already written to this log
    log = setup_logging(args.log if rank == 0 else None, append=True)
    if (
        world_size > 1
    ):  # every rank logs to stderr, which the launcher gathers into the rule log: say whose line
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setFormatter(
                    logging.Formatter(
                        f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"
                    )
                )
    try:
        pretrain(args.manifest, args.out, params.get("model"), params.get("train"), log=log)
    except TrainingPreempted:  # already logged; the exit status asks for a requeue
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
