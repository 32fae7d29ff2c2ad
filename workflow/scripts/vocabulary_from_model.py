"""Rule select_hvg with train.init_from: the continued model's vocabulary, not new HVGs."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from pathlib import Path

from scllm.files import setup_logging
from scllm.prep.hvg import vocabulary_from_model

setup_logging(snakemake.log[0])
vocabulary_from_model(
    snakemake.input.h5ad, Path(snakemake.input.parent_genes).parent, snakemake.output.table
)
