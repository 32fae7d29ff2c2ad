"""Rule tokenize_shards: ragged token shards per split, vocab.json and manifest.json."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.files import setup_logging
from scllm.prep.tokenize import tokenize_shards

setup_logging(snakemake.log[0])
tokenize_shards(
    snakemake.input.h5ad,
    snakemake.input.split,
    snakemake.output.shards,
    # file layout and memory only: neither is a rerun trigger
    cells_per_shard=snakemake.config["tokenize"]["cells_per_shard"],
    chunk_size=snakemake.config["chunk_size"],
)
