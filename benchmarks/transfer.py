"""Does the embedding carry over to cells it never saw? The shifted-PBMC transfer benchmark.

A model trained on PBMC 3k (the demo's, or any model folder trained on those cells) embeds
shifted copies of the same cells: counts thinned to 50% and 25% of their depth, 10% and 30% of
the vocabulary genes absent, and both at once (``scllm.eval.shifts``). A kNN fitted on the
original cells' embeddings predicts the labels of the shifted copies of other cells (5 folds,
so no copy meets its own original). The baseline does the same with the PCA of the model's
training cells (``training_pca.npz`` in the model folder) projected onto each copy.

Run ``make demo`` first (it trains results/demo/model and writes its training PCA), then:

    .venv/bin/python benchmarks/transfer.py
    .venv/bin/python benchmarks/transfer.py --model path/to/model --out my_transfer.tsv

The table (accuracy and macro-F1 per shift and representation) goes to ``--out`` and, as
Markdown with the machine, to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def markdown(table, title: str) -> str:
    wide = table.pivot(index="shift", columns="representation", values=["accuracy", "macro_f1"])
    wide = wide.reindex(table["shift"].unique())
    head = "| shift | kNN acc: model | kNN acc: training PCA | macro-F1: model | macro-F1: PCA |"
    lines = [f"{title}\n", head, "|---|---|---|---|---|"]
    for shift, row in wide.iterrows():
        acc, f1 = row["accuracy"], row["macro_f1"]
        best = "**" if acc["model"] >= acc["training PCA, projected"] else ""
        lines.append(
            f"| {shift} | {best}{acc['model']:.3f}{best} | {acc['training PCA, projected']:.3f} "
            f"| {f1['model']:.3f} | {f1['training PCA, projected']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import anndata as ad

    from scllm.eval.shifts import transfer_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "results" / "demo" / "model"))
    parser.add_argument("--h5ad", default=str(REPO / "resources" / "pbmc3k" / "pbmc3k.h5ad"))
    parser.add_argument("--label-key", default="celltype")
    parser.add_argument("--gene-id-column", default="gene_ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "transfer.tsv"))
    args = parser.parse_args(argv)
    if not (Path(args.model) / "training_pca.npz").exists():
        parser.error(f"{args.model} has no training_pca.npz: run `make demo` (or the rule)")
    adata = ad.read_h5ad(args.h5ad)
    adata = adata[adata.obs[args.label_key].notna()].copy()
    table = transfer_table(
        args.model, adata, args.label_key, gene_id_column=args.gene_id_column, seed=args.seed
    )
    table.insert(0, "model", os.path.relpath(args.model, REPO))
    table["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, sep="\t", index=False, float_format="%.4f")
    print(markdown(table, f"{len(adata)} cells, model {os.path.relpath(args.model, REPO)}"))


if __name__ == "__main__":
    main()
