"""Pretraining loop: masked expression prediction with an scGPT-style encoder.

``pretrain`` reads top to bottom: settings -> data -> run identity -> resume point -> model and
optimizer -> epochs (each: training steps, then validation) -> outputs. A training step is
forward -> backward -> optimizer step -> log (``_Training.train_step`` and ``.log_window``).

Everything the run produces is derived from ``last_checkpoint.pt`` (``scllm.train.checkpoint``),
so a killed job resumes exactly where its last checkpoint left it, and a finished one is a no-op
when rerun. SIGTERM or SIGUSR1 (SLURM preemption or time limit) writes a checkpoint at the
current step and exits with PREEMPTED_EXIT_CODE (``scllm.train.distributed``); a NaN or infinite
loss stops the run without overwriting the last good checkpoint. Launch on several GPUs with
``torchrun --nproc_per_node N -m scllm.train ...``.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from scllm.config import ModelConfig, TrainConfig
from scllm.files import Progress, atomic_path
from scllm.model import count_params_text, peak_flops
from scllm.train.batches import (
    PROFILE_KEYS,
    TRAINING_BATCH_KEYS,
    TrainingData,
    contrastive_view,
    derived_seed,
    prefetched,
    training_batch,
)
from scllm.train.checkpoint import (
    CHECKPOINT,
    RunState,
    identity,
    non_finite,
    nothing_to_do,
    resume_point,
    rng_state,
    run_args,
    summary,
    write_outputs,
    write_run_files,
)
from scllm.train.distributed import (
    PREEMPTED_EXIT_CODE,
    Environment,
    TrainingPreempted,
    all_reduce,
)
from scllm.train.objectives import objective, validation_loss
from scllm.train.optim import model_and_optimizer


def pretrain(
    manifest_path,
    out_dir,
    model_cfg: dict | None = None,
    train_cfg: dict | None = None,
    log: logging.Logger | None = None,
) -> dict:
    """Pretrain on the shards of ``manifest_path`` and write the model and metrics to ``out_dir``.

    Resumes from ``out_dir``'s last_checkpoint.pt when it was written with the same settings
    (otherwise starts afresh, clearing the earlier outputs); a run already complete, or already
    at max_steps, does nothing but rewrite missing outputs.

    Parameters
    ----------
    manifest_path : str or Path
        The shards' manifest.json (vocab.json and genes.tsv beside it).
    out_dir : str or Path
        The model folder: last_checkpoint.pt, best_model.pt, args.json, vocab.json, genes.tsv,
        metrics.tsv, epochs.tsv and loss_curve.png.
    model_cfg : dict, optional
        The ``model`` section (``ModelConfig``); the vocabulary and the token values come from
        the shards. None or missing keys: the defaults.
    train_cfg : dict, optional
        The ``train`` section (``TrainConfig``). None or missing keys: the defaults.
    log : logging.Logger, optional
        Where to log; None: the "scllm" logger.

    Returns
    -------
    dict
        A summary: global_step, epochs_done, best_val_loss, done (False when max_steps
        stopped it).

    Raises
    ------
    ValueError
        An unknown or invalid setting, no validation cells, or too few training cells for one
        batch per process.
    CorruptArtifactError
        The vocabulary or a shard does not match the manifest.
    RuntimeError
        ``train.device`` is "cuda" but no CUDA device is visible.
    NonFiniteLossError
        The loss or the weights became NaN or infinite (a RuntimeError); the last good
        checkpoint is kept.
    TrainingPreempted
        SIGTERM or SIGUSR1 arrived: a checkpoint of the current step was written; rerun to
        resume (its ``exit_code`` asks for a requeue).
    """
    log = log or logging.getLogger("scllm")
    cfg = TrainConfig.from_dict(train_cfg)
    out, manifest_path = Path(out_dir), Path(manifest_path)
    env = Environment.start(cfg)
    try:
        data = TrainingData.load(manifest_path, cfg, env)
        mcfg = ModelConfig.from_dict(model_cfg, data.manifest)
        args = run_args(mcfg, cfg, data, out, env.world_size)
        ckpt = resume_point(out, args, env, log)
        if ckpt is not None and nothing_to_do(ckpt, cfg, out, args, data, env, log):
            return summary(ckpt)
        training = _Training(cfg, mcfg, data, env, out, args, ckpt, log)
        training.announce()
        return training.run()
    finally:
        env.close()


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


class _Training:
    """One run's model, optimizer and state, and the steps of the training loop."""

    def __init__(self, cfg, mcfg, data, env, out, args, ckpt, log):
        self.cfg, self.mcfg, self.data, self.env = cfg, mcfg, data, env
        self.out, self.args, self.log = out, args, log
        self.raw_model, self.optimizer, self.scheduler, self.state = model_and_optimizer(
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
        self.view = contrastive_view(cfg.contrastive_view, cfg.contrastive_view_genes, mcfg.n_bins)
        self.peak = peak_flops(env.device) if env.use_bf16 else None
        self.window = _Window(env.device)
        # Time left at this process's rate, validation and checkpoints included.
        self.progress = Progress(self.state.global_step, data.total_steps)
        # sums this epoch: objective, expression, GEPC, contrastive terms; steps
        self.epoch_loss = torch.zeros(5, dtype=torch.float64, device=env.device)

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
        write_run_files(self.out, self.args, data.shard_dir)

    # --- the epoch loop ------------------------------------------------------------------------

    def run(self) -> dict:
        for epoch in range(self.state.epoch, self.cfg.epochs):
            if not self.train_epoch(epoch):  # max_steps reached
                return summary(self.state.as_dict())
            self.end_epoch(epoch)
        if not self.state.done:  # only with epochs == 0
            self.state.done = True
            self.save_checkpoint(plot=True)
        return summary(self.state.as_dict())

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
            derived_seed(cfg.seed, 1, epoch, b * env.world_size + env.rank)
        )
        cells = self.data.train_ds.cells(batches[b])
        return training_batch(
            cells,
            self.mcfg.pad_id,
            cfg.mask_ratios,
            gen,
            env.device.type == "cuda",
            self.views,
            self.view,
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
        terms = [losses[i].detach().double() for i in (0, 1, 2, 4)]  # ECS is off by default
        self.epoch_loss += torch.stack([*terms, one])

    def log_window(self, epoch: int, lr: float) -> None:
        """Append a metrics.tsv row (means over the window, all processes) and log it."""
        env, window, step = self.env, self.window, self.state.global_step
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        seconds = window.seconds()
        sums = torch.cat([window.loss, torch.as_tensor(window.counts, device=env.device)])
        totals = all_reduce(sums, env.world_size).tolist()
        if not math.isfinite(totals[0]):
            raise non_finite(step, epoch + 1, self.last_good_step, self.out / CHECKPOINT)
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
                "epoch %d/%d step %d/%d loss %.2f = %s; lr %.2e %.0f cells/s %.0f tokens/s%s; %s",
                epoch + 1,
                self.cfg.epochs,
                step,
                self.data.total_steps,
                mean[0],
                objective_terms(
                    self.cfg, mean[1], mean[2], row["ecs_loss"], row["contrastive_loss"]
                ),
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
        val = validation_loss(self.raw_model, self.data, self.cfg, env)
        self.ensure_finite(val["val_loss"])
        train_loss = state.epoch_loss_sum / max(state.epoch_steps, 1)
        expr, gepc, contrastive = (v / max(state.epoch_terms[3], 1) for v in state.epoch_terms[:3])
        state.epochs.append(
            {
                "epoch": epoch + 1,
                "step": state.global_step,
                "train_loss": train_loss,
                **val,
                "train_expr_mse": expr,
                "train_gepc_mse": gepc,
                "train_contrastive": contrastive if self.views > 1 else None,
            }
        )
        improved = val["val_loss"] < state.best_val_loss
        if improved:
            self.keep_best(val["val_loss"])
        if env.is_main:
            self.log.info(
                "epoch %d/%d done: train loss %.2f = %s; validation loss %.2f = masked MSE of "
                "the expression head %.2f (mean-bin baseline %.2f) + of the GEPC head %.2f%s; %s",
                epoch + 1,
                self.cfg.epochs,
                train_loss,
                objective_terms(self.cfg, expr, gepc, None, contrastive),
                val["val_loss"],
                val["val_expr_mse"],
                val["val_mean_bin_baseline_mse"],
                val["val_gepc_mse"],
                ", new best" if improved else "",
                self.progress.text(state.global_step),
            )
        state.epoch, state.batch, state.epoch_loss_sum, state.epoch_steps = epoch + 1, 0, 0.0, 0
        state.epoch_terms = [0.0, 0.0, 0.0, 0]
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
            raise non_finite(
                self.state.global_step,
                self.state.epoch + 1,
                self.last_good_step,
                self.out / CHECKPOINT,
            )

    def save_checkpoint(self, plot: bool) -> None:
        self.ensure_finite()
        env = self.env
        rng = rng_state(env.device)
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
                "args": identity(self.args),
                **self.state.as_dict(),
            }
            with atomic_path(self.out / CHECKPOINT) as tmp:
                torch.save(ckpt, tmp)
            write_outputs(self.out, ckpt, self.args, self.data.shard_dir, plot)
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


