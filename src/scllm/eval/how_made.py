"""The report's "How this run was made": the run record (``results/<run>/run.json``: resolved
config, commit, package versions, data folders, benchmark files) and what each rule cost, read
from Snakemake's benchmark files (seconds and peak memory per rule).

The run record's fields: ``run`` (str), ``config`` (the resolved config), ``commit`` (str or
null), ``dirty`` (bool or null), ``versions`` ({package: version}), ``python`` (str), ``data``
({stage: folder}), ``benchmarks`` ({rule: path of its benchmark TSV, relative to the working
directory Snakemake ran in, or absolute}).
"""

from __future__ import annotations

import datetime
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

RECORD_FIELDS = ("run", "config", "commit", "dirty", "versions", "python", "data", "benchmarks")


def read_run_record(path) -> dict:
    """The run record, checked for its fields.

    Parameters
    ----------
    path : path
        ``results/<run>/run.json``.

    Returns
    -------
    dict
        Its contents.

    Raises
    ------
    ValueError
        When it is not a JSON object or lacks a field (the rule that writes it is older than
        this report: rerun it with ``--forcerun``).
    """
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); delete it and rerun the workflow"
        ) from err
    missing = [
        name for name in RECORD_FIELDS if not isinstance(record, dict) or name not in record
    ]
    if missing:
        raise ValueError(
            f"{path} lacks {', '.join(missing)}: it was written by an older rule; rerun it "
            "(snakemake --forcerun on the rule that writes run.json)"
        )
    return record


def benchmark_table(benchmarks: dict) -> pd.DataFrame:
    """Time and peak memory of each rule, from Snakemake's benchmark files.

    Parameters
    ----------
    benchmarks : dict
        Rule -> path of its benchmark TSV (columns ``s``, ``h:m:s``, ``max_rss`` in MB, ...;
        one row per repeat, averaged here). Relative paths are read from the working directory.

    Returns
    -------
    pandas.DataFrame
        Columns rule, seconds, time (h:m:s), max_rss_mb (NaN when not measured: a rule that
        ended before Snakemake's first memory sample), status ("ran", "not run": no file,
        "unreadable": a file without those columns).
    """
    rows = []
    for rule, path in benchmarks.items():
        row = {"rule": rule, "seconds": np.nan, "time": "", "max_rss_mb": np.nan}
        if not Path(path).is_file():
            rows.append({**row, "status": "not run"})
            continue
        try:
            table = pd.read_csv(path, sep="\t")
            seconds = pd.to_numeric(table["s"], errors="coerce").mean()
            rss = pd.to_numeric(table["max_rss"], errors="coerce").max()
        except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError):
            rows.append({**row, "status": "unreadable"})
            continue
        clock = str(datetime.timedelta(seconds=round(seconds))) if np.isfinite(seconds) else ""
        rows.append(
            {"rule": rule, "seconds": seconds, "time": clock, "max_rss_mb": rss, "status": "ran"}
        )
    return pd.DataFrame(rows, columns=["rule", "seconds", "time", "max_rss_mb", "status"])


def _benchmark_html(table: pd.DataFrame, shared: set) -> str:
    """The time and memory table; ``shared``: the data stages, whose folders other runs with the
    same settings share (their time is that of whoever made them first)."""

    def number(value, digits: int) -> str:
        return f"{value:,.{digits}f}" if np.isfinite(value) else "n/a"

    body = []
    for r in table.itertuples():
        name = html.escape(r.rule) + (" <i>(shared data folder)</i>" if r.rule in shared else "")
        if r.status != "ran":
            body.append(f"<tr><td>{name}</td><td colspan='3'>{r.status}</td></tr>")
            continue
        body.append(
            f"<tr><td>{name}</td><td>{number(r.seconds, 1)}</td>"
            f"<td>{r.time}</td><td>{number(r.max_rss_mb, 0)}</td></tr>"
        )
    ran = table[table["status"] == "ran"]
    own = ran[~ran["rule"].isin(shared)]
    # the run's own rules, then with the data stages, which another run may have paid for
    for label, rows in (("this run's own rules", own), ("with the shared data stages", ran)):
        total = rows["seconds"].sum()
        largest = rows["max_rss_mb"].max() if len(rows) else np.nan
        body.append(
            f"<tr><td><i>{label}</i></td><td>{number(total, 1)}</td>"
            f"<td>{datetime.timedelta(seconds=round(total))}</td>"
            f"<td>{number(largest, 0)} (largest)</td></tr>"
        )
    return (
        "<table><tr><th>rule</th><th>time (s)</th><th>time (h:m:s)</th>"
        f"<th>max RSS (MB)</th></tr>{''.join(body)}</table>"
    )


def _two_columns(pairs: dict, left: str, right: str) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in pairs.items()
    )
    return f"<table><tr><th>{left}</th><th>{right}</th></tr>{rows}</table>"


def provenance_section(record: dict) -> tuple[str, str, str]:
    """The report section "How this run was made" from a run record.

    Parameters
    ----------
    record : dict
        ``read_run_record``'s result.

    Returns
    -------
    tuple of str
        Title, caption, HTML content.
    """
    import yaml

    commit = record["commit"] or "unknown (not a git checkout)"
    dirty = {True: "with uncommitted changes", False: "clean"}.get(
        record["dirty"], "state unknown"
    )
    caption = (
        "What produced these results (results/&lt;run&gt;/run.json): the code's commit, the "
        "software versions, the resolved configuration, the data folders, and what each rule "
        "cost, from Snakemake's benchmark files: wall-clock time and peak memory (max RSS, the "
        "most resident memory the rule's processes held; lower is cheaper). A rule without a "
        "benchmark file is shown as not run. A stage marked shared data folder was computed once "
        "for every run with the same settings: its time is that of the run that made it first."
    )
    config = yaml.safe_dump(record["config"], sort_keys=False, default_flow_style=False)
    content = (
        f"<p>Commit <code>{html.escape(str(commit))}</code> ({dirty}); Python "
        f"{html.escape(str(record['python']))}.</p>"
        + _benchmark_html(benchmark_table(record["benchmarks"]), set(record["data"]))
        + "<details><summary>Package versions</summary>"
        + _two_columns(record["versions"], "package", "version")
        + "</details><details><summary>Data folders</summary>"
        + _two_columns(record["data"], "stage", "folder")
        + "</details><details><summary>Resolved configuration (YAML)</summary>"
        + f"<pre>{html.escape(config)}</pre></details>"
    )
    return "How this run was made", caption, content
