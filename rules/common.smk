# Shared helpers: where a run's files live, and which Census the sampling stage reads.

RUN = config["run"]
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
