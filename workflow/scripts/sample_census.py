"""Rule sample_census: stream the chosen samples' raw counts from a Census into cells.h5ad."""
import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.census import sample_census
from scllm.io import setup_logging

setup_logging(snakemake.log[0])
census = snakemake.params.census
sample_census(
    snakemake.output.cells,
    snakemake.output.samples,
    census_version=census.get("census_version"),
    uri=census.get("uri"),
    organism=census["organism"],
    tissue_general=census["tissue_general"],
    primary_only=census["primary_only"],
    disease=census["disease"],
    max_cells=census["max_cells"],
    seed=census["seed"],
    chunk_size=snakemake.config["chunk_size"],  # memory only: not a rerun trigger
)
