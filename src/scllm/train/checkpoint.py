"""What a run leaves on disk and reads back: its identity (the settings and data a checkpoint
belongs to), ``last_checkpoint.pt`` with every RNG state, the metrics files and the loss curve,
and the trained model for inference (``load_model``).

Everything the run produces is derived from ``last_checkpoint.pt`` (weights, optimizer,
scheduler, RNG states, data position, metrics so far, best weights), so a killed job resumes
exactly where its last checkpoint left it, and a finished one is a no-op when rerun. Checkpoints
hold tensors and plain values only and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from scllm.checks import file_sha256, load_torch_file
from scllm.config import ModelConfig, TrainConfig
from scllm.errors import CorruptArtifactError
from scllm.files import atomic_path, remove_stale_temporaries, software_provenance
from scllm.model import CellTransformer
from scllm.tokens import read_json, read_vocab, vocab_sha256
from scllm.train.loss_curve import plot_loss_curve

if TYPE_CHECKING:
    from scllm.train.batches import TrainingData
    from scllm.train.distributed import Environment

# metrics.tsv (one row per log step) and epochs.tsv (one row per epoch, after validation).
METRIC_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "expr_mse", "gepc_mse", "ecs_loss", "contrastive_loss",
    "cells_per_s", "tokens_per_s", "mfu",
]  # fmt: skip
# train_loss is the objective (the weighted sum of the terms); the train_* terms after the
# validation columns are its parts' epoch means (added later: the earlier columns keep their
# places, so older readers still read them).
EPOCH_COLUMNS = [
    "epoch", "step", "train_loss", "val_loss", "val_expr_mse", "val_gepc_mse",
    "val_mean_bin_baseline_mse", "train_expr_mse", "train_gepc_mse", "train_contrastive",
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


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite.

    Nothing was saved after the last good state.
    """


@dataclass
class RunState:
    """Where the run is and what it has measured, saved in every checkpoint.

    Saved besides weights, optimizer, scheduler and RNG states, so a resumed run continues with
    the same values.

    Attributes
    ----------
    epoch : int
        Epochs completed.
    batch : int
        Batches of the current epoch done.
    global_step : int
        Optimizer steps taken.
    best_val_loss : float
        The lowest validation loss so far.
    best_model : dict or None
        Weights of the best epoch so far (CPU tensors).
    metrics, epochs : list of dict
        Rows of metrics.tsv and epochs.tsv.
    epoch_loss_sum : float
        This epoch's training loss, summed over checkpointed segments.
    epoch_steps : int
        Steps in that sum.
    done : bool
        Whether the run has finished.
    """

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch done
    global_step: int = 0
    best_val_loss: float = math.inf
    best_model: dict | None = None  # weights of the best epoch so far (CPU tensors)
    metrics: list = field(default_factory=list)  # rows of metrics.tsv
    epochs: list = field(default_factory=list)  # rows of epochs.tsv
    epoch_loss_sum: float = 0.0  # this epoch's training loss, summed over checkpointed segments
    epoch_steps: int = 0
    # this epoch's expression, GEPC and contrastive terms, summed the same way, and their steps
    epoch_terms: list = field(default_factory=lambda: [0.0, 0.0, 0.0, 0])
    done: bool = False

    def as_dict(self) -> dict:  # no deep copy (asdict would clone best_model's tensors)
        """The fields as a dict, without a deep copy (``asdict`` would clone best_model's tensors).

        Returns
        -------
        dict
        """
        return {f.name: getattr(self, f.name) for f in fields(self)}


def run_args(mcfg: ModelConfig, cfg: TrainConfig, data: TrainingData, out: Path, world_size):
    """args.json: the run's settings and data; all but provenance must match to resume.

    Parameters
    ----------
    mcfg : ModelConfig
        The model's settings.
    cfg : TrainConfig
        The training settings.
    data : TrainingData
        The run's data (manifest and its shards, cell counts).
    out : Path
        The run's folder (the manifest's path is recorded relative to it).
    world_size : int
        Processes training.

    Returns
    -------
    dict
        ``model``, ``train``, ``data``, ``world_size``, ``parent`` and ``provenance``.
    """
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
        # train.init_from: the model this run continues, by path and by its weights' digest
        "parent": parent_record(cfg.init_from) if cfg.init_from else None,
        "provenance": software_provenance(),  # not part of the run's identity: resume ignores it
    }


