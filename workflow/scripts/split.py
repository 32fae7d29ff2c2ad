"""Rule split: train/validation assignment of the binned cells."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.files import setup_logging
from scllm.prep.split import split_cells

setup_logging(snakemake.log[0])
split_cells(snakemake.input.h5ad, snakemake.output.table, **snakemake.params.split)
