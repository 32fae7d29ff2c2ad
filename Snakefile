# scLLM-pretrain: sample blood cells from the CELLxGENE Census, preprocess them and pretrain an
# scGPT-style transformer. `snakemake --cores 8` runs the embedded default (config/demo.yaml);
# `snakemake --cores 8 --configfile config/config.yaml` runs on the real Census.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/demo.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/eval.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        rules.pretrain.output,
        rules.training_pca.output,
        rules.evaluate.output,
        rules.report.output,
        rules.evaluate_heldout.output if config["heldout"]["path"] else [],  # defined only then
