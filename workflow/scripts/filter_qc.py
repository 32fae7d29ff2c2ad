"""Rule filter_qc: drop rarely counted genes, then cells with too few expressed genes (and, if
qc.max_mito_fraction is set, too mitochondrial ones); write every cell's QC values."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.files import setup_logging
from scllm.prep.qc import filter_qc

setup_logging(snakemake.log[0])
filter_qc(
    snakemake.input.cells,
    snakemake.output.h5ad,
    snakemake.output.table,
    **snakemake.params.qc,
    cells_table=snakemake.output.cells_table,
    chunk_size=snakemake.config["chunk_size"],  # memory only: not a rerun trigger
)
