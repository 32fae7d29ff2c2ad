"""Rule evaluate: kNN, Leiden, silhouette and scIB scores of the embeddings vs a PCA baseline;
per-cell-type F1 and confusion counts; UMAPs."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.eval.evaluate import ZeroShot, evaluate
from scllm.files import setup_logging

setup_logging(snakemake.log[0])
zero_shot = snakemake.input.get("zero_shot")  # train.init_from: the continued model's baselines
evaluate(
    snakemake.input.embeddings,
    snakemake.input.filtered,
    snakemake.input.hvg,
    snakemake.input.epochs,
    snakemake.output.table,
    snakemake.output.html,
    snakemake.output.umap_cell_type,
    snakemake.output.umap_sample,
    snakemake.output.per_cell_type,
    snakemake.output.confusion,
    args_json=snakemake.input.args,
    zero_shot=ZeroShot(zero_shot, snakemake.input.get("parent_pca")) if zero_shot else None,
    chunk_size=snakemake.config["chunk_size"],  # memory only: not a rerun trigger
    **snakemake.params.evaluate,
)
