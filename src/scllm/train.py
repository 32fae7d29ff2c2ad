"""Pretraining loop: masked expression prediction with an scGPT-style encoder.

Read top to bottom: settings -> data -> model -> resume -> train/validate per epoch -> outputs.

Everything the run produces is derived from ``last_checkpoint.pt`` (weights, optimizer,
scheduler, RNG states, data position, metrics so far, best weights), so a killed job resumes
exactly where its last checkpoint left it, and a finished one is a no-op when rerun.
SIGTERM or SIGUSR1 (SLURM preemption or time limit) writes a checkpoint at the current step and
exits with PREEMPTED_EXIT_CODE; a NaN or infinite loss stops the run without overwriting the
last good checkpoint. Launch on several GPUs with ``torchrun --nproc_per_node N -m scllm.train ...``.
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
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from scllm.checks import load_torch_file
from scllm.data import (PROFILE_KEYS, TRAINING_BATCH_KEYS, LengthGroupedBatchSampler, ShardDataset, check_vocab, collate,
                        mask_values, prefetched, training_batch)
from scllm.errors import CorruptArtifactError
from scllm.io import Progress, atomic_path, remove_stale_temporaries, setup_logging, software_provenance
from scllm.model import (CellTransformer, ModelConfig, contrastive_loss, count_params_text, ecs_loss, masked_mse,
                         peak_flops, variance_covariance_loss)
from scllm.tokens import read_manifest

TRAIN_DEFAULTS = {
    "epochs": 6,
    "batch_size": 32,  # per process (GPU)
    "lr": 1e-4,
    "weight_decay": 0.01,
    "warmup_steps": 100,
    "grad_clip": 1.0,
    "mask_ratios": [0.25, 0.5, 0.75],
    # Objectives beyond the masked expression MSE (always on): weights 0 switch them off.
    "gepc_weight": 1.0,  # masked MSE of the GEPC head (predicts from the cell embedding)
    # Which genes GEPC predicts from the cell embedding: "masked" (scGPT: the masked tokens);
    # "masked+unexpressed" adds 0 for every vocabulary gene the cell does not express (they are
    # not tokens, so the embedding must record which genes are absent as well as present);
    # "all" predicts the whole vocabulary profile, visible tokens included.
    "gepc_targets": "masked",
    "ecs_weight": 0.0,  # scGPT's elastic cell similarity (scGPT uses 10 with threshold 0.8)
    "ecs_threshold": 0.8,
    # InfoNCE between two masked views of each cell, each keeping a random contrastive_view_genes
    # of its gene tokens (doubles the rows of a batch, not its tokens at 0.5).
    "contrastive_weight": 0.0,
    "contrastive_temperature": 0.1,
    "contrastive_view_genes": 0.5,  # fraction of a cell's gene tokens each view keeps
    "vc_weight": 0.0,  # VICReg's variance-covariance term on the cell embedding (0 = off)
    # Initial gene embeddings: "random" (normal, std 0.02) or "pca": the genes' loadings on the
    # principal axes of the training cells' bins (co-expressed genes start close together).
    "gene_emb_init": "random",
    "seed": 0,
    "checkpoint_every_steps": 200,
    "max_steps": None,  # stop (with a checkpoint) after this many global steps
    "bucket_size_batches": 100,
    "log_every_steps": 10,
    "compile": False,
    "amp": "auto",  # auto: bf16 autocast on CUDA, fp32 elsewhere; or "bf16" / "fp32"
    "num_threads": None,
    "device": "auto",  # auto: cuda if available; or "cpu" / "cuda"
}
GEPC_TARGETS = ("masked", "masked+unexpressed", "all")
# Settings that change how a run is operated but not its result: they may differ on resume.
OPERATIONAL_KEYS = {"max_steps", "checkpoint_every_steps", "log_every_steps", "compile", "num_threads"}
# Derived from the data, not settable in the model section.
DATA_MODEL_KEYS = ("vocab_size", "n_bins", "pad_id", "mask_value", "pad_value")

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "expr_mse", "mvc_mse", "ecs_loss", "contrastive_loss",
                  "cells_per_s", "tokens_per_s", "mfu"]
EPOCH_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "val_expr_mse", "val_mvc_mse", "val_mean_bin_baseline_mse"]
CHECKPOINT = "last_checkpoint.pt"
# Exit status after SIGTERM/SIGUSR1 with a checkpoint written: EX_TEMPFAIL ("try again later"),
# distinct from errors (1) and from being killed (128 + signal), so a job script can requeue.
PREEMPTED_EXIT_CODE = 75


class TrainingPreempted(RuntimeError):
    """SIGTERM or SIGUSR1 arrived; a checkpoint at the current step was written. Rerun to resume."""

    exit_code = PREEMPTED_EXIT_CODE


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite; nothing was saved after the last good state."""