def _fold_epoch_loss(state: RunState, epoch_loss: torch.Tensor, world_size: int) -> None:
    """Move this segment's loss sums (objective, terms, steps) into ``state`` (so they survive
    a checkpoint)."""
    total, *terms, steps = all_reduce(epoch_loss.clone(), world_size).tolist()
    steps = int(round(steps / world_size))
    state.epoch_loss_sum += total / world_size
    state.epoch_steps += steps
    sums = [old + new / world_size for old, new in zip(state.epoch_terms[:3], terms)]
    state.epoch_terms = [*sums, state.epoch_terms[3] + steps]
    epoch_loss.zero_()


def objective_terms(cfg: TrainConfig, expr: float, gepc: float, ecs, contrastive) -> str:
    """The training objective's terms as the log lines name them, each with its weight.

    Parameters
    ----------
    cfg : TrainConfig
        The weights. The GEPC term is always named; the ECS, InfoNCE and VICReg terms only
        with a weight other than 0 (a term not measured is named "(not logged)").
    expr, gepc : float
        The expression head's masked MSE and the GEPC head's MSE (on train.gepc_targets).
    ecs, contrastive : float or None
        The ECS loss and the contrastive InfoNCE, None where not measured (ECS is then named
        "(not logged)"; InfoNCE left out).

    Returns
    -------
    str
        E.g. "expression MSE 115.16 + 1 x GEPC MSE 53.25 + 10 x InfoNCE 0.985".
    """
    text = f"expression MSE {expr:.2f} + {cfg.gepc_weight:g} x GEPC MSE {gepc:.2f}"
    if cfg.ecs_weight:  # the epoch line does not keep ECS: named, so the sum is not a puzzle
        text += f" + {cfg.ecs_weight:g} x ECS " + ("(not logged)" if ecs is None else f"{ecs:.3f}")
    if cfg.contrastive_weight and contrastive is not None:
        text += f" + {cfg.contrastive_weight:g} x InfoNCE {contrastive:.3f}"
    if cfg.vc_weight:
        text += f" + {cfg.vc_weight:g} x VICReg (not logged)"
    return text
