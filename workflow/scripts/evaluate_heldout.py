"""Rule evaluate_heldout: embed an h5ad the model never saw and score it against PCA of the same
cells."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from pathlib import Path

import torch

from scllm.eval.evaluate import evaluate_heldout
from scllm.files import setup_logging

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
evaluate_heldout(
    Path(snakemake.input.model).parent,
    snakemake.input.h5ad,
    snakemake.output.embeddings,
    snakemake.output.table,
    snakemake.output.html,
    snakemake.output.umap_cell_type,
    snakemake.output.per_cell_type,
    snakemake.output.confusion,
    chunk_size=snakemake.config["chunk_size"],  # memory only: not a rerun trigger
    device=snakemake.params.embed.get("device", "auto"),
    batch_size=snakemake.params.embed.get("batch_size", 64),
    **snakemake.params.heldout,
    **snakemake.params.evaluate,
)
