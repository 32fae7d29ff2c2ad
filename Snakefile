# scLLM-pretrain: sample blood cells from the CELLxGENE Census, preprocess them and pretrain an
# scGPT-style transformer. `snakemake --cores 8` runs the embedded default (config/demo.yaml);
# `snakemake --cores 8 --configfile config/config.yaml` runs on the real Census.
import sys

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, update_config, validate

min_version("9.0")
sys.path.insert(0, f"{workflow.basedir}/src")  # the library, as the rule scripts import it
from scllm.workflow_config import (
    config_problems,
    integers_as_int,
    own_h5ad_description,
    typed_overrides,
)


configfile: "config/demo.yaml"


with open(f"{workflow.basedir}/config/schema.yaml") as schema_file:
    SCHEMA = yaml.safe_load(schema_file)
# --config 'hvg={"n_top_genes": 800}': numbers inside a mapping arrive as text, and run=007 as
# the number 7; type them as the schema asks, names as written (only --config's: what a config
# file quotes stays text).
cli = workflow.config_settings
update_config(config, typed_overrides(dict(cli.config), SCHEMA, cli.config_args))
if problem := config_problems(config, SCHEMA):
    raise WorkflowError(problem)
own_h5ad_description(config, cli.overwrite_config)  # after the check: census is a mapping
validate(config, "config/schema.yaml")  # fills the defaults
integers_as_int(config, SCHEMA)  # max_cells=1e5 is the integer 100000 (the schema allows 1e5)


# Seconds of bookkeeping: run on the machine Snakemake runs on, never submitted to a cluster.
localrules:
    run_record,
    report,


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
        rules.run_record.output,
        rules.evaluate_heldout.output if config["heldout"]["path"] else [],  # defined only then