def pretrain(manifest_path, out_dir, model_cfg: dict | None = None, train_cfg: dict | None = None,
             log: logging.Logger | None = None) -> dict:
    """Pretrain on the shards of ``manifest_path`` and write the model and metrics to ``out_dir``.

    Returns a summary: global_step, epochs_done, best_val_loss, done (False when max_steps stopped it).
    """
    log = log or logging.getLogger("scllm")
    cfg = _train_settings(train_cfg)
    out, manifest_path = Path(out_dir), Path(manifest_path)

    # --- environment: processes, device, precision -------------------------------------------
    rank, world_size, device, own_group = _setup_distributed(cfg["device"])
    is_main = rank == 0
    threads = torch.get_num_threads()
    signals = _StopSignals().install()
    try:
        if cfg["num_threads"]:
            torch.set_num_threads(int(cfg["num_threads"]))
        use_bf16 = cfg["amp"] == "bf16" or (
            cfg["amp"] == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

        # --- data ----------------------------------------------------------------------------
        manifest = read_manifest(manifest_path)
        vocab_path = manifest_path.parent / "vocab.json"
        check_vocab(manifest, vocab_path, manifest_path)
        train_ds, val_ds = ShardDataset(manifest_path, "train"), ShardDataset(manifest_path, "validation")
        if len(val_ds) == 0:
            raise ValueError(f"{manifest_path} has no validation cells; pretrain needs them to choose best_model.pt: "
                             "raise split.validation_fraction or sample more cells")
        train_sampler = LengthGroupedBatchSampler(train_ds.lengths, cfg["batch_size"], cfg["seed"],
                                                  cfg["bucket_size_batches"], rank, world_size)
        # Validation: the same batches every epoch (no shuffle), this rank's share of them.
        val_batches = LengthGroupedBatchSampler(val_ds.lengths, cfg["batch_size"], cfg["seed"],
                                                cfg["bucket_size_batches"], shuffle=False).all_batches(0)
        val_batches = list(enumerate(val_batches))[rank::world_size]
        steps_per_epoch = len(train_sampler)
        if steps_per_epoch == 0:
            raise ValueError(f"{len(train_ds)} training cells make no batch for {world_size} process(es)")
        total_steps = cfg["epochs"] * steps_per_epoch

        # --- model config and the run's identity (args.json) --------------------------------
        mcfg = _model_config(model_cfg, manifest)
        args = {
            "model": asdict(mcfg),
            "train": cfg,
            "data": {
                # relative to the model directory: a results folder moved or copied whole stays valid
                "manifest": os.path.relpath(manifest_path.resolve(), out.resolve()),
                "vocab_sha256": manifest["vocab_sha256"],
                # The cells themselves: other shards (new split, bins, cells) must not resume this run.
                "shards_sha256": _shards_fingerprint(manifest_path, manifest),
                "binning": manifest.get("binning"),
                "n_genes": manifest["n_genes"],
                "max_seq_len": manifest.get("max_seq_len"),
                "n_train_cells": len(train_ds),
                "n_validation_cells": len(val_ds),
            },
            "world_size": world_size,
            "provenance": software_provenance(),  # not part of the run's identity: resume ignores it
        }

        # --- resume ----------------------------------------------------------------------------
        if is_main:
            for path in remove_stale_temporaries(out):
                log.info("removed %s, a temporary left by a killed run", path)
        ckpt = _load_checkpoint(out / CHECKPOINT, args, log)
        if ckpt is None and is_main:  # a fresh start: no output of an earlier run may pair with this one
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
        if ckpt is not None and ckpt["done"]:
            if is_main and not all((out / name).exists() for name in OUTPUTS):
                log.info("run in %s is complete; rewriting missing outputs from %s", out, CHECKPOINT)
                _write_outputs(out, ckpt, args, manifest_path.parent, plot=False)
            else:
                log.info("run in %s is already complete (%d steps); nothing to do", out, ckpt["global_step"])
            return _summary(ckpt)
        if ckpt is not None and cfg["max_steps"] is not None and ckpt["global_step"] >= cfg["max_steps"]:
            log.info("checkpoint is at step %d >= max_steps=%d; nothing to do", ckpt["global_step"], cfg["max_steps"])
            return _summary(ckpt)

        torch.manual_seed(cfg["seed"])  # same initial weights on every rank
        raw_model = CellTransformer(mcfg)
        if cfg["gene_emb_init"] == "pca" and ckpt is None:
            init_gene_embeddings_from_pca(raw_model, train_ds, cfg["seed"], log if is_main else None)
        raw_model = raw_model.to(device)
        optimizer = _make_optimizer(raw_model, cfg, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg["warmup_steps"], total_steps))
        torch.manual_seed(_seed(cfg["seed"], 3, rank))  # dropout RNG: different per rank
        state = {"epoch": 0, "batch": 0, "global_step": 0, "best_val_loss": math.inf, "best_model": None,
                 "metrics": [], "epochs": [], "epoch_loss_sum": 0.0, "epoch_steps": 0, "done": False}
        if ckpt is not None:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"][rank], device)
            state = {key: ckpt[key] for key in state}
            log.info("resuming from %s: epoch %d, batch %d, step %d", out / CHECKPOINT,
                     state["epoch"] + 1, state["batch"], state["global_step"])
        model = torch.compile(raw_model, dynamic=True) if cfg["compile"] else raw_model
        if world_size > 1:
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        if is_main:
            log.info("device %s%s; %s; attention: torch scaled_dot_product_attention; %d process(es)",
                     device, f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "",
                     "bf16 autocast" if use_bf16 else "fp32", world_size)
            log.info("model: %s parameters, %d layers, d_model %d; %d train / %d validation cells; "
                     "%d steps per epoch, %d in total", count_params_text(raw_model), mcfg.n_layers,
                     mcfg.d_model, len(train_ds), len(val_ds), steps_per_epoch, total_steps)
            _write_json(out / "args.json", args)
            _copy(vocab_path, out / "vocab.json")
            _copy(manifest_path.parent / "genes.tsv", out / "genes.tsv")

        last_good_step = ckpt["global_step"] if ckpt is not None else None

        def ensure_finite(*losses: float) -> None:
            """Never save a non-finite state: stop, leaving the last good checkpoint in place."""
            finite = all(math.isfinite(v) for v in (state["epoch_loss_sum"], *losses))
            if finite:  # a step with a finite loss can still leave NaN weights (an infinite gradient)
                finite = bool(torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all())
            if not finite:
                raise _non_finite(state["global_step"], state["epoch"] + 1, last_good_step, out / CHECKPOINT)

        def save_checkpoint(plot: bool):
            nonlocal last_good_step
            ensure_finite()
            rng = _rng_state(device)
            rngs = [None] * world_size
            if world_size > 1:
                dist.all_gather_object(rngs, rng)
            else:
                rngs = [rng]
            if is_main:
                ckpt = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": rngs, "args": _identity(args), **state}
                with atomic_path(out / CHECKPOINT) as tmp:
                    torch.save(ckpt, tmp)
                _write_outputs(out, ckpt, args, manifest_path.parent, plot)
            if world_size > 1:  # no process stops (preemption, max_steps, the end) before the checkpoint is written
                dist.barrier()
            last_good_step = state["global_step"]

        def preempted(where: str) -> TrainingPreempted:
            message = (f"stopped by {signals.received or 'a signal on another process'} {where}: checkpoint at step "
                       f"{state['global_step']} saved to {out / CHECKPOINT}; exiting with code {PREEMPTED_EXIT_CODE} "
                       "so the job can be requeued. Rerun to resume.")
            log.warning("%s", message)
            return TrainingPreempted(message)

        # --- training ------------------------------------------------------------------------
        peak = peak_flops(device) if use_bf16 else None
        ratios, seed, pad_id = cfg["mask_ratios"], cfg["seed"], mcfg.pad_id
        pin_memory = device.type == "cuda"
        views = 2 if cfg["contrastive_weight"] else 1
        # Sums since the last log line: losses stay on the device (no sync per step).
        window_loss = torch.zeros(5, dtype=torch.float64, device=device)  # loss, expr, mvc, ecs, contrastive
        window_steps, window_counts, window_start, paused = 0, np.zeros(3), time.perf_counter(), 0.0
        # Time left at this process's rate, validation and checkpoints included.
        progress = Progress(state["global_step"], total_steps)
        epoch_loss = torch.zeros(2, dtype=torch.float64, device=device)  # sum, steps (this segment)
        for epoch in range(state["epoch"], cfg["epochs"]):
            model.train()
            batches = train_sampler.epoch_batches(epoch)

            def make_batch(b: int, epoch=epoch, batches=batches) -> dict:
                # Masks depend only on (seed, epoch, batch): identical after a resume.
                gen = torch.Generator().manual_seed(_seed(seed, 1, epoch, b * world_size + rank))
                return training_batch(train_ds.cells(batches[b]), pad_id, ratios, gen, pin_memory, views,
                                      cfg["contrastive_view_genes"])

            # The next batches are collated and masked in a background thread during this step.
            for b, batch in enumerate(prefetched(make_batch, range(state["batch"], len(batches))), state["batch"]):
                gene_ids, values, padding_mask, masked, mask = (
                    batch[key].to(device, non_blocking=True) for key in TRAINING_BATCH_KEYS)
                profile = (tuple(batch[key].to(device, non_blocking=True) for key in PROFILE_KEYS)
                           if PROFILE_KEYS[0] in batch else None)

                with autocast:
                    pred = model(gene_ids, masked, padding_mask, all_genes=cfg["gepc_targets"] != "masked")
                losses = objective(pred, gene_ids, values, mask, cfg, views, profile)
                loss = losses[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()

                state["global_step"] += 1
                state["batch"] = b + 1
                lengths = batch["lengths"]
                flops = float((lengths * raw_model.estimate_flops_per_token(lengths)).sum())
                window_loss += torch.stack(losses).detach().double()
                # cells (each counted once, whatever the views), real tokens, useful FLOPs
                window_counts += (len(lengths) // views, lengths.sum(), flops)
                epoch_loss += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
                window_steps += 1
                step = state["global_step"]

                if step % cfg["log_every_steps"] == 0:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    seconds = max(time.perf_counter() - window_start - paused, 1e-9)
                    sums = torch.cat([window_loss, torch.as_tensor(window_counts, device=device)])
                    totals = _all_reduce(sums, world_size).tolist()
                    if not math.isfinite(totals[0]):
                        raise _non_finite(step, epoch + 1, last_good_step, out / CHECKPOINT)
                    mean = [v / (window_steps * world_size) for v in totals[:5]]
                    row = {"epoch": epoch + 1, "step": step, "lr": lr,
                           "train_loss": mean[0], "expr_mse": mean[1], "mvc_mse": mean[2],
                           "ecs_loss": mean[3] if cfg["ecs_weight"] else None,
                           "contrastive_loss": mean[4] if views > 1 else None,
                           "cells_per_s": totals[5] / seconds, "tokens_per_s": totals[6] / seconds,
                           "mfu": totals[7] / seconds / (peak * world_size) if peak else None}
                    state["metrics"].append(row)
                    if is_main:
                        log.info("epoch %d/%d step %d/%d loss %.2f (expr %.2f, gepc %.2f) lr %.2e %.0f cells/s "
                                 "%.0f tokens/s%s; %s", epoch + 1, cfg["epochs"], step, total_steps, mean[0], mean[1],
                                 mean[2], row["lr"], row["cells_per_s"], row["tokens_per_s"],
                                 f" mfu {row['mfu']:.1%}" if peak else "", progress.text(step))
                    window_loss.zero_()
                    window_steps, window_counts, window_start, paused = 0, np.zeros(3), time.perf_counter(), 0.0

                stop = cfg["max_steps"] is not None and step >= cfg["max_steps"]
                # A signal is acted on after the step it arrived in (with several processes, at the
                # next log step, where they agree on it: all must checkpoint the same step).
                preempt = (world_size == 1 or step % cfg["log_every_steps"] == 0) and signals.agreed(world_size, device)
                if stop or preempt or step % cfg["checkpoint_every_steps"] == 0:
                    t0 = time.perf_counter()
                    _fold_epoch_loss(state, epoch_loss, world_size)
                    save_checkpoint(plot=stop)
                    paused += time.perf_counter() - t0
                if preempt:
                    raise preempted(f"in epoch {epoch + 1}, batch {b + 1}/{len(batches)}")
                if stop:
                    log.info("stopping at max_steps=%d (epoch %d, batch %d/%d); rerun to resume", step,
                             epoch + 1, b + 1, len(batches))
                    return _summary(state)

            # --- validation, best model, end-of-epoch checkpoint ------------------------------
            t0 = time.perf_counter()
            _fold_epoch_loss(state, epoch_loss, world_size)
            val = evaluate(raw_model, val_ds, val_batches, pad_id, ratios, seed, device, autocast, world_size)
            ensure_finite(val["val_loss"])
            train_loss = state["epoch_loss_sum"] / max(state["epoch_steps"], 1)
            state["epochs"].append({"epoch": epoch + 1, "step": state["global_step"], "train_loss": train_loss, **val})
            improved = val["val_loss"] < state["best_val_loss"]
            if improved:
                state["best_val_loss"] = val["val_loss"]
                state["best_model"] = {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()}
                if is_main:
                    with atomic_path(out / "best_model.pt") as tmp:
                        torch.save(state["best_model"], tmp)
            if is_main:
                log.info("epoch %d/%d done: train loss %.2f, validation loss %.2f (expression MSE %.2f vs "
                         "mean-bin baseline %.2f)%s; %s", epoch + 1, cfg["epochs"], train_loss, val["val_loss"],
                         val["val_expr_mse"], val["val_mean_bin_baseline_mse"], ", new best" if improved else "",
                         progress.text(state["global_step"]))
            state.update(epoch=epoch + 1, batch=0, epoch_loss_sum=0.0, epoch_steps=0,
                         done=epoch + 1 == cfg["epochs"])
            save_checkpoint(plot=True)
            paused += time.perf_counter() - t0
            if not state["done"] and signals.agreed(world_size, device):
                raise preempted(f"at the end of epoch {epoch + 1}")
        if not state["done"]:  # only with epochs == 0
            state["done"] = True
            save_checkpoint(plot=True)
        return _summary(state)
    finally:
        signals.restore()
        torch.set_num_threads(threads)
        if own_group:
            dist.destroy_process_group()


def init_gene_embeddings_from_pca(model: CellTransformer, cells, seed: int, log=None, max_cells: int = 20_000):
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
    k = min(d, len(singular))
    loadings = axes[:k].T * (singular[:k] / singular[0])  # [n_genes, k]
    loadings *= 0.02 / max(float(loadings.std()), 1e-12)
    with torch.no_grad():
        model.gene_emb.weight[:n_genes] = 0.0
        model.gene_emb.weight[:n_genes, :k] = torch.from_numpy(loadings)
    if log is not None:
        explained = float((singular[:k] ** 2).sum() / (singular ** 2).sum())
        log.info("gene embeddings: loadings on the top %d principal axes of %d cells' bins (%.0f%% of their "
                 "variance)", k, len(rows), 100 * explained)


def objective(pred: dict, gene_ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, cfg: dict,
              views: int = 1, profile: tuple | None = None) -> list:
    """[total loss, expression MSE, GEPC MSE, ECS loss, contrastive loss] of one training batch;
    the total weighs each term by its ``*_weight`` setting (terms with weight 0 are not computed
    and read 0). With ``views`` > 1 the batch holds that many masked views of its cells;
    ``profile`` (gene ids, values) holds the whole cells behind the rows (default: the rows)."""
    zero = torch.zeros((), device=values.device)
    expr = masked_mse(pred["expr_pred"], values, mask)
    if cfg["gepc_targets"] != "masked":
        gepc = gepc_profile_mse(pred["gepc_all_pred"], gene_ids, values, mask, cfg["gepc_targets"] == "all",
                                profile)
    else:
        gepc = masked_mse(pred["mvc_pred"], values, mask)
    ecs = ecs_loss(pred["cell_emb"], cfg["ecs_threshold"]) if cfg["ecs_weight"] else zero
    contrastive = (contrastive_loss(pred.get("contrastive_z", pred["cell_emb"]), views, cfg["contrastive_temperature"])
                   if cfg["contrastive_weight"] else zero)
    total = expr + cfg["gepc_weight"] * gepc + cfg["ecs_weight"] * ecs + cfg["contrastive_weight"] * contrastive
    if cfg["vc_weight"]:
        total = total + cfg["vc_weight"] * variance_covariance_loss(pred["cell_emb"])
    return [total, expr, gepc, ecs, contrastive]


def gepc_profile_mse(all_genes_pred, gene_ids, values, mask, visible_too: bool = False,
                     profile: tuple | None = None) -> torch.Tensor:
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
        1, profile_ids, profile_values.float().clamp(min=0))
    visible = torch.zeros(rows, vocab_size, dtype=torch.bool, device=values.device).scatter(1, gene_ids, ~mask)
    scored = torch.ones_like(visible) if visible_too else ~visible
    return masked_mse(all_genes_pred, target[:, :n_genes], scored[:, :n_genes])


@torch.no_grad()
def evaluate(model, dataset, batches, pad_id, ratios, seed, device, autocast=nullcontext(), world_size=1) -> dict:
    """Masked MSE over the validation cells with fixed masks: batch i is masked at ratio
    ``ratios[i % len(ratios)]`` with a generator seeded by (seed, i), so every epoch sees the same.

    Baseline: each cell's masked tokens predicted by the mean bin of its unmasked gene tokens
    (what the model sees); a cell with none left visible falls back to the batch's visible mean.
    All MSEs are token-weighted over every masked position of the split.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # expr SE, mvc SE, baseline SE, n masked
    for i, idx in batches:
        batch = collate(dataset.cells(idx), pad_id)
        gen = torch.Generator().manual_seed(_seed(seed, 2, i))
        masked, mask = mask_values(batch["values"], batch["padding_mask"], ratios[i % len(ratios)], gen)
        visible = ~batch["padding_mask"] & ~mask
        visible[:, 0] = False
        target = batch["values"].double()
        fallback = target[visible].mean() if visible.any() else torch.zeros((), dtype=torch.float64)
        per_cell = (target * visible).sum(1) / visible.sum(1).clamp(min=1)
        per_cell = torch.where(visible.any(1), per_cell, fallback)
        baseline_se = ((per_cell[:, None] - target) ** 2)[mask].sum()
        with autocast:
            pred = model(*(t.to(device) for t in (batch["gene_ids"], masked, batch["padding_mask"])))
        target, mask = target.to(device), mask.to(device)
        sums += torch.stack([((pred["expr_pred"].double() - target) ** 2)[mask].sum(),
                             ((pred["mvc_pred"].double() - target) ** 2)[mask].sum(),
                             baseline_se.to(device), mask.sum().double()])
    expr, mvc, baseline, n = _all_reduce(sums, world_size).tolist()
    model.train(was_training)
    n = max(n, 1.0)
    return {"val_loss": (expr + mvc) / n, "val_expr_mse": expr / n, "val_mvc_mse": mvc / n,
            "val_mean_bin_baseline_mse": baseline / n}


# --- settings ---------------------------------------------------------------------------------

def _train_settings(train_cfg: dict | None) -> dict:
    unknown = set(train_cfg or {}) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown train settings {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    cfg = {**TRAIN_DEFAULTS, **(train_cfg or {})}
    if cfg["gene_emb_init"] not in ("random", "pca"):
        raise ValueError(f"train.gene_emb_init must be 'random' or 'pca', not {cfg['gene_emb_init']!r}")
    for key in ("gepc_weight", "ecs_weight", "contrastive_weight", "vc_weight"):
        if not cfg[key] >= 0:
            raise ValueError(f"train.{key} must be >= 0 (0 switches the term off), not {cfg[key]!r}")
    if not cfg["contrastive_temperature"] > 0:
        raise ValueError(f"train.contrastive_temperature must be > 0, not {cfg['contrastive_temperature']!r}")
    if not 0 < cfg["contrastive_view_genes"] <= 1:
        raise ValueError(f"train.contrastive_view_genes must be in (0, 1], not {cfg['contrastive_view_genes']!r}")
    if cfg["gepc_targets"] not in GEPC_TARGETS:
        raise ValueError(f"train.gepc_targets must be one of {GEPC_TARGETS}, not {cfg['gepc_targets']!r}")
    if cfg["amp"] not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.amp must be auto, bf16 or fp32, not {cfg['amp']!r}")
    if not cfg["mask_ratios"] or not all(0 < r < 1 for r in cfg["mask_ratios"]):
        raise ValueError(f"train.mask_ratios must be a non-empty list of values in (0, 1), not {cfg['mask_ratios']}")
    cfg["mask_ratios"] = [float(r) for r in cfg["mask_ratios"]]
    return cfg


def _model_config(model_cfg: dict | None, manifest: dict) -> ModelConfig:
    model_cfg = dict(model_cfg or {})
    known = {f.name for f in fields(ModelConfig)} - set(DATA_MODEL_KEYS)
    unknown = set(model_cfg) - known - set(DATA_MODEL_KEYS)
    if unknown:
        raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
    data = {"vocab_size": manifest["vocab_size"], "n_bins": manifest["n_bins"], "pad_id": manifest["pad_id"],
            "mask_value": manifest.get("mask_value", -1), "pad_value": manifest.get("pad_value", -2)}
    for key in DATA_MODEL_KEYS:
        if key in model_cfg and model_cfg.pop(key) != data[key]:
            raise ValueError(f"model.{key} is set by the shards ({data[key]}); remove it from the model settings")
    return ModelConfig(**data, **model_cfg)


def _shards_fingerprint(manifest_path: Path, manifest: dict) -> str:
    """The data a checkpoint was trained on: a sha256 over the shards' own sha256s, which
    ShardDataset has just checked against the files (so the bytes are not hashed twice)."""
    listed = [(split, shard["path"], shard["sha256"]) for split in sorted(manifest["splits"])
              for shard in manifest["splits"][split]]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def _identity(args: dict) -> dict:
    """What must match for a checkpoint to be resumed: everything but operational settings."""
    train = {k: v for k, v in args["train"].items() if k not in OPERATIONAL_KEYS}
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
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.999), fused=device.type == "cuda")


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


# --- processes and devices ----------------------------------------------------------------------

def _setup_distributed(device_setting: str):
    """(rank, world_size, device, whether we created the process group). torchrun sets WORLD_SIZE."""
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
        "process %d of %d on %s (node %s, local rank %d), device %s", dist.get_rank(), dist.get_world_size(),
        socket.gethostname(), os.environ.get("GROUP_RANK", "?"), local_rank, device)
    return dist.get_rank(), dist.get_world_size(), device, own


def _all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


def _fold_epoch_loss(state: dict, epoch_loss: torch.Tensor, world_size: int) -> None:
    """Move this segment's loss sums into ``state`` (so they survive a checkpoint)."""
    total, steps = _all_reduce(epoch_loss.clone(), world_size).tolist()
    state["epoch_loss_sum"] += total / world_size
    state["epoch_steps"] += int(round(steps / world_size))
    epoch_loss.zero_()


# --- checkpoints and RNG ---------------------------------------------------------------------------

def _rng_state(device) -> dict:
    """RNG states as tensors and plain types, so ``torch.load(weights_only=True)`` reads them."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "state": list(py_state), "gauss": gauss}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
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
        changed = sorted(f"{section}.{key}" for section in identity if isinstance(identity[section], dict)
                         for key in set(identity[section]) | set(old.get(section) or {})
                         if identity[section].get(key) != (old.get(section) or {}).get(key))
        changed += [s for s in identity if not isinstance(identity[s], dict) and identity[s] != old.get(s)]
        log.warning("%s belongs to a run with other settings (%s differ); starting from scratch and "
                    "overwriting it", path, ", ".join(changed) or "format")
        return None
    return ckpt


def _non_finite(step: int, epoch: int, last_good_step: int | None, checkpoint: Path) -> NonFiniteLossError:
    kept = (f"{checkpoint} keeps the last good state (step {last_good_step})" if last_good_step is not None
            else "no checkpoint had been written yet")
    return NonFiniteLossError(
        f"the training loss became NaN or infinite by step {step} (epoch {epoch}); stopped without saving "
        f"that state: {kept}, and best_model.pt holds only finite weights. Lower train.lr or raise "
        "train.warmup_steps (with bf16 autocast, try train.amp: fp32), then rerun: changed train settings "
        "start a fresh run."
    )


class _StopSignals:
    """SIGTERM and SIGUSR1 set a flag (they do not kill the process); the training loop then writes a
    checkpoint and stops. SLURM sends SIGTERM on preemption or cancellation, and SIGUSR1 ahead of the
    time limit when asked (``sbatch --signal=USR1@120``)."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def install(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python sets handlers there only
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
        """Whether to stop now; with several processes (a collective call) when any got a signal."""
        if world_size == 1:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=device)
        return bool(_all_reduce(flag, world_size).item())


