"""Rule training_pca: the PCA of the training cells, kept with the model (the zero-shot
baseline)."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.eval.baselines import write_training_pca
from scllm.files import setup_logging

setup_logging(snakemake.log[0])
write_training_pca(
    snakemake.input.filtered,
    snakemake.input.hvg,
    snakemake.input.split,
    snakemake.output.npz,
    **snakemake.params.pca,
)