def parent_record(model_dir) -> dict:
    """Which model a run continues (train.init_from): its folder and what its files hold.

    Parameters
    ----------
    model_dir : str or Path
        The parent model's folder.

    Returns
    -------
    dict
        ``path``, ``best_model_sha256`` and ``vocab_sha256``.
    """
    model_dir = Path(model_dir)
    return {
        "path": str(model_dir),
        "best_model_sha256": file_sha256(model_dir / "best_model.pt"),
        "vocab_sha256": read_json(model_dir / "args.json")["data"]["vocab_sha256"],
    }


def _shards_fingerprint(manifest_path: Path, manifest: dict) -> str:
    """The data a checkpoint was trained on: a sha256 over the shards' own sha256s, which
    ShardDataset has just checked against the files (so the bytes are not hashed twice)."""
    listed = [
        (split, shard["path"], shard["sha256"])
        for split in sorted(manifest["splits"])
        for shard in manifest["splits"][split]
    ]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def identity(args: dict) -> dict:
    """What must match for a checkpoint to be resumed: everything but operational settings.

    The manifest's path and the parent's path are left out too (the same data or weights moved
    elsewhere are the same run).

    Parameters
    ----------
    args : dict
        A run's args.json (``run_args``).

    Returns
    -------
    dict
    """
    train = {k: v for k, v in args["train"].items() if k not in TrainConfig.OPERATIONAL}
    data = {k: v for k, v in args["data"].items() if k != "manifest"}
    return {
        "model": args["model"],
        "train": train,
        "data": data,
        "world_size": args["world_size"],
        # other parent weights make a new run; the same ones moved elsewhere do not
        "parent": {k: v for k, v in (args.get("parent") or {}).items() if k != "path"},
    }


def resume_point(out: Path, args: dict, env: Environment, log) -> dict | None:
    """The checkpoint to resume from, or None for a fresh start (which clears earlier outputs).

    A checkpoint of other settings, or a damaged one, is logged and gives a fresh start.
    Temporaries left by a killed run are removed first (rank 0).

    Parameters
    ----------
    out : Path
        The run's folder.
    args : dict
        This run's args.json (``run_args``).
    env : Environment
        The process's rank (only rank 0 removes files).
    log : logging.Logger
        Where to log.

    Returns
    -------
    dict or None
    """
    if env.is_main:
        for path in remove_stale_temporaries(out):
            log.info("removed %s, a temporary left by a killed run", path)
    ckpt = _load_checkpoint(out / CHECKPOINT, args, log)
    if ckpt is None and env.is_main:  # no output of an earlier run may pair with this one
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    return ckpt


def nothing_to_do(ckpt: dict, cfg: TrainConfig, out: Path, args, data, env, log) -> bool:
    """Whether the checkpoint is of a finished run, or one already at max_steps.

    A finished run's missing outputs are rewritten (rank 0).

    Parameters
    ----------
    ckpt : dict
        The checkpoint to resume.
    cfg : TrainConfig
        The training settings (max_steps).
    out : Path
        The run's folder.
    args : dict
        This run's args.json.
    data : TrainingData
        The run's data (its shards folder, for the vocabulary files).
    env : Environment
        The process's rank.
    log : logging.Logger
        Where to log.

    Returns
    -------
    bool
    """
    if ckpt["done"]:
        if env.is_main and not all((out / name).exists() for name in OUTPUTS):
            log.info("run in %s is complete; rewriting missing outputs from %s", out, CHECKPOINT)
            write_outputs(out, ckpt, args, data.shard_dir, plot=False)
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