def _summary(state: dict) -> dict:
    return {"global_step": state["global_step"], "epochs_done": state["epoch"],
            "best_val_loss": state["best_val_loss"], "done": state["done"]}


# --- outputs ----------------------------------------------------------------------------------------

OUTPUTS = ("best_model.pt", "args.json", "vocab.json", "metrics.tsv", "epochs.tsv", "loss_curve.png")


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
        ax1.plot([r["step"] for r in metrics], [r["train_loss"] for r in metrics], label="train loss (expr + GEPC)")
    if epochs:
        ax1.plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="validation loss")
        x = [r["epoch"] for r in epochs]
        ax2.plot(x, [r["val_expr_mse"] for r in epochs], "o-", label="model: expression MSE")
        ax2.plot(x, [r["val_mvc_mse"] for r in epochs], "^-", label="model: GEPC (cell embedding) MSE")
        ax2.plot(x, [r["val_mean_bin_baseline_mse"] for r in epochs], "s--", label="baseline: cell's mean bin")
    ax1.set(xlabel="step", ylabel="masked MSE", title="training")
    ax2.set(xlabel="epoch", ylabel="masked MSE (bins²)", title="validation")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# --- command line ------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the cell transformer on token shards.")
    parser.add_argument("--manifest", required=True, help="manifest.json written by tokenize_shards")
    parser.add_argument("--out", required=True, help="output directory (resumed if it holds a checkpoint)")
    parser.add_argument("--params", help='JSON file {"model": {...}, "train": {...}}')
    # --log-file too: torchrun's own parser rejects "--log" as an ambiguous prefix of its --log-dir.
    parser.add_argument("--log", "--log-file", dest="log", help="log file (rank 0); use --log-file under torchrun")
    args = parser.parse_args(argv)
    params = json.loads(Path(args.params).read_text()) if args.params else {}
    unknown = set(params) - {"model", "train"}
    if unknown:
        parser.error(f"{args.params}: unknown sections {sorted(unknown)}; expected 'model' and 'train'")
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # append: under torchrun the launching rule script has already written to this log
    log = setup_logging(args.log if rank == 0 else None, append=True)
    if world_size > 1:  # every rank logs to stderr, which the launcher gathers into the rule log: say whose line
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                                                       "%H:%M:%S"))
    try:
        pretrain(args.manifest, args.out, params.get("model"), params.get("train"), log=log)
    except TrainingPreempted:  # already logged; the exit status asks for a requeue
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
