"""Rule filter_qc: drop rarely counted genes, then cells with too few expressed genes."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.files import setup_logging
from scllm.prep.qc import filter_qc

setup_logging(snakemake.log[0])
filter_qc(
    snakemake.input.cells,
    snakemake.output.h5ad,
    snakemake.output.table,
    **snakemake.params.qc,
    chunk_size=snakemake.config["chunk_size"],  # memory only: not a rerun trigger
)
