# Shared helpers: where a run's files live, and which Census the sampling stage reads.
import hashlib
import json
import os
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

NO_RECORD = object()  # other_namer: no other run would be replaced


def deciding_settings(resolved):
    """A resolved config without what shapes memory and files only (chunk_size, and
    tokenize.cells_per_shard): the settings that decide a run's results."""
    return {k: v for k, v in resolved.items() if k not in ("chunk_size", "tokenize")}


def settings_text(resolved):
    """The settings that decide a run's results, its name aside, as text to compare."""
    kept = {k: v for k, v in deciding_settings(resolved).items() if k != "run"}
    return json.dumps(kept, sort_keys=True, default=str)


def other_namer(run, file):
    """What named results/<run>/ (its run.json's ``named_by``: a config file, None for a run:
    setting) when that is not ``file`` and the run's settings differ from this config's, so
    that running under its name would replace its model and evaluation; NO_RECORD otherwise
    (no run there, a record from before it kept named_by, or nothing would change)."""
    try:
        record = json.loads(Path(f"results/{run}/run.json").read_text())
    except (OSError, ValueError):  # no record, or one cut short: run_record rewrites it
        return NO_RECORD
    named_by = record.get("named_by", NO_RECORD)
    if named_by == file or settings_text(record.get("config", {})) == settings_text(config):
        return NO_RECORD
    return named_by


def run_name():
    """The run's name (results/<run>/) and the config file that named it (None where run: or
    ``--config run=...`` set it). Config files given on the command line that set no ``run:``
    name the run after the last of them, so that an experiment in my.yaml writes to
    results/my/ and never over the demo's results; nor over a run named otherwise (by
    config/demo.yaml for exp/demo.yaml, by a/my.yaml for b/my.yaml, or by its run: setting)."""
    if "run" in workflow.config_settings.overwrite_config:
        return config["run"], None
    # the last config file given, or the embedded default (named by the schema: demo)
    given = workflow.overwrite_configfiles or []
    files = [os.path.relpath(f) for f in given] or ["config/demo.yaml"]
    # as the schema's run pattern: no separators, no leading dot
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(files[-1]).stem).lstrip(".") or "run"
    name = name if given else config["run"]
    named_by = other_namer(name, files[-1])
    if named_by is not NO_RECORD:
        raise WorkflowError(
            f"run: not set in {', '.join(files)}, so the run would be named {name}; but "
            f"results/{name}/ holds the run named by "
            f"{named_by or 'its run: setting'} (its run.json), made with other settings, "
            f"whose model and evaluation this run would replace. Set run: in {files[-1]} to "
            f"write beside it, or add --config run={name} to replace it."
        )
    if given:
        logger.info(
            f"run: not set in {', '.join(files)}; outputs go to results/{name}/ "
            f"(set run: in the file to choose another name)"
        )
    return name, files[-1]


RUN, NAMED_BY = run_name()
config["run"] = RUN
if RUN == "data":  # the run's files would land among the shared data folders
    raise WorkflowError(
        "run: data is taken: results/data/ holds the data stages' folders, shared by all runs. "
        "Name the run otherwise (run: in your config file, or --config run=NAME)."
    )
RESULTS = f"results/{RUN}"
if os.path.exists(RESULTS) and not os.path.isdir(RESULTS):  # a file of the user's: kept
    raise WorkflowError(
        f"run: {RUN} writes to {RESULTS}/, but {RESULTS} is a file. Name the run otherwise "
        "(run: in your config file, or --config run=NAME), or move the file."
    )
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"


# Settings a model may change when it continues another (train.init_from): regularisation only.
# Every other model setting shapes the weights or what they mean.
ADAPTABLE_MODEL_SETTINGS = ("dropout", "attn_dropout")
PARENT_FILES = ("best_model.pt", "args.json", "vocab.json", "genes.tsv")


