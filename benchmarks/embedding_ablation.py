"""What makes the cell embedding good? Train variants of the demo model, embed every cell, score.

Each variant is the embedded default's model and train settings (config/demo.yaml) with a few
settings changed. For every (variant, seed) the script pretrains on the demo's token shards,
embeds all cells with the best model and scores the embedding as the evaluate rule does:
kNN cell-type accuracy and macro-F1 (5-fold CV, k=15), Leiden ARI/NMI (best-NMI resolution),
label silhouette, plus the validation masked MSE of the expression head. The seed (``train.seed``)
changes the initial weights, the batches and the masks; the data stay the demo's.

Run ``make demo`` first (it writes results/demo/), then for example:

    .venv/bin/python benchmarks/embedding_ablation.py --seeds 0 1 2 --jobs 2
    .venv/bin/python benchmarks/embedding_ablation.py --variants default contrastive_1 --seeds 0

Results are appended to ``--out`` (JSON lines, one per run; runs already there are skipped, so
an interrupted sweep resumes) and summarised (mean and standard deviation over seeds) in
``--table`` as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# name -> (what it changes, model overrides, train overrides), each on top of config/demo.yaml
# (the default recipe). The ablation was a forward selection in three rounds, all at 12 epochs:
# the levers from "no_contrastive" down to "no_dropout" were measured without the contrastive
# term (BASE), which was added next at weight 1 (ONE); the levers from "contrastive_1" on were
# measured on that recipe; raising the contrastive weight to 10, the epochs to 24 and comparing
# the views through a projection head made today's default. Every variant states its base, so
# rerunning it reproduces its row.
BASE = {"contrastive_weight": 0.0, "epochs": 12}
ONE = {"contrastive_weight": 1.0, "epochs": 12}
SEEDS_RECIPE = (
    {"cell_emb_style": "cls"},
    {
        **BASE,
        "gepc_targets": "masked",
        "gene_emb_init": "random",
        "lr": 1e-3,
        "batch_size": 32,
        "epochs": 6,
    },
)
VARIANTS = {
    "default": (
        "config/demo.yaml as shipped: contrastive weight 10 on a projection head between thinned "
        "views (contrastive_view_genes 0.3), 24 epochs",
        {},
        {},
    ),
    "no_head": (
        "without the projection head: the contrastive term compares the cell embeddings",
        {},
        {},
    ),
    "seeds_recipe": (
        "the earlier default: <cls>, GEPC on masked tokens, random init, lr 1e-3, batch 32, "
        "6 epochs",
        *SEEDS_RECIPE,
    ),
    "no_contrastive": ("without the contrastive term: the base of the rows below", {}, dict(BASE)),
    "random_init": (
        "gene embeddings initialised at random (normal, std 0.02)",
        {},
        {**BASE, "gene_emb_init": "random"},
    ),
    "readout_cls": ("cell embedding = <cls> output", {"cell_emb_style": "cls"}, dict(BASE)),
    "readout_cls_mean": (
        "cell embedding = <cls> and mean side by side",
        {"cell_emb_style": "cls+mean"},
        dict(BASE),
    ),
    "readout_sum": (
        "cell embedding = sum of gene-token outputs / sqrt(vocabulary)",
        {"cell_emb_style": "sum"},
        dict(BASE),
    ),
    "gepc_masked": (
        "GEPC predicts the masked tokens only (scGPT)",
        {},
        {**BASE, "gepc_targets": "masked"},
    ),
    "gepc_masked_unexpressed": (
        "GEPC predicts masked tokens and 0 for unexpressed genes",
        {},
        {**BASE, "gepc_targets": "masked+unexpressed"},
    ),
    "no_gepc": ("no GEPC loss", {}, {**BASE, "gepc_weight": 0.0}),
    "ecs": (
        "+ elastic cell similarity (scGPT: weight 10, threshold 0.8)",
        {},
        {**BASE, "ecs_weight": 10.0},
    ),
    "continuous_values": (
        "scGPT's continuous value encoder instead of bin embeddings",
        {"value_encoder": "continuous"},
        dict(BASE),
    ),
    "mask_low": ("mask ratios {0.15, 0.25}", {}, {**BASE, "mask_ratios": [0.15, 0.25]}),
    "mask_high": ("mask ratio {0.75}", {}, {**BASE, "mask_ratios": [0.75]}),
    "wide": ("d_model 128, d_ff 256", {"d_model": 128, "d_ff": 256}, dict(BASE)),
    "shallow": ("1 layer", {"n_layers": 1}, dict(BASE)),
    "deep": ("4 layers", {"n_layers": 4}, dict(BASE)),
    "epochs_half": ("half the epochs", {}, {**BASE, "epochs": 6}),
    "epochs_double": ("twice the epochs", {}, {**BASE, "epochs": 24}),
    "batch_32": ("batch 32 (half the steps)", {}, {**BASE, "batch_size": 32}),
    "batch_8": ("batch 8 (twice the steps)", {}, {**BASE, "batch_size": 8}),
    "lr_low": ("lr / 3", {}, {**BASE, "lr": "third"}),
    "lr_high": ("lr x 3", {}, {**BASE, "lr": "triple"}),
    "warmup_long": ("warmup 200 steps", {}, {**BASE, "warmup_steps": 200}),
    "no_dropout": ("dropout 0", {"dropout": 0.0}, dict(BASE)),
    # Round 2, on the recipe with the contrastive term at weight 1 (ONE).
    "contrastive_1": (
        "contrastive weight 1 (the previous default): the base of the rows below",
        {},
        dict(ONE),
    ),
    "vicreg": (
        "+ VICReg's variance-covariance term on the cell embedding, weight 1",
        {},
        {**ONE, "vc_weight": 1.0},
    ),
    "vicreg_low": (
        "+ VICReg's variance-covariance term, weight 0.3",
        {},
        {**ONE, "vc_weight": 0.3},
    ),
    "temperature_0.05": (
        "contrastive temperature 0.05",
        {},
        {**ONE, "contrastive_temperature": 0.05},
    ),
    "temperature_0.2": (
        "contrastive temperature 0.2",
        {},
        {**ONE, "contrastive_temperature": 0.2},
    ),
    "view_genes_0.3": (
        "each view keeps 30% of the cell's genes",
        {},
        {**ONE, "contrastive_view_genes": 0.3},
    ),
    "gepc_3": ("GEPC weight 3", {}, {**ONE, "gepc_weight": 3.0}),
    "gepc_10": ("GEPC weight 10", {}, {**ONE, "gepc_weight": 10.0}),
    "epochs_24": ("24 epochs", {}, {**ONE, "epochs": 24}),
    "batch_32_epochs_24": (
        "batch 32 (twice the negatives per step), 24 epochs (the same steps)",
        {},
        {**ONE, "batch_size": 32, "epochs": 24},
    ),
    "head": (
        "the contrastive term on a projection head's output (SimCLR, 64 wide)",
        {"contrastive_head_dim": 64},
        dict(ONE),
    ),
    # Round 3: the contrastive weight (12 epochs), then the epochs at the best weight.
    "contrastive_3": ("contrastive weight 3", {}, {"contrastive_weight": 3.0, "epochs": 12}),
    "contrastive_3_head": (
        "contrastive weight 3 on a projection head",
        {"contrastive_head_dim": 64},
        {"contrastive_weight": 3.0, "epochs": 12},
    ),
    "contrastive_10": (
        "contrastive weight 10, 12 epochs",
        {},
        {"contrastive_weight": 10.0, "epochs": 12},
    ),
    "contrastive_10_head": (
        "contrastive weight 10 on a projection head, 12 epochs",
        {"contrastive_head_dim": 64},
        {"contrastive_weight": 10.0, "epochs": 12},
    ),
    "contrastive_10_temperature_0.05": (
        "contrastive weight 10, temperature 0.05, 12 epochs",
        {},
        {"contrastive_weight": 10.0, "contrastive_temperature": 0.05, "epochs": 12},
    ),
    "contrastive_30": (
        "contrastive weight 30, 12 epochs",
        {},
        {"contrastive_weight": 30.0, "epochs": 12},
    ),
    "contrastive_100": (
        "contrastive weight 100, 12 epochs",
        {},
        {"contrastive_weight": 100.0, "epochs": 12},
    ),
    # Round 4, transfer to shifted cells (--transfer), on the recipe of round 3 with the
    # projection head: its uniform half-gene views (the default until then) against views thinned
    # like a shallower sequencing; the thinned views keeping 0.3 became the default.
    "uniform_view": (
        "the previous default: each view a uniform random half of the cell's genes",
        {},
        {"contrastive_view": "genes", "contrastive_view_genes": 0.5},
    ),
    "thinned_view": (
        "views thinned like shallower sequencing (low-expressed genes dropped first, rebinned), "
        "the least expressed gene kept with probability 0.5 (72% of the genes)",
        {},
        {"contrastive_view": "thinned", "contrastive_view_genes": 0.5},
    ),
    # The control for today's default: uniform views keeping as many genes as its thinned views
    # do (58%), so that the number of genes kept and the way they are dropped are told apart.
    "uniform_view_58": (
        "each view a uniform random 58% of the cell's genes (as many as the default's thinned "
        "views keep)",
        {},
        {"contrastive_view": "genes", "contrastive_view_genes": 0.58},
    ),
}
# Variants on today's default recipe (projection head, thinned views) or stating their views.
ON_DEFAULT = ("default", "uniform_view", "thinned_view", "uniform_view_58")
for _name, (_, _model, _train) in VARIANTS.items():
    if _name not in ON_DEFAULT:
        # The projection head and the thinned views came last: every variant before them ran
        # without the head, on uniform half-gene views.
        _model.setdefault("contrastive_head_dim", 0)
        _train.setdefault("contrastive_view", "genes")
        _train.setdefault("contrastive_view_genes", 0.5)
# Relative settings, resolved against config/demo.yaml.
RELATIVE = {
    "half": lambda v: max(1, v // 2),
    "double": lambda v: 2 * v,
    "third": lambda v: v / 3,
    "triple": lambda v: v * 3,
}
METRICS = (
    "knn_accuracy_cv",
    "knn_macro_f1_cv",
    "leiden_ari",
    "leiden_nmi",
    "silhouette_label",
    "val_expr_mse",
    "val_gepc_mse",
)


def demo_settings() -> tuple[dict, dict, dict]:
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    return config["model"], config["train"], config.get("evaluate", {})


def run_one(job: dict) -> dict:
    """Pretrain one variant with one seed, embed all cells, score. Runs in a worker process."""
    import anndata as ad
    import torch

    from scllm.eval.embed import embed_shards
    from scllm.eval.metrics import masked_value_error, score_representation
    from scllm.provenance import run_data_files
    from scllm.train.loop import pretrain

    torch.set_num_threads(job["threads"])
    model_cfg, train_cfg, _ = demo_settings()
    model_cfg = {**model_cfg, **job["model"]}
    changes = {
        k: RELATIVE[v](train_cfg[k]) if isinstance(v, str) and v in RELATIVE else v
        for k, v in job["train"].items()
    }
    train_cfg = {
        **train_cfg,
        **changes,
        "seed": job["seed"],
        "num_threads": job["threads"],
        "device": "cpu",
    }
    results = Path(job["results"])
    data = run_data_files(results)  # the shared data folders the demo run used
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        t0 = time.perf_counter()
        pretrain(data["shards"] / "manifest.json", tmp, model_cfg, train_cfg)
        train_s = time.perf_counter() - t0
        emb_path = Path(tmp) / "embeddings.h5ad"
        embed_shards(tmp, data["shards"], data["binned"], emb_path, cells="all", device="cpu")
        emb = ad.read_h5ad(emb_path)
        masked = masked_value_error(Path(tmp) / "epochs.tsv")
        transfer = transfer_scores(tmp, results) if job["transfer"] else {}
    labels = emb.obs[job["label_key"]].astype(str).to_numpy()
    scores, _ = score_representation(
        np.asarray(emb.obsm["X_scllm"]), labels, emb.obs["sample"].astype(str), umap=False, seed=0
    )
    return {
        "variant": job["variant"],
        "seed": job["seed"],
        "model": job["model"],
        "train": job["train"],
        **{m: scores[m] for m in METRICS[:5]},
        "leiden_resolution": scores["_leiden_resolution"],
        "val_expr_mse": masked["expr_mse"],
        "val_gepc_mse": masked["gepc_mse"],
        "val_baseline_mse": masked["baseline_mse"],
        "best_epoch": masked["epoch"],
        "train_s": round(train_s, 1),
        "dim": int(emb.obsm["X_scllm"].shape[1]),
        **transfer,
    }


def transfer_scores(model_dir, results: Path, representation: str = "model") -> dict:
    """Transfer kNN accuracy of ``representation`` to each shifted copy of PBMC 3k
    (benchmarks/transfer.py), keyed ``transfer:<shift>``. The training PCA is the demo's: every
    variant trains on the same cells."""
    import shutil

    import anndata as ad

    from scllm.eval.shifts import SHIFTS, transfer_table

    if not (Path(model_dir) / "training_pca.npz").exists():
        shutil.copy(results / "model" / "training_pca.npz", model_dir)
    adata = ad.read_h5ad(REPO / "resources" / "pbmc3k" / "pbmc3k.h5ad")
    adata = adata[adata.obs["celltype"].notna()].copy()
    table = transfer_table(model_dir, adata, "celltype", gene_id_column="gene_ids")
    table = table[table["representation"] == representation].set_index("shift")
    return {f"transfer:{s.name}": float(table.loc[s.name, "accuracy"]) for s in SHIFTS[1:]}


def pca_reference(results: Path, label_key: str) -> dict:
    """The evaluate rule's PCA-50 baseline on the same cells (the target to beat)."""
    from scllm.eval.evaluate import log_normalized_hvgs
    from scllm.eval.metrics import pca_baseline, score_representation
    from scllm.h5ad import open_backed
    from scllm.prep.hvg import read_hvg_table
    from scllm.provenance import run_data_files

    data = run_data_files(results)
    binned = open_backed(data["binned"])
    obs = binned.obs.copy()
    binned.file.close()
    hvgs = read_hvg_table(data["hvg"])["feature_id"].tolist()
    matrix = log_normalized_hvgs(data["filtered"], hvgs, obs.index)
    scores, _ = score_representation(
        pca_baseline(matrix),
        obs[label_key].astype(str),
        obs["sample"].astype(str),
        umap=False,
        seed=0,
    )
    return {m: scores[m] for m in METRICS[:5]}


