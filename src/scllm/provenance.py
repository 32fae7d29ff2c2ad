"""How a run was made: ``results/<run>/run.json`` holds the resolved config, the data folders the
run read (shared with other runs that sampled and preprocessed alike), the code's commit and the
package versions, and where each rule's time and memory were recorded.

No torch here: the record is written in the data environment.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from scllm.files import atomic_path, software_provenance

log = logging.getLogger("scllm")


def write_run_record(
    path: str | Path, *, config: dict, data: dict, benchmarks: dict, named_by: str | None = None
) -> dict:
    """Write ``run.json``: what a run was made from, for its report and for people.

    The commit and package versions are those of the code and environment writing the record
    (``scllm.files.software_provenance``); under ``--use-conda`` that is the data stages'
    environment, and the model's own are in its ``args.json`` (``provenance``).

    Parameters
    ----------
    path : str or Path
        Where to write (``results/<run>/run.json``).
    config : dict
        The resolved config (defaults filled).
    data : dict
        Data stage rule -> the folder it wrote (results/data/<rule>-<key>).
    benchmarks : dict
        Rule -> its Snakemake benchmark file (time and memory, read by the report).
    named_by : str, optional
        The config file that named the run (relative to the working directory), None where a
        ``run:`` setting did: a config file that sets no ``run:`` and would take this run's
        name is refused unless it is that file.

    Returns
    -------
    dict
        The record as written: ``run``, ``config``, ``data``, ``commit`` (None outside a git
        checkout), ``dirty``, ``versions`` (package -> version, None where not installed),
        ``python``, ``benchmarks`` and ``named_by``.
    """
    software = software_provenance()
    commit = software["git_commit"]
    in_git = not commit.startswith("unknown")
    record = {
        "run": config.get("run"),
        "config": config,
        "data": dict(data),
        "commit": commit.removesuffix("-dirty") if in_git else None,
        "dirty": commit.endswith("-dirty") if in_git else None,
        "versions": {"scllm-pretrain": software["scllm"]}
        | {
            name: None if version == "not installed" else version
            for name, version in software["packages"].items()
        },
        "python": software["python"],
        "benchmarks": dict(benchmarks),
        "named_by": named_by,
    }
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, default=str) + "\n")
    log.info(
        "run_record: run %s reads %d data folders (%s); commit %s",
        record["run"],
        len(data),
        ", ".join(Path(folder).name for folder in data.values()),
        commit,
    )
    return record


# A run's data files: name -> (the rule that writes it, its path in that rule's folder).
DATA_FILES = {
    "cells": ("sample_census", "cells.h5ad"),
    "samples": ("sample_census", "samples.tsv"),
    "filtered": ("filter_qc", "filtered.h5ad"),
    "qc": ("filter_qc", "qc.tsv"),
    "qc_cells": ("filter_qc", "qc_cells.tsv.gz"),
    "hvg": ("select_hvg", "hvg.tsv"),
    "binned": ("normalize_bin", "binned.h5ad"),
    "split": ("split", "split.tsv"),
    "shards": ("tokenize_shards", "shards"),
}


def run_data_files(run_folder: str | Path) -> dict[str, Path]:
    """Where a run's data files are, from its ``run.json``.

    Data stages write to folders shared between runs (``results/data/<rule>-<key>/``); this
    finds the ones a run used.

    Parameters
    ----------
    run_folder : str or Path
        The run's folder, ``results/<run>``.

    Returns
    -------
    dict
        ``cells``, ``samples``, ``filtered``, ``qc``, ``qc_cells``, ``hvg``, ``binned``,
        ``split``, ``shards`` -> path.

    Raises
    ------
    FileNotFoundError
        The folder holds no run.json (the run has not reached its data stages' end).
    """
    run_folder = Path(run_folder)
    record_path = run_folder / "run.json"
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{run_folder} holds no run.json: give a run's folder (results/<run>) whose data "
            "stages have finished (`snakemake --cores 8 --configfile <its config> run_record`)"
        )
    folders = json.loads(record_path.read_text())["data"]
    # results/<run> -> the workflow's folder (absolute, not resolved: results/<run> may be a link)
    workdir = run_folder.absolute().parents[1]
    return {name: workdir / folders[rule] / file for name, (rule, file) in DATA_FILES.items()}


# A data stage's folder, as the workflow names it: results/data/<rule>-<8 hex digits>.
_DATA_FOLDER = re.compile(r"(?P<rule>[a-z_]+)-[0-9a-f]{8}")


def data_folder_use(results: str | Path = "results") -> list[dict]:
    """The data stages' folders under ``results/data/``, their size, and the runs that read them.

    A folder is read by a run when the run's ``run.json`` names it; a folder no run names is
    left from a run since changed or removed, or belongs to a run whose data stages are still
    running (its run.json is written once they end). Folders not named as the workflow names
    its own are not listed.

    Parameters
    ----------
    results : str or Path
        The results folder (``results`` in the workflow's folder).

    Returns
    -------
    list of dict
        One per folder, by rule in pipeline order then name: ``folder`` (Path), ``rule``,
        ``bytes`` (the files in it, all depths) and ``runs`` (names of the runs reading it,
        sorted; empty when none).
    """
    results = Path(results)
    readers: dict[str, list[str]] = {}
    for record_path in sorted(results.glob("*/run.json")):
        try:
            record = json.loads(record_path.read_text())
        except ValueError:  # cut short: its run rewrites it
            continue
        for folder in (record.get("data") or {}).values():
            readers.setdefault(Path(folder).name, []).append(record_path.parent.name)
    order = list(dict.fromkeys(rule for rule, _ in DATA_FILES.values()))
    folders = []
    for path in sorted((results / "data").glob("*")):
        match = _DATA_FOLDER.fullmatch(path.name)
        if not (path.is_dir() and match and match["rule"] in order):
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        runs = sorted(readers.get(path.name, []))
        folders.append({"folder": path, "rule": match["rule"], "bytes": size, "runs": runs})
    return sorted(folders, key=lambda f: (order.index(f["rule"]), f["folder"].name))