def _load_checkpoint(path: Path, args: dict, log) -> dict | None:
    if not path.exists():
        return None
    try:
        ckpt = load_torch_file(path, "Starting from scratch; the file will be overwritten.")
    except CorruptArtifactError as err:  # a damaged (or foreign) file must not block a fresh start
        log.warning("%s", err)
        return None
    expected = identity(args)
    if _as_today(ckpt.get("args")) != expected:
        old = _as_today(ckpt.get("args")) or {}
        changed = sorted(
            f"{section}.{key}"
            for section in expected
            if isinstance(expected[section], dict)
            for key in set(expected[section]) | set(old.get(section) or {})
            if expected[section].get(key) != (old.get(section) or {}).get(key)
        )
        changed += [
            s for s in expected if not isinstance(expected[s], dict) and expected[s] != old.get(s)
        ]
        log.warning(
            "%s belongs to a run with other settings (%s differ); starting from scratch and "
            "overwriting it",
            path,
            ", ".join(changed) or "format",
        )
        return None
    # Written before the epoch's terms were recorded: this epoch's means start at the resume.
    ckpt.setdefault("epoch_terms", RunState().epoch_terms)
    # Written before the GEPC columns were renamed (mvc_mse -> gepc_mse): same values.
    for table in ("metrics", "epochs"):
        ckpt[table] = [
            {k.replace("mvc_mse", "gepc_mse"): v for k, v in row.items()} for row in ckpt[table]
        ]
    return ckpt


def _as_today(stored: dict | None) -> dict | None:
    """A checkpoint's run identity with what was added since it was written at its default
    (new train settings, no parent model), so that a run whose settings are all as before still
    resumes after an upgrade."""
    if not stored or "train" not in stored:
        return stored
    defaults = identity(
        {"train": TrainConfig().to_dict(), "data": {}, "model": {}, "world_size": 1}
    )
    return {
        **stored,
        "train": {**defaults["train"], **stored["train"]},
        "parent": stored.get("parent", {}),
    }


def rng_state(device) -> dict:
    """RNG states as tensors and plain types, so ``torch.load(weights_only=True)`` reads them.

    Parameters
    ----------
    device : torch.device
        The training device (a GPU's own state is included).

    Returns
    -------
    dict
        The torch, numpy, Python and (on a GPU) CUDA states.
    """
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


def set_rng_state(state: dict, device) -> None:
    """Restore the RNG states ``rng_state`` saved.

    Parameters
    ----------
    state : dict
        ``rng_state``'s dict.
    device : torch.device
        The training device (a GPU's state is restored where one was saved).
    """
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


def non_finite(
    step: int, epoch: int, last_good_step: int | None, checkpoint: Path
) -> NonFiniteLossError:
    """The error for a loss that became NaN or infinite, saying what was kept and what to change.

    Parameters
    ----------
    step, epoch : int
        Where it happened.
    last_good_step : int or None
        The step of the last checkpoint; None if none was written.
    checkpoint : Path
        The checkpoint's path.

    Returns
    -------
    NonFiniteLossError
    """
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


def summary(state: dict) -> dict:
    """What ``pretrain`` returns: how far the run got and its best validation loss.

    Parameters
    ----------
    state : dict
        A checkpoint, or ``RunState.as_dict()``.

    Returns
    -------
    dict
        ``global_step``, ``epochs_done``, ``best_val_loss`` and ``done``.
    """
    return {
        "global_step": state["global_step"],
        "epochs_done": state["epoch"],
        "best_val_loss": state["best_val_loss"],
        "done": state["done"],
    }


def write_outputs(out: Path, ckpt: dict, args: dict, shard_dir: Path, plot: bool) -> None:
    """Write the human-facing outputs from checkpoint contents (rank 0 only).

    Outputs deleted since the checkpoint (Snakemake removes the outputs of an incomplete job
    before rerunning it) are recreated, so the resumed run ends with all of them.

    Parameters
    ----------
    out : pathlib.Path
        The model folder.
    ckpt : dict
        The checkpoint's contents (metrics and epochs rows, best weights).
    args : dict
        The run's args.json (its ``train`` settings label the loss curves).
    shard_dir : pathlib.Path
        Where vocab.json and genes.tsv come from.
    plot : bool
        Redraw loss_curve.png even if it exists.
    """
    _write_tsv(out / "metrics.tsv", METRIC_COLUMNS, ckpt["metrics"])
    _write_tsv(out / "epochs.tsv", EPOCH_COLUMNS, ckpt["epochs"])
    if ckpt["best_model"] is not None and not (out / "best_model.pt").exists():
        with atomic_path(out / "best_model.pt") as tmp:
            torch.save(ckpt["best_model"], tmp)
    if plot or not (out / "loss_curve.png").exists():
        plot_loss_curve(
            out / "loss_curve.png", ckpt["metrics"], ckpt["epochs"], args.get("train", {})
        )
    if not (out / "args.json").exists():
        _write_json(out / "args.json", args)
    for name in ("vocab.json", "genes.tsv"):
        if not (out / name).exists():
            _copy(shard_dir / name, out / name)