def summarise(rows: list[dict], reference: dict, order: list[str]) -> str:
    """Markdown: one line per variant, mean ± sd over its seeds."""

    def cell(values):
        values = np.asarray(values, dtype=float)
        return (
            f"{values.mean():.3f}"
            if len(values) == 1
            else f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
        )

    shifts = sorted({k for r in rows for k in r if k.startswith("transfer:")}, key=str)
    extra = ["transfer mean", "transfer worst"] if shifts else []

    def transfer(run: dict) -> list[float]:
        values = [run.get(k, np.nan) for k in shifts]
        return [float(np.mean(values)), float(np.min(values))]

    head = ["variant", "seeds", *METRICS, *extra, "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order:
        runs = [r for r in rows if r["variant"] == name]
        if not runs:
            continue
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        fmt = [
            cell([r[m] for r in runs])
            if not m.startswith("val_")
            else f"{np.mean([r[m] for r in runs]):.1f}"
            for m in METRICS
        ]
        if shifts:
            fmt += [cell([transfer(r)[i] for r in runs]) for i in (0, 1)]
        lines.append(
            f"| {name} | {seeds} | "
            + " | ".join(fmt)
            + f" | {np.mean([r['train_s'] for r in runs]):.0f} |"
        )
    pca_transfer = [f"{v:.3f}" for v in transfer(reference)] if shifts else []
    lines.append(
        "| PCA-50 (reference) | - | "
        + " | ".join(f"{reference[m]:.3f}" for m in METRICS[:5])
        + " | | | "
        + " | ".join(pca_transfer)
        + (" | |" if shifts else "|")
    )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", help=f"of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--try",
        dest="extra",
        nargs="+",
        default=[],
        metavar="NAME:SECTION.KEY=VALUE,...",
        help="an ad-hoc variant, e.g. c50:train.contrastive_weight=50,model.cell_emb_style=mean "
        "(values are YAML)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (each on --threads threads)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--transfer",
        action="store_true",
        help="also score transfer to shifted copies of PBMC 3k (benchmarks/transfer.py)",
    )
    parser.add_argument(
        "--results", default=str(REPO / "results" / "demo"), help="a finished demo run"
    )
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "embedding_ablation.jsonl")
    )
    parser.add_argument(
        "--table", default=str(REPO / "benchmarks" / "results" / "embedding_ablation.md")
    )
    args = parser.parse_args(argv)
    tried = set()
    for spec in args.extra:
        name, _, assignments = spec.partition(":")
        tried.add(name)
        overrides = {"model": {}, "train": {}}
        for assignment in filter(None, assignments.split(",")):
            key, _, value = assignment.partition("=")
            section, _, key = key.partition(".")
            if section not in overrides or not key:
                parser.error(
                    f"--try {spec}: {assignment!r} is not model.KEY=VALUE or train.KEY=VALUE"
                )
            overrides[section][key] = yaml.safe_load(value)
        VARIANTS[name] = (assignments, overrides["model"], overrides["train"])
    if args.variants is None:  # default: the --try variants if any, else every named one
        args.variants = [spec.partition(":")[0] for spec in args.extra] or [
            v for v in VARIANTS if v not in tried
        ]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    results = Path(args.results)
    if not (results / "run.json").exists():
        parser.error(f"{results} holds no finished demo run; run `make demo` first")
    label_key = demo_settings()[2].get("label_key", "cell_type")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["variant"], r["seed"]) for r in rows}
    jobs = [
        {
            "variant": v,
            "seed": s,
            "model": VARIANTS[v][1],
            "train": VARIANTS[v][2],
            "threads": args.threads,
            "results": str(results),
            "label_key": label_key,
            "transfer": args.transfer,
        }
        for s in args.seeds
        for v in args.variants
        if (v, s) not in done
    ]
    print(
        f"{len(jobs)} runs to do ({len(done)} already in {out}); {args.jobs} at a time", flush=True
    )
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            if (
                future.exception() is not None
            ):  # keep the sweep going; the run is retried next time
                print(
                    f"{job['variant']} seed {job['seed']} FAILED: {future.exception()!r}",
                    flush=True,
                )
                continue
            row = future.result()
            row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{row['variant']:>18} seed {row['seed']}: kNN {row['knn_accuracy_cv']:.3f} F1 "
                f"{row['knn_macro_f1_cv']:.3f} ARI {row['leiden_ari']:.3f} val expr MSE "
                f"{row['val_expr_mse']:.1f} "
                f"({row['train_s']:.0f} s)",
                flush=True,
            )
    reference = pca_reference(results, label_key)
    if any("transfer:depth 50%" in r for r in rows):
        reference.update(transfer_scores(results / "model", results, "training PCA, projected"))
    table = summarise(
        rows, reference, [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    )
    Path(args.table).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
