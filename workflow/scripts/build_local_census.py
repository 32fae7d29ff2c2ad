"""Rule build_local_census: a Census-shaped SOMA store from an h5ad of raw counts."""
import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.census import build_local_census
from scllm.io import setup_logging

setup_logging(snakemake.log[0])
h5ad = snakemake.params.h5ad
census = snakemake.params.census
build_local_census(
    snakemake.input.h5ad,
    snakemake.output.store,
    dataset_id=h5ad["dataset_id"],
    donor_id=h5ad["donor_id"],
    donor_column=h5ad["donor_column"],
    cell_type_column=h5ad["cell_type_column"],
    gene_id_column=h5ad["gene_id_column"],
    counts_layer=h5ad["counts_layer"],
    tissue_general=census["tissue_general"],
    disease=census["disease"] or "normal",
    organism=census["organism"],
)
