"""Rule embed: cell embeddings of the tokenized cells (validation or all) with the best model."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from pathlib import Path

import torch

from scllm.eval.embed import embed_shards
from scllm.files import setup_logging

setup_logging(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
embed_shards(
    Path(snakemake.input.model).parent,
    snakemake.input.shards,
    snakemake.input.binned,
    snakemake.output.h5ad,
    **snakemake.params.embed,
)
