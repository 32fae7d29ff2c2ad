"""The pretraining objectives: every loss of a training batch, and the validation loss.

- ``masked_mse``: the expression head's (and the GEPC head's) error on masked tokens;
- ``gepc_profile_mse``: GEPC over a cell's whole vocabulary profile (``train.gepc_targets``);
- ``ecs_loss``: scGPT's elastic cell similarity on the cell embedding;
- ``contrastive_loss``: InfoNCE between two masked views of each cell;
- ``variance_covariance_loss``: VICReg's anti-collapse terms;
- ``objective``: their weighted sum for one batch, as the training step uses it;
- ``validation_loss``: the masked MSEs over the validation cells with fixed masks, and the
  baseline of each cell's mean visible bin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from scllm.config import TrainConfig
from scllm.tokens import collate
from scllm.train.batches import derived_seed, mask_values
from scllm.train.distributed import all_reduce

if TYPE_CHECKING:
    from scllm.train.batches import TrainingData
    from scllm.train.distributed import Environment


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the positions where ``mask`` is True (0 if there are none).

    Written with ``where`` rather than boolean indexing: indexing has a data-dependent size, so
    on a GPU it makes the CPU wait for the device twice per step and stops it queueing work
    ahead.

    Parameters
    ----------
    pred, target : torch.Tensor
        Predictions and targets, of one shape (compared in float32).
    mask : torch.Tensor
        bool, of that shape: the positions scored.

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    squared = torch.where(mask, (pred.float() - target.float()).square(), 0.0)
    return squared.sum() / mask.sum().clamp(min=1)


def ecs_loss(cell_emb: torch.Tensor, threshold: float) -> torch.Tensor:
    """scGPT's elastic cell similarity over the batch's cell pairs.

    The mean over the pairs (the diagonal counted as 0, as in scGPT) of
    ``1 - (relu(cos) - threshold)^2``. Minimising it pushes positive cosine similarities away
    from ``threshold``: similar cells closer together, others apart.

    Parameters
    ----------
    cell_emb : torch.Tensor
        Cell embeddings [B, d].
    threshold : float
        ``train.ecs_threshold``.

    Returns
    -------
    torch.Tensor
        A scalar.
    """
    z = F.normalize(cell_emb.float(), p=2, dim=1)
    cos = (z @ z.T).masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), 0.0)
    return torch.mean(1 - (F.relu(cos) - threshold) ** 2)


def contrastive_loss(cell_emb: torch.Tensor, n_views: int, temperature: float) -> torch.Tensor:
    """InfoNCE (SimCLR's NT-Xent) between views of the same cells.

    Rows ``i`` and ``i + k * B`` (B = rows / n_views) are views of one cell. Each row must pick out
    its other views among all rows of the batch by cosine similarity / ``temperature``.

    Parameters
    ----------
    cell_emb : torch.Tensor
        Embeddings [n_views * B, d], the views one after the other.
    n_views : int
        Views of each cell, at least 2.
    temperature : float
        Divides the cosine similarities.

    Returns
    -------
    torch.Tensor
        A scalar.

    Raises
    ------
    ValueError
        Fewer than 2 views, or rows not divisible by ``n_views``.
    """
    n = len(cell_emb)
    if n_views < 2 or n % n_views:
        raise ValueError(
            "contrastive_loss needs >= 2 views of each cell and rows divisible by them "
            f"({n}, {n_views})"
        )
    z = F.normalize(cell_emb.float(), p=2, dim=1)
    logits = (z @ z.T / temperature).masked_fill(
        torch.eye(n, dtype=torch.bool, device=z.device), float("-inf")
    )
    cell = torch.arange(n, device=z.device) % (n // n_views)
    positive = (cell[:, None] == cell[None, :]) & ~torch.eye(n, dtype=torch.bool, device=z.device)
    log_prob = logits.log_softmax(dim=1)
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)).mean()


def variance_covariance_loss(
    cell_emb: torch.Tensor, target_std: float = 1.0, eps: float = 1e-4
) -> torch.Tensor:
    """VICReg's anti-collapse terms (Bardes et al., 2022) over a batch of cell embeddings.

    The mean hinge ``relu(target_std - std_j)`` of each dimension's standard deviation, plus the
    sum of squared off-diagonal covariances divided by the dimension. Minimising it keeps every
    dimension in use and decorrelates them, so the embedding cannot fold onto a few directions.

    Parameters
    ----------
    cell_emb : torch.Tensor
        Cell embeddings [B, d], B at least 2.
    target_std : float, default 1.0
        The standard deviation below which a dimension is penalised.
    eps : float, default 1e-4
        Added to the variance before its square root.

    Returns
    -------
    torch.Tensor
        A scalar.

    Raises
    ------
    ValueError
        Fewer than 2 rows.
    """
    z = cell_emb.float()
    n, d = z.shape
    if n < 2:
        raise ValueError(f"variance_covariance_loss needs at least 2 rows, got {n}")
    z = z - z.mean(0)
    std = torch.sqrt(z.var(0) + eps)
    cov = (z.T @ z) / (n - 1)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    return F.relu(target_std - std).mean() + off_diagonal.square().sum() / d


def objective(
    pred: dict,
    gene_ids: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    cfg: TrainConfig,
    views: int = 1,
    profile: tuple | None = None,
) -> list:
    """The losses of one training batch and their weighted total.

    The total weighs each term by its ``*_weight`` setting (terms with weight 0 are not computed
    and read 0), plus ``vc_weight`` times ``variance_covariance_loss``.

    Parameters
    ----------
    pred : dict of str to torch.Tensor
        The model's output on the batch (``CellTransformer.forward``).
    gene_ids, values : torch.Tensor
        The batch's tokens [B, L], values unmasked (the targets).
    mask : torch.Tensor
        bool [B, L], True at the masked tokens.
    cfg : TrainConfig
        The loss weights and settings.
    views : int, default 1
        With more than 1, the batch holds that many masked views of its cells (for the
        contrastive loss).
    profile : tuple of torch.Tensor or None, default None
        (gene ids, values) of the whole cells behind the rows, for ``gepc_profile_mse``; None: the
        rows themselves.

    Returns
    -------
    list of torch.Tensor
        [total loss, expression MSE, GEPC MSE, ECS loss, contrastive loss], scalars.
    """
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
    """GEPC's MSE over each cell's vocabulary profile.

    Scored: every gene the cell does not express (target 0) and every gene it expresses but the
    model did not see (masked, or left out of a contrastive view: target its bin); the visible
    genes too with ``visible_too``.

    Parameters
    ----------
    all_genes_pred : torch.Tensor
        The GEPC head on every vocabulary gene [B, n_genes] (``gepc_all_pred``).
    gene_ids, values : torch.Tensor
        The model's input rows [B, L].
    mask : torch.Tensor
        bool [B, L], True at the masked tokens.
    visible_too : bool, default False
        Score the visible genes as well (``train.gepc_targets: all``).
    profile : tuple of torch.Tensor or None, default None
        (gene ids, values) of the whole cells behind the rows; None: the rows themselves.

    Returns
    -------
    torch.Tensor
        A scalar.
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
def validation_loss(model, data: TrainingData, cfg: TrainConfig, env: Environment) -> dict:
    """Masked MSE over the validation cells with fixed masks, and a baseline.

    The cells are ``data.val_batches``, this process's share; the sums are reduced over the
    processes. Batch i is masked at ratio ``mask_ratios[i % len(mask_ratios)]`` with a generator
    seeded by (seed, i), so every epoch sees the same. Baseline: each cell's masked tokens
    predicted by the mean bin of its unmasked gene tokens (what the model sees); a cell with none
    left visible falls back to the batch's visible mean. All MSEs are token-weighted over every
    masked position of the split. The model's train/eval mode is restored.

    Parameters
    ----------
    model : CellTransformer
        The model (not wrapped in DDP: every process scores its own share).
    data : TrainingData
        The run's data (validation cells and batches).
    cfg : TrainConfig
        The seed and mask ratios.
    env : Environment
        The process's device, autocast and world size.

    Returns
    -------
    dict of str to float
        ``val_loss`` (expression + GEPC MSE), ``val_expr_mse``, ``val_gepc_mse`` and
        ``val_mean_bin_baseline_mse``.
    """
    device, ratios, pad_id = env.device, cfg.mask_ratios, model.cfg.pad_id
    was_training = model.training
    model.eval()
    sums = torch.zeros(
        4, dtype=torch.float64, device=device
    )  # expr SE, GEPC SE, baseline SE, n masked
    for i, idx in data.val_batches:
        batch = collate(data.val_ds.cells(idx), pad_id)
        gen = torch.Generator().manual_seed(derived_seed(cfg.seed, 2, i))
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
        with env.autocast:
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
    expr, gepc, baseline, n = all_reduce(sums, env.world_size).tolist()
    model.train(was_training)
    n = max(n, 1.0)
    return {
        "val_loss": (expr + gepc) / n,
        "val_expr_mse": expr / n,
        "val_gepc_mse": gepc / n,
        "val_mean_bin_baseline_mse": baseline / n,
    }
