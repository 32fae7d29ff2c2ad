"""The QC plots of a run: per-cell histograms of total counts, genes detected and mitochondrial
fraction from filter_qc's ``qc_cells.tsv.gz``, with the thresholds drawn and the cells that
passed told apart from those removed.

Built for a million cells: the table is read with pandas, binned with NumPy and drawn as step
histograms (no per-cell artists), on matplotlib's Agg canvas without pyplot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scllm.files import atomic_path
from scllm.prep.qc import CELL_COLUMNS

N_BINS = 60
COLORS = {"passed": "#4C72B0", "removed": "#DD8452"}
THRESHOLD_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}


@dataclass(frozen=True)
class QCPlotCounts:
    """What the QC figure shows, in numbers: cells on each side of each threshold line (each
    criterion counted on its own, over every input cell)."""

    n_cells: int
    n_passed: int
    min_genes_per_cell: int
    below_min_genes: int  # cells left of the min_genes_per_cell line
    max_mito_fraction: float | None
    above_max_mito: int | None  # cells right of the max_mito_fraction line; None: filter off
    mito_computed: int  # cells with a mitochondrial fraction

    def label(self, setting: str) -> str:
        """The legend of a threshold line.

        Parameters
        ----------
        setting
            ``"min_genes_per_cell"`` or ``"max_mito_fraction"`` (only when that filter is on).

        Returns
        -------
        str
            The threshold and the cells beyond it, e.g. ``min_genes_per_cell = 200: 61 cells
            below``.
        """
        if setting == "min_genes_per_cell":
            value, n, side = self.min_genes_per_cell, self.below_min_genes, "below"
        else:
            value, n, side = self.max_mito_fraction, self.above_max_mito, "above"
        return f"{setting} = {value:g}: {n:,} cells {side}"

    def describe(self) -> str:
        """A caption for the figure (also its title).

        Returns
        -------
        str
            Cells in and passed, and the cells beyond each threshold (or why there is none).
        """
        parts = [
            f"{self.n_passed:,} of {self.n_cells:,} cells passed QC",
            self.label("min_genes_per_cell"),
        ]
        if self.mito_computed == 0:
            parts.append("mitochondrial fraction not computed (no symbols or no MT- genes)")
        elif self.max_mito_fraction is None:
            parts.append("mitochondrial filter off")
        else:
            parts.append(self.label("max_mito_fraction"))
        return "; ".join(parts)


def read_qc_cells(qc_cells_tsv: str | Path) -> pd.DataFrame:
    """Read filter_qc's per-cell table, refusing one that lacks its columns.

    Parameters
    ----------
    qc_cells_tsv
        ``qc_cells.tsv.gz`` (or an uncompressed TSV) with the columns ``total_counts``,
        ``n_genes``, ``mito_fraction`` and ``passed``.

    Returns
    -------
    pandas.DataFrame
        Those four columns, one row per input cell.
    """
    header = pd.read_csv(qc_cells_tsv, sep="\t", nrows=0).columns
    missing = [c for c in CELL_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{qc_cells_tsv} lacks the column(s) {missing} (it has {list(header)}); the QC plots "
            f"read the per-cell table filter_qc writes ({', '.join(CELL_COLUMNS)}): give its "
            "qc_cells.tsv.gz, or rerun filter_qc (`snakemake --forcerun filter_qc`) to write it"
        )
    table = pd.read_csv(
        qc_cells_tsv,
        sep="\t",
        usecols=list(CELL_COLUMNS),
        dtype={"total_counts": np.float64, "n_genes": np.float64, "mito_fraction": np.float64},
    )
    if table.empty:
        raise ValueError(f"{qc_cells_tsv} holds no cells: rerun filter_qc to write it again")
    if table["passed"].dtype != bool:  # True/False as filter_qc writes it, or 1/0
        if not table["passed"].isin([0, 1]).all():
            raise ValueError(
                f"{qc_cells_tsv}: column passed must hold True/False (or 1/0), not e.g. "
                f"{table['passed'][~table['passed'].isin([0, 1])].iloc[0]!r}; rerun filter_qc "
                "to write the table again"
            )
        table["passed"] = table["passed"].astype(bool)
    return table


def plot_qc(
    qc_cells_tsv: str | Path,
    png_path: str | Path,
    *,
    min_genes_per_cell: int,
    max_mito_fraction: float | None,
) -> QCPlotCounts:
    """Draw the QC histograms of every input cell into a PNG.

    Three panels: total counts per cell and genes detected per cell (log x, with the
    ``min_genes_per_cell`` line), and the mitochondrial fraction with the ``max_mito_fraction``
    line (the panel says so when the filter is off or the fraction was not computed). Cells
    that passed QC and cells removed are drawn in two colours; cells with 0 counts or genes,
    which a log axis cannot show, are counted in the panel.

    Parameters
    ----------
    qc_cells_tsv
        filter_qc's ``qc_cells.tsv.gz``.
    png_path
        Where the figure goes (written whole, or not at all).
    min_genes_per_cell
        The run's ``qc.min_genes_per_cell``.
    max_mito_fraction
        The run's ``qc.max_mito_fraction`` (None: the filter was off).

    Returns
    -------
    QCPlotCounts
        The cells on each side of each threshold line, as the figure's legends give them;
        ``describe()`` makes a caption of them.
    """
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    cells = read_qc_cells(qc_cells_tsv)
    counts = _threshold_counts(cells, min_genes_per_cell, max_mito_fraction)
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_counts, ax_genes, ax_mito = fig.subplots(1, 3)
    _log_histogram(ax_counts, cells, "total_counts", "total counts per cell")
    _log_histogram(ax_genes, cells, "n_genes", "genes detected per cell")
    if min_genes_per_cell > 0:  # 0 is off (and has no place on a log axis)
        ax_genes.axvline(
            min_genes_per_cell, **THRESHOLD_STYLE, label=counts.label("min_genes_per_cell")
        )
    _mito_histogram(ax_mito, cells, counts)
    for ax in (ax_counts, ax_genes, ax_mito):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(counts.describe(), fontsize=10)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return counts


def _threshold_counts(cells: pd.DataFrame, min_genes_per_cell, max_mito_fraction) -> QCPlotCounts:
    mito = cells["mito_fraction"].to_numpy()
    above = None if max_mito_fraction is None else int((mito > max_mito_fraction).sum())
    return QCPlotCounts(
        n_cells=len(cells),
        n_passed=int(cells["passed"].sum()),
        min_genes_per_cell=int(min_genes_per_cell),
        below_min_genes=int((cells["n_genes"] < min_genes_per_cell).sum()),
        max_mito_fraction=max_mito_fraction,
        above_max_mito=above,
        mito_computed=int(np.isfinite(mito).sum()),
    )


def _by_outcome(ax, cells: pd.DataFrame, column: str, edges: np.ndarray) -> None:
    """Step histograms of ``column`` for the cells that passed and those removed."""
    for outcome, mask in (("passed", cells["passed"]), ("removed", ~cells["passed"])):
        values = cells.loc[mask, column].to_numpy()
        hist, _ = np.histogram(values, bins=edges)
        ax.stairs(
            hist,
            edges,
            fill=True,
            alpha=0.6,
            color=COLORS[outcome],
            label=f"{outcome} ({len(values):,} cells)",
        )
    ax.set_ylabel("cells")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)  # room for the legend above the bars


def _title(ax, what: str, notes: list[str]) -> None:
    ax.set_title("\n".join([what, *notes]), fontsize=10)


def _log_histogram(ax, cells: pd.DataFrame, column: str, what: str) -> None:
    """A log-x histogram of a count column; cells at 0 have no place on it and are counted in
    the title."""
    from matplotlib.ticker import NullFormatter

    values = cells[column].to_numpy()
    positive = values > 0
    if positive.any():
        low, high = values[positive].min(), values[positive].max()
        edges = np.geomspace(low, high * 1.001 if high > low else low * 2, N_BINS + 1)
        _by_outcome(ax, cells[positive], column, edges)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels at powers of ten only: legible
    zeros = int((~positive).sum())
    _title(ax, what, [f"{zeros:,} cells at 0 not shown"] if zeros else [])
    ax.set_xlabel(f"{what} (log scale)")


def _mito_histogram(ax, cells: pd.DataFrame, counts: QCPlotCounts) -> None:
    """The mitochondrial fraction, its threshold, or why there is none."""
    what = "mitochondrial fraction per cell"
    ax.set_xlabel("fraction of the cell's counts in MT- genes")
    if counts.mito_computed == 0:
        _title(ax, what, ["not computed: no gene symbols or no MT- genes in the data"])
        ax.set(xticks=[], yticks=[])
        return
    missing = counts.n_cells - counts.mito_computed
    limit = counts.max_mito_fraction
    _title(
        ax,
        what,
        (["max_mito_fraction: off (no cell removed for it)"] if limit is None else [])
        + ([f"{missing:,} cells without counts (no fraction) not shown"] if missing else []),
    )
    computed = cells[np.isfinite(cells["mito_fraction"])]
    high = max(computed["mito_fraction"].max(), limit or 0.0) * 1.05 or 1.0
    _by_outcome(ax, computed, "mito_fraction", np.linspace(0.0, high, N_BINS + 1))
    if limit is not None:
        ax.axvline(limit, **THRESHOLD_STYLE, label=counts.label("max_mito_fraction"))