def write_run_files(out: Path, args: dict, shard_dir: Path) -> None:
    """args.json and the vocabulary (vocab.json, genes.tsv) next to the model, as a run starts.

    Parameters
    ----------
    out : Path
        The run's folder.
    args : dict
        The run's args.json.
    shard_dir : Path
        The shards folder.
    """
    _write_json(out / "args.json", args)
    _copy(shard_dir / "vocab.json", out / "vocab.json")
    _copy(shard_dir / "genes.tsv", out / "genes.tsv")


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


# --- the trained model, for inference -----------------------------------------------------------


# How to get a good best_model.pt back (load_model's refusals).
MODEL_FIX = (
    "If the directory is this pipeline's pretrain output, delete best_model.pt and rerun "
    "snakemake: pretrain rewrites it from last_checkpoint.pt. Otherwise get the model directory "
    "again from a source you trust."
)


def load_model(model_dir, device="cpu") -> tuple[CellTransformer, dict[str, int], dict]:
    """A trained model, its vocabulary and its settings, from a pretrain output directory.

    Parameters
    ----------
    model_dir : str or Path
        The folder holding best_model.pt, args.json and vocab.json.
    device : str or torch.device, default "cpu"
        Where to put the model.

    Returns
    -------
    model : CellTransformer
        In eval mode, its ``vocab_sha256`` set.
    vocab : dict of str to int
    args : dict
        The run's args.json.

    Raises
    ------
    FileNotFoundError
        A file is missing.
    ValueError
        vocab.json is not the vocabulary args.json records.
    UnsafeFileError
        best_model.pt holds more than tensors and plain values.
    CorruptArtifactError
        A file is damaged, or the weights are not those of the model args.json describes.
    """
    model_dir = Path(model_dir)
    missing = _missing_model_files(model_dir)
    if missing:
        raise FileNotFoundError(_not_a_model_folder(model_dir, missing))
    args = read_json(model_dir / "args.json")
    vocab = read_vocab(model_dir / "vocab.json")
    expected = args.get("data", {}).get("vocab_sha256")
    if expected and vocab_sha256(vocab) != expected:
        raise ValueError(
            f"{model_dir}/vocab.json has sha256 {vocab_sha256(vocab)} but args.json records "
            f"{expected}; "
            "the directory mixes files of different runs"
        )
    model = CellTransformer(ModelConfig(**args["model"]))
    weights = load_torch_file(model_dir / "best_model.pt", MODEL_FIX)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:  # tensors, but not this model's
        raise CorruptArtifactError(
            f"{model_dir / 'best_model.pt'} does not hold the weights of the model "
            f"{model_dir / 'args.json'} describes ({str(err).splitlines()[0][:200]}). " + MODEL_FIX
        ) from None
    model.vocab_sha256 = vocab_sha256(vocab)
    return model.to(device).eval(), vocab, args


def _missing_model_files(folder: Path) -> list[str]:
    """The files ``load_model`` reads that ``folder`` lacks."""
    return [n for n in ("best_model.pt", "args.json", "vocab.json") if not (folder / n).exists()]


def _not_a_model_folder(model_dir: Path, missing: list[str]) -> str:
    """Why ``model_dir`` holds no model, and the folder meant when it is a run's folder."""
    if not model_dir.exists():
        return (
            f"{model_dir} does not exist; give the model folder of a finished pretrain run "
            "(results/<run>/model)"
        )
    if model_dir.is_file():  # a file of the model (results/demo/model/best_model.pt)
        return f"{model_dir} is a file; give the folder that holds the model, {model_dir.parent}"
    lacks = f"{model_dir} lacks {', '.join(missing)}"
    # A run's folder (results/<run>) holds the model one level down, in model/.
    if model_dir.is_dir() and not _missing_model_files(model_dir / "model"):
        return f"{lacks}; did you mean {model_dir / 'model'}?"
    return f"{lacks}; is it a finished pretrain output directory?"
