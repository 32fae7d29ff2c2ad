"""The pretraining loss curves (``model/loss_curve.png``): each quantity on its own axis,
labelled as what it is.

Training, per logged step (``metrics.tsv``; the epoch means of ``epochs.tsv`` as markers): the
objective the optimizer minimises (the weighted sum), then each of its terms alone, since they
differ in kind and in scale (the masked expression MSE and the GEPC MSE in bins², the
contrastive InfoNCE in nats). Validation, per epoch: each head's MSE on masked tokens with fixed
masks against the mean-bin baseline. The validation loss that picks ``best_model.pt`` is the
sum of the two validation MSEs: marked as the best epoch, not drawn beside the training
objective (a different quantity).

No torch here: the report and the tests draw it without the training stack.
"""

from __future__ import annotations

from pathlib import Path

from scllm.files import atomic_path

# What the GEPC head is trained to predict, per train.gepc_targets.
GEPC_TARGETS = {
    "masked": "masked tokens",
    "masked+unexpressed": "masked tokens + 0 for unexpressed genes",
    "all": "whole vocabulary profile, mostly zeros",
}
MSE_UNIT = "MSE (bins²)"


def objective_label(train: dict) -> str:
    """The training objective as the sum it is, with the weights of ``train``.

    Parameters
    ----------
    train : dict
        The run's train settings (args.json's ``train``); missing weights count as their
        defaults (GEPC 1, the others 0).

    Returns
    -------
    str
        E.g. "expression MSE + 1 x GEPC MSE + 10 x InfoNCE".
    """
    terms = ["expression MSE"]
    for key, name, default in (
        ("gepc_weight", "GEPC MSE", 1.0),
        ("ecs_weight", "ECS", 0.0),
        ("contrastive_weight", "InfoNCE", 0.0),
        ("vc_weight", "VICReg", 0.0),
    ):
        weight = float(train.get(key, default) or 0.0)
        if weight:
            terms.append(f"{weight:g} x {name}")
    return " + ".join(terms)


def _panels(train: dict) -> list[tuple]:
    """(title, y label, per-step column of metrics.tsv, per-epoch column of epochs.tsv) of the
    training panels, the terms that are on only."""
    targets = GEPC_TARGETS.get(train.get("gepc_targets", "masked"), "masked tokens")
    panels = [
        ("Training objective", "objective (weighted sum)", "train_loss", "train_loss"),
        ("Training: expression head, masked MSE", MSE_UNIT, "expr_mse", "train_expr_mse"),
        (f"Training: GEPC head MSE\n({targets})", MSE_UNIT, "gepc_mse", "train_gepc_mse"),
    ]
    if float(train.get("ecs_weight", 0.0) or 0.0):
        panels.append(("Training: elastic cell similarity", "ECS loss", "ecs_loss", None))
    if float(train.get("contrastive_weight", 0.0) or 0.0):
        panels.append(
            (
                "Training: contrastive InfoNCE (two views)",
                "InfoNCE (nats)",
                "contrastive_loss",
                "train_contrastive",
            )
        )
    return panels


def _series(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(r[x], r[y]) for r in rows if r.get(y) is not None and r[y] == r[y]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def loss_figure(metrics: list[dict], epochs: list[dict], train: dict):
    """The loss curves as a matplotlib Figure (no pyplot: the caller's backend is left alone).

    Parameters
    ----------
    metrics : list of dict
        Rows of ``metrics.tsv`` (per logged step).
    epochs : list of dict
        Rows of ``epochs.tsv`` (per epoch).
    train : dict
        The run's train settings: which terms are on, their weights, the GEPC targets.

    Returns
    -------
    matplotlib.figure.Figure
        One axis per quantity: the training panels, then the validation panel.
    """
    from matplotlib.figure import Figure

    panels = _panels(train)
    n_columns = 3
    n_rows = -(-(len(panels) + 1) // n_columns)
    fig = Figure(figsize=(5 * n_columns, 3.6 * n_rows), layout="constrained")
    axes = list(fig.subplots(n_rows, n_columns, squeeze=False).ravel())
    for ax, (title, ylabel, step_column, epoch_column) in zip(axes, panels):
        label = objective_label(train) if step_column == "train_loss" else "per logged step"
        ax.plot(*_series(metrics, "step", step_column), lw=1, label=label)
        means = _series(epochs, "step", epoch_column) if epoch_column else ([], [])
        if means[0]:  # epochs.tsv of runs before the terms were recorded lacks them
            ax.plot(*means, "o", ms=4, label="epoch mean")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
    _validation_panel(axes[len(panels)], epochs, train.get("gepc_targets", "masked"))
    for ax in axes[len(panels) + 1 :]:
        ax.set_axis_off()
    for ax in axes:
        if ax.lines:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return fig


def _validation_panel(ax, epochs: list[dict], gepc_targets: str) -> None:
    """Each head's masked-token MSE per epoch against the mean-bin baseline; the best epoch."""
    gepc = "GEPC head (cell embedding)"
    if gepc_targets != "masked":  # trained to predict 0 for unexpressed genes too
        gepc += "\ntrained on more than masked tokens: predicts them low"
    ax.plot(*_series(epochs, "epoch", "val_expr_mse"), "o-", label="expression head")
    ax.plot(*_series(epochs, "epoch", "val_gepc_mse"), "^-", label=gepc)
    ax.plot(
        *_series(epochs, "epoch", "val_mean_bin_baseline_mse"),
        "s--",
        color="grey",
        label="baseline: each cell's mean visible bin",
    )
    if epochs and any(len(line.get_ydata()) for line in ax.lines):
        highest = max(max(y for line in ax.lines for y in line.get_ydata()), 1.0)
        ax.set_ylim(0, highest * 1.6)  # MSE from 0, with room above the curves for the legend
        best = min(epochs, key=lambda r: r["val_loss"])
        ax.axvline(best["epoch"], color="black", ls=":", lw=1, label="best epoch (best_model.pt)")
    ax.set(title="Validation: masked-token MSE (fixed masks)", xlabel="epoch", ylabel=MSE_UNIT)


def plot_loss_curve(path, metrics: list[dict], epochs: list[dict], train: dict) -> None:
    """Draw ``loss_figure`` to a PNG at ``path`` (written whole or not at all).

    Parameters
    ----------
    path : path
        The PNG to write.
    metrics, epochs : list of dict
        Rows of ``metrics.tsv`` and ``epochs.tsv``.
    train : dict
        The run's train settings.
    """
    fig = loss_figure(metrics, epochs, train)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
