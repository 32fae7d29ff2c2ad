"""Rule sample_census: stream the chosen samples' raw counts from a Census, or from your own
h5ad (census.source: h5ad), into cells.h5ad."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.prep.census import sample_census
from scllm.prep.h5ad_source import sample_h5ad
from scllm.files import setup_logging

setup_logging(snakemake.log[0])
census = snakemake.params.census
sampling = dict(
    organism=census["organism"],
    tissue_general=census["tissue_general"],
    primary_only=census["primary_only"],
    disease=census["disease"],
    max_cells=census["max_cells"],
    seed=census["seed"],
    chunk_size=snakemake.config["chunk_size"],  # memory only: not a rerun trigger
)
if census["source"] == "h5ad":
    h5ad = census["h5ad"]
    sample_h5ad(
        snakemake.input.h5ad,
        snakemake.output.cells,
        snakemake.output.samples,
        dataset_id=h5ad["dataset_id"],
        donor_id=h5ad["donor_id"],
        donor_column=h5ad["donor_column"],
        cell_type_column=h5ad["cell_type_column"],
        gene_id_column=h5ad["gene_id_column"],
        counts_layer=h5ad["counts_layer"],
        **sampling,
    )
else:
    sample_census(
        snakemake.output.cells,
        snakemake.output.samples,
        census_version=census.get("census_version"),
        uri=census.get("uri"),
        **sampling,
    )
