"""The model and its optimizer as a run starts: fresh (seeded weights, the same on every process;
gene embeddings at random or from PCA of the training cells; AdamW with linear warmup then a
cosine schedule), or as a checkpoint left them."""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import numpy as np
import torch

from scllm.errors import InputError
from scllm.model import CellTransformer
from scllm.train.batches import derived_seed
from scllm.train.checkpoint import RunState, load_model, set_rng_state


def model_and_optimizer(cfg, mcfg, data, env, ckpt, log, checkpoint_path):
    """Model, optimizer, scheduler and run state: fresh, or as the checkpoint left them.

    A fresh model is seeded (the same weights on every rank), from a parent's weights with
    ``train.init_from``, or with PCA gene embeddings (``train.gene_emb_init: pca``). The optimizer
    is AdamW (no decay on biases and LayerNorm gains), the schedule a linear warmup then a cosine
    to 0. Afterwards the dropout RNG is seeded per rank.

    Parameters
    ----------
    cfg : TrainConfig
        The training settings.
    mcfg : ModelConfig
        The model's settings.
    data : TrainingData
        The run's data (manifest, training cells, total steps).
    env : Environment
        The process's rank and device.
    ckpt : dict or None
        The checkpoint to resume (``resume_point``); None for a fresh start.
    log : logging.Logger
        Where to log.
    checkpoint_path : Path
        The checkpoint's path, for the log line.

    Returns
    -------
    model : CellTransformer
        On ``env.device``, not wrapped (no compile, no DDP).
    optimizer : torch.optim.AdamW
    scheduler : torch.optim.lr_scheduler.LambdaLR
    state : RunState

    Raises
    ------
    InputError
        ``train.init_from`` names a model of another shape or vocabulary, or PCA embeddings are
        asked for on identical cells.
    """
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    raw_model = CellTransformer(mcfg)
    if cfg.init_from and ckpt is None:  # continue a trained model: its weights, our optimizer
        load_parent_weights(raw_model, cfg.init_from, data.manifest["vocab_sha256"], log)
    elif cfg.gene_emb_init == "pca" and ckpt is None:
        init_gene_embeddings_from_pca(
            raw_model, data.train_ds, cfg.seed, log if env.is_main else None
        )
    raw_model = raw_model.to(env.device)
    optimizer = _make_optimizer(raw_model, cfg, env.device)
    lr_lambda = _lr_lambda(cfg.warmup_steps, data.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    torch.manual_seed(derived_seed(cfg.seed, 3, env.rank))  # dropout RNG: different per rank
    if ckpt is None:
        return raw_model, optimizer, scheduler, RunState()
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"][env.rank], env.device)
    state = RunState(**{f.name: ckpt[f.name] for f in fields(RunState)})
    log.info(
        "resuming from %s: epoch %d, batch %d, step %d",
        checkpoint_path,
        state.epoch + 1,
        state.batch,
        state.global_step,
    )
    return raw_model, optimizer, scheduler, state


# Model settings a continued model may change: regularisation, not the weights' shapes or use.
ADAPTABLE = ("dropout", "attn_dropout")


def load_parent_weights(model: CellTransformer, parent_dir, shards_vocab_sha256: str, log):
    """Start from a trained model's weights (train.init_from).

    Refused unless the model and the shards are the parent's shape and vocabulary; only the
    settings in ADAPTABLE (dropout) may differ.

    Parameters
    ----------
    model : CellTransformer
        The fresh model, loaded in place.
    parent_dir : str or Path
        The parent model's folder.
    shards_vocab_sha256 : str
        The vocabulary of this run's shards.
    log : logging.Logger
        Where to log.

    Raises
    ------
    InputError
        Another vocabulary or another model shape.
    """
    parent, _, args = load_model(parent_dir)
    if parent.vocab_sha256 != shards_vocab_sha256:
        raise InputError(
            f"train.init_from: {parent_dir} was trained on the vocabulary {parent.vocab_sha256}, "
            f"these shards use {shards_vocab_sha256}: a run that continues a model takes its "
            "vocabulary (the pipeline's select_hvg does so with train.init_from set); retokenize "
            "with it, or remove train.init_from"
        )
    ours, theirs = asdict(model.cfg), args["model"]
    differ = [
        f"model.{k}: {ours[k]!r} here, {theirs.get(k)!r} in {parent_dir}"
        for k in ours
        if k not in ADAPTABLE and ours[k] != theirs.get(k)
    ]
    if differ:
        raise InputError(
            f"train.init_from: {parent_dir} is a model of another shape:\n  "
            + "\n  ".join(differ)
            + "\nSet these as the model has them (its args.json), or remove train.init_from."
        )
    model.load_state_dict(parent.state_dict())
    log.info("weights from %s (train.init_from); this run's optimizer trains them", parent_dir)


def init_gene_embeddings_from_pca(
    model: CellTransformer, cells, seed: int, log=None, max_cells: int = 20_000
):
    """Set the gene embeddings to the genes' loadings on the cells' top principal axes.

    Rows 0..n_genes-1 get the loadings on the top d_model principal axes of the cells' binned
    profiles (a seeded sample of at most ``max_cells``), weighted by each axis's singular value
    and scaled to the random init's std (0.02).

    Parameters
    ----------
    model : CellTransformer
        The model, changed in place.
    cells : ShardDataset or RaggedCells
        The training cells (anything with ``len`` and ``cell(i)``).
    seed : int
        The run's seed (the sample derives its own from it).
    log : logging.Logger or None, default None
        Where to log the explained variance; None logs nothing.
    max_cells : int, default 20_000
        Cells sampled at the most.

    Raises
    ------
    InputError
        The cells have identical bins, so no principal axes.
    """
    n_genes, d = model.cfg.vocab_size - 2, model.cfg.d_model
    rng = np.random.default_rng(derived_seed(seed, 4))
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
