# Shared helpers: where a run's files live, and which Census the sampling stage reads.
import os
import re
from pathlib import Path


def run_name():
    """The run's name (results/<run>/). Config files given on the command line that set no
    ``run:`` (nor ``--config run=...``) name the run after the last of them, so that an
    experiment in my.yaml writes to results/my/ and never over the demo's results."""
    cli_files = list(workflow.overwrite_configfiles or [])
    if not cli_files or "run" in workflow.config_settings.overwrite_config:
        return config["run"]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(cli_files[-1]).stem)
    given = ", ".join(os.path.relpath(f) for f in cli_files)
    logger.info(f"run: not set in {given}; outputs go to results/{name}/ "
                f"(set run: in the file to choose another name)")
    return name


config["run"] = RUN = run_name()
RESULTS = f"results/{RUN}"
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"


def census_store(wildcards):
    """The local store sample_census reads, as an input (empty for a published release)."""
    source = config["census"]["source"]
    if source == "h5ad":
        return {"store": f"{RESULTS}/census_store"}
    if source == "uri":
        return {"store": config["census"]["uri"]}
    return {}


def sampling_params(wildcards, input):
    """The census settings that decide which cells are sampled: only the source in use, so
    editing an unused key (or how the store was built) reruns nothing."""
    census = {k: v for k, v in config["census"].items() if k not in ("h5ad", "census_version", "uri")}
    if census["source"] == "release":
        census["census_version"] = config["census"]["census_version"]
    else:
        census["uri"] = input.store
    return census
