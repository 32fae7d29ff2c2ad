"""How a run was made: ``results/<run>/run.json`` holds the resolved config, the data folders the
run read (shared with other runs that sampled and preprocessed alike), the code's commit and the
package versions, and where each rule's time and memory were recorded.

No torch here: the record is written in the data environment.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from scllm.files import atomic_path

log = logging.getLogger("scllm")

# The packages whose versions decide a run's numbers (absent ones are recorded as null).
RECORDED_PACKAGES = (
    "scllm-pretrain",
    "snakemake",
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "anndata",
    "scanpy",
    "scikit-learn",
    "h5py",
    "tiledbsoma",
    "cellxgene-census",
)


def package_versions(names=RECORDED_PACKAGES) -> dict:
    """Installed versions of ``names``.

    Parameters
    ----------
    names : iterable of str
        Distribution names.

    Returns
    -------
    dict
        name -> version string, or None where the package is not installed here.
    """
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_commit(folder: str | Path) -> tuple[str | None, bool | None]:
    """The git commit of the code in ``folder``, and whether it has uncommitted changes.

    Parameters
    ----------
    folder : str or Path
        The workflow's folder.

    Returns
    -------
    tuple
        (commit hash, dirty), or (None, None) where the folder is not a git checkout or git is
        not installed. Files under results/ do not count as changes.
    """

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(changes)


def write_run_record(path: str | Path, *, config: dict, data: dict, benchmarks: dict, code_folder):
    """Write ``run.json``: what a run was made from, for its report and for people.

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
    code_folder : str or Path
        The workflow's folder, whose git commit is recorded.

    Returns
    -------
    dict
        The record as written.
    """
    commit, dirty = source_commit(code_folder)
    record = {
        "run": config.get("run"),
        "config": config,
        "data": dict(data),
        "commit": commit,
        "dirty": dirty,
        "versions": package_versions(),
        "python": platform.python_version(),
        "benchmarks": dict(benchmarks),
    }
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, default=str) + "\n")
    log.info(
        "run_record: run %s reads %d data folders (%s); commit %s%s",
        record["run"],
        len(data),
        ", ".join(Path(folder).name for folder in data.values()),
        commit or "unknown",
        " with uncommitted changes" if dirty else "",
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
    workdir = run_folder.resolve().parents[1]  # results/<run> -> the workflow's folder
    return {name: workdir / folders[rule] / file for name, (rule, file) in DATA_FILES.items()}
