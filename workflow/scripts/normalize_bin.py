"""Rule normalize_bin: normalize per cell, keep the HVGs, bin values per cell."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
import numba

from scllm.prep.binning import normalize_bin
from scllm.files import setup_logging

setup_logging(snakemake.log[0])
numba.set_num_threads(min(snakemake.threads, numba.config.NUMBA_NUM_THREADS))
normalize_bin(
    snakemake.input.h5ad,
    snakemake.input.hvg,
    snakemake.output.h5ad,
    **snakemake.params.normalize_bin,
    chunk_size=snakemake.config["chunk_size"],  # memory only: not a rerun trigger
)
