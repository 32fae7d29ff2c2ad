"""Rule select_hvg: the gene vocabulary, ranked highly variable genes across samples."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.prep.hvg import select_hvg
from scllm.files import setup_logging

setup_logging(snakemake.log[0])
select_hvg(snakemake.input.h5ad, snakemake.output.table, **snakemake.params.hvg)