def parent_model():
    """train.init_from, checked before any job: a model folder whose size this run's model:
    matches (and whose n_bins normalize_bin uses). None when the run starts from scratch."""
    folder = config["train"]["init_from"]
    if not folder:
        return None
    missing = [name for name in PARENT_FILES if not (Path(folder) / name).is_file()]
    if missing:
        raise WorkflowError(
            f"train.init_from: {folder} is not a trained model folder (it lacks "
            f"{', '.join(missing)}); give the folder a pretrain run wrote, e.g. "
            "results/demo/model"
        )
    parent = json.loads((Path(folder) / "args.json").read_text())["model"]
    differ = [
        f"model.{key}: {config['model'][key]!r} here, {parent[key]!r} in {folder}"
        for key in config["model"]
        if key not in ADAPTABLE_MODEL_SETTINGS and key in parent
        if config["model"][key] != parent[key]
    ]
    if config["normalize_bin"]["n_bins"] != parent["n_bins"]:
        differ.append(
            f"normalize_bin.n_bins: {config['normalize_bin']['n_bins']} here, "
            f"{parent['n_bins']} in {folder}"
        )
    if differ:
        raise WorkflowError(
            f"train.init_from: {folder} is a model of another shape than this run's:\n  "
            + "\n  ".join(differ)
            + "\nSet these as the model has them (its args.json), or remove train.init_from "
            "to train a new model."
        )
    return folder


PARENT = parent_model()


def parent_files(wildcards):
    """The continued model's files, as inputs: a new model there reruns what used it."""
    return {f"parent_{Path(n).stem}": f"{PARENT}/{n}" for n in PARENT_FILES} if PARENT else {}


def census_input(wildcards):
    """What sample_census reads, as an input: your h5ad, a local store, or nothing (a published
    release, fetched over the network)."""
    source = config["census"]["source"]
    path = {"h5ad": config["census"]["h5ad"]["path"], "uri": config["census"]["uri"]}.get(source)
    if source in ("h5ad", "uri") and not path:
        setting = (
            "census.h5ad.path (your h5ad of raw counts)"
            if source == "h5ad"
            else "census.uri (a local store)"
        )
        own = (workflow.config_settings.overwrite_config.get("census") or {}).get("h5ad")
        raise WorkflowError(
            f"census.source: {source} reads {setting}, which is not set: set it, or choose "
            "another census.source (release, uri, h5ad)"
            + (
                " (a config that gives census.h5ad gives all of it: none of the demo's "
                "description of its own file is kept)"
                if source == "h5ad" and own
                else ""
            )
        )
    if source == "h5ad" and not os.path.isfile(path):
        raise WorkflowError(
            f"census.h5ad.path: {path} is not a file (a relative path is read from the folder "
            f"Snakemake runs in, {os.getcwd()}): give the path of your h5ad of raw counts"
        )
    return {"h5ad": path} if source == "h5ad" else {"store": path} if source == "uri" else {}


def sampling_settings():
    """The census settings that decide which cells are sampled: only the source in use, so
    editing an unused key reruns nothing."""
    census = {
        k: v for k, v in config["census"].items() if k not in ("h5ad", "census_version", "uri")
    }
    if census["source"] == "release":
        census["census_version"] = config["census"]["census_version"]
    elif census["source"] == "uri":
        census["uri"] = census_input(None)["store"]
    else:  # how to read the h5ad's obs and var (the file itself is the input)
        census["h5ad"] = {k: v for k, v in config["census"]["h5ad"].items() if k != "path"}
        census["h5ad_path"] = path = census_input(None)["h5ad"]  # for the folder key:
        # the file's size and time too, so a file replaced at the same path gets new folders
        # rather than rewriting those that other runs' models were trained on
        census["h5ad_file"] = [os.stat(path).st_size, os.stat(path).st_mtime_ns]
    return census


# Where the data stages write: results/data/<rule>-<key>/, the key a digest of the stage's own
# settings and of the folder it reads. Runs with the same sampling and preprocessing share one
# set of files; a run that changes a setting gets new folders from that stage on and never
# overwrites another run's; results/<run>/run.json records which folders a run used.
DATA = "results/data"


def data_folder(name, upstream, settings):
    """results/data/<rule name>-<8 hex digits of (upstream folder, settings)>."""
    text = json.dumps([upstream, settings], sort_keys=True, default=str)
    return f"{DATA}/{name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def vocabulary_settings():
    """select_hvg's settings, or (train.init_from) the continued model's genes.tsv, by content:
    two runs continuing the same model share its vocabulary folder."""
    if not PARENT:
        return config["hvg"]
    genes = (Path(PARENT) / "genes.tsv").read_bytes()
    return {"vocabulary_of_model": hashlib.sha256(genes).hexdigest()}


FOLDERS = {"sample_census": data_folder("sample_census", None, sampling_settings())}
for _name, _upstream, _settings in (
    ("filter_qc", "sample_census", config["qc"]),
    ("select_hvg", "filter_qc", vocabulary_settings()),
    ("normalize_bin", "select_hvg", config["normalize_bin"]),
    ("split", "normalize_bin", config["split"]),
    # how cells are split into files (cells_per_shard) is layout, not identity: left out
    ("tokenize_shards", "split", {}),
):
    FOLDERS[_name] = data_folder(_name, FOLDERS[_upstream], _settings)


