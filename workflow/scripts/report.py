"""Rule report: the run's self-contained HTML report (results/<run>/report.html)."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.files import setup_logging
from scllm.eval.report import write_report

setup_logging(snakemake.log[0])
write_report(
    snakemake.output.html,
    run=snakemake.config["run"],
    qc_tsv=snakemake.input.qc,
    samples_tsv=snakemake.input.samples,
    hvg_tsv=snakemake.input.hvg,
    epochs_tsv=snakemake.input.epochs,
    loss_curve_png=snakemake.input.loss_curve,
    metrics_tsv=snakemake.input.metrics,
    umap_cell_type_png=snakemake.input.umap_cell_type,
    umap_sample_png=snakemake.input.umap_sample,
    # heldout.path only
    heldout_metrics_tsv=snakemake.input.get("heldout_metrics"),
    heldout_umap_png=snakemake.input.get("heldout_umap"),
)
