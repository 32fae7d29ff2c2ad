"""Rule run_record: results/<run>/run.json, how this run was made (scllm.provenance)."""

import scllm_src  # noqa: F401  (makes src/ importable; must come first)
from scllm.files import setup_logging
from scllm.provenance import write_run_record

setup_logging(snakemake.log[0])
write_run_record(
    snakemake.output.record,
    config=dict(snakemake.config),  # all of it, chunk_size included (params leave it out)
    data=snakemake.params.data,
    benchmarks=snakemake.params.benchmarks,
    named_by=snakemake.params.named_by,
)