def data_log(name):
    return f"{FOLDERS[name]}/{name}.log"


def data_benchmark(name):
    return f"{FOLDERS[name]}/{name}.benchmark.tsv"


def run_benchmarks():
    """Rule -> its benchmark file, for every rule of this run that writes one (run.json)."""
    rules_here = ["pretrain", "training_pca", "embed", "evaluate"]
    rules_here += ["embed_zero_shot"] if PARENT else []
    rules_here += ["evaluate_heldout"] if config["heldout"]["path"] else []
    in_data = {name: data_benchmark(name) for name in FOLDERS}
    return in_data | {name: f"{BENCH}/{name}.tsv" for name in rules_here}


# profiles/slurm ships three values to edit, marked EDIT-ME. Submitted as they are, every job
# would be rejected by SLURM (or charged to a wrong account), so the run stops before any job.
PROFILE_PLACEHOLDER = "EDIT-ME"


def profile_placeholders():
    """'section: rule: resource = value' for every resource still holding a placeholder."""
    settings = workflow.resource_settings
    sections = [("default-resources", settings.default_resources)]
    sections += [
        (f"set-resources: {rule}", resources)
        for rule, resources in settings.overwrite_resources.items()
    ]
    found = []
    for where, resources in sections:
        for name, resource in (resources or {}).items():
            raw = str(getattr(resource, "raw", resource))
            if PROFILE_PLACEHOLDER in raw:
                found.append(f"{where}: {name}: {raw}")
    return found


if profile_placeholders():
    raise WorkflowError(
        "the SLURM profile still holds its placeholders:\n  "
        + "\n  ".join(profile_placeholders())
        + "\nEdit these three values in profiles/slurm/config.yaml before submitting: default-resources "
        "slurm_partition (your CPU partition) and slurm_account (your account; delete the line if your "
        "cluster has none), and set-resources pretrain slurm_partition (your GPU partition). `sinfo -s` "
        "lists the partitions, `sacctmgr show assoc user=$USER format=account` your accounts."
    )


def multi_node_gaps():
    """What set-resources: pretrain lacks for a job on several nodes (docs/cluster.md, "Several
    nodes")."""
    resources = workflow.resource_settings.overwrite_resources.get("pretrain") or {}
    raw = {name: str(getattr(r, "raw", r)).strip("'\"") for name, r in resources.items()}
    nodes = raw.get("nodes", "1")
    if not nodes.isdigit() or int(nodes) <= 1:
        return []
    gaps = []
    if "mpi" not in raw:  # without it the plugin starts the rule with `srun -n1`, on one node only
        gaps.append(
            'mpi: "srun"  (the rule then runs in the batch step and starts torchrun on every node)'
        )
    if raw.get("tasks") != nodes:
        gaps.append(f"tasks: {nodes}  (= nodes: one torchrun per node, sbatch --ntasks)")
    if raw.get("tasks_per_gpu") != "0":
        gaps.append("tasks_per_gpu: 0  (else the plugin derives --ntasks-per-gpu from tasks)")
    return gaps


if multi_node_gaps():
    raise WorkflowError(
        "pretrain asks for several nodes, but set-resources: pretrain: lacks\n  "
        + "\n  ".join(multi_node_gaps())
        + "\nAdd them beside nodes: in the profile (docs/cluster.md, 'Several nodes')."
    )


# Inputs that exist only for some runs (train.init_from, heldout.path).


def zero_shot_inputs(wildcards):
    """train.init_from: the continued model's embedding of these cells, and its training PCA
    where it kept one (the zero-shot baselines of an adapted model)."""
    if not PARENT:
        return {}
    inputs = {"zero_shot": rules.embed_zero_shot.output.h5ad}
    if (Path(PARENT) / "training_pca.npz").exists():
        inputs["parent_pca"] = f"{PARENT}/training_pca.npz"
    return inputs


def heldout_report_inputs(wildcards):
    """The held-out scores and UMAP, only where heldout.path is set (evaluate_heldout exists)."""
    if not config["heldout"]["path"]:
        return {}
    return {
        "heldout_metrics": rules.evaluate_heldout.output.table,
        "heldout_umap": rules.evaluate_heldout.output.umap_cell_type,
        "heldout_per_cell_type": rules.evaluate_heldout.output.per_cell_type,
    }
