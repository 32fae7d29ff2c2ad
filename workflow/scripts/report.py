"""Rule report: the run's self-contained HTML report (results/<run>/report.html)."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
import tempfile
from pathlib import Path

from scllm.eval.qc_plots import plot_qc
from scllm.eval.report import ReportInputs, write_report
from scllm.files import setup_logging

setup_logging(snakemake.log[0])
inputs = ReportInputs(
    qc_tsv=snakemake.input.qc,
    samples_tsv=snakemake.input.samples,
    hvg_tsv=snakemake.input.hvg,
    epochs_tsv=snakemake.input.epochs,
    loss_curve_png=snakemake.input.loss_curve,
    metrics_tsv=snakemake.input.metrics,
    umap_cell_type_png=snakemake.input.umap_cell_type,
    umap_sample_png=snakemake.input.umap_sample,
    per_cell_type_tsv=snakemake.input.per_cell_type,
    confusion_tsv=snakemake.input.confusion,
    run_record_json=snakemake.input.run_record,
    # heldout.path only
    heldout_metrics_tsv=snakemake.input.get("heldout_metrics"),
    heldout_umap_png=snakemake.input.get("heldout_umap"),
    heldout_per_cell_type_tsv=snakemake.input.get("heldout_per_cell_type"),
)
with tempfile.TemporaryDirectory() as scratch:
    qc_plot = Path(scratch) / "qc.png"  # embedded in the page: no file of its own
    qc = snakemake.config["qc"]  # qc_cells changes with these thresholds: no rerun is missed
    plot_qc(
        snakemake.input.qc_cells,
        qc_plot,
        min_genes_per_cell=qc["min_genes_per_cell"],
        max_mito_fraction=qc["max_mito_fraction"],
    )
    write_report(snakemake.output.html, inputs, run=snakemake.config["run"], qc_plot_png=qc_plot)
