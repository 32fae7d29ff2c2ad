"""The QC figure: written as a PNG from filter_qc's per-cell table, with the cells on each side
of each threshold counted as a direct count on the table says, and tables it cannot read
refused with the fix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from scllm.eval.qc_plots import plot_qc
from scllm.prep.qc import CellQC, write_cells_table

N_CELLS = 2_000
MIN_GENES, MAX_MITO = 200, 0.15


def qc_cells(tmp_path, seed=0, mito=True):
    """A per-cell table as filter_qc writes it (sequential criteria), with cells at 0 too;
    returns its path and the arrays it holds."""
    rng = np.random.default_rng(seed)
    n_genes = np.rint(np.exp(rng.normal(6.0, 0.8, N_CELLS))).astype(np.int64)
    n_genes[:7] = 0
    totals = np.rint(n_genes * rng.gamma(4, 0.6, N_CELLS))
    fraction = rng.beta(2, 25, N_CELLS) if mito else np.full(N_CELLS, np.nan)
    fraction[totals == 0] = np.nan
    too_few = n_genes < MIN_GENES
    too_much = ~too_few & (fraction > MAX_MITO) if mito else np.zeros(N_CELLS, bool)
    path = tmp_path / "qc_cells.tsv.gz"
    write_cells_table(CellQC(totals, n_genes, fraction, too_few, too_much).table(), path)
    return path, n_genes, fraction, ~(too_few | too_much)


def test_the_figure_and_its_counts(tmp_path):
    path, n_genes, fraction, passed = qc_cells(tmp_path)
    counts = plot_qc(
        path, tmp_path / "qc.png", min_genes_per_cell=MIN_GENES, max_mito_fraction=MAX_MITO
    )
    image = imread(tmp_path / "qc.png")
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0]  # three panels side by side

    below = sum(1 for g in n_genes.tolist() if g < MIN_GENES)
    above = sum(1 for f in fraction.tolist() if f == f and f > MAX_MITO)  # f == f: not NaN
    assert 0 < below < N_CELLS and 0 < above < N_CELLS  # both lines split the cells
    assert (counts.n_cells, counts.n_passed) == (N_CELLS, int(passed.sum()))
    assert (counts.below_min_genes, counts.above_max_mito) == (below, above)
    assert counts.mito_computed == N_CELLS - 7
    # the legends and the caption give the thresholds with those counts
    assert counts.label("min_genes_per_cell") == f"min_genes_per_cell = 200: {below:,} cells below"
    assert counts.label("max_mito_fraction") == f"max_mito_fraction = 0.15: {above:,} cells above"
    assert counts.describe().startswith(f"{passed.sum():,} of 2,000 cells passed QC; ")


@pytest.mark.parametrize("mito", [True, False], ids=["filter off", "fraction not computed"])
def test_the_mito_panel_without_a_threshold(tmp_path, mito):
    path, n_genes, _, _ = qc_cells(tmp_path, seed=1, mito=mito)
    counts = plot_qc(path, tmp_path / "qc.png", min_genes_per_cell=0, max_mito_fraction=None)
    assert (tmp_path / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert counts.above_max_mito is None and counts.below_min_genes == 0
    assert counts.mito_computed == (N_CELLS - 7 if mito else 0)
    expected = "mitochondrial filter off" if mito else "mitochondrial fraction not computed"
    assert expected in counts.describe()


def test_a_table_lacking_columns_is_refused(tmp_path):
    path, *_ = qc_cells(tmp_path)
    table = pd.read_csv(path, sep="\t").drop(columns=["mito_fraction", "passed"])
    table.to_csv(tmp_path / "old.tsv", sep="\t", index=False)
    with pytest.raises(
        ValueError,
        match=r"old\.tsv lacks the column\(s\) \['mito_fraction', 'passed'\].*rerun filter_qc",
    ):
        plot_qc(
            tmp_path / "old.tsv", tmp_path / "qc.png", min_genes_per_cell=1, max_mito_fraction=None
        )
    assert not (tmp_path / "qc.png").exists()


def test_a_passed_column_that_is_not_true_or_false_is_refused(tmp_path):
    path, *_ = qc_cells(tmp_path)
    table = pd.read_csv(path, sep="\t").assign(passed="yes")
    table.to_csv(tmp_path / "odd.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"column passed must hold True/False.*'yes'"):
        plot_qc(
            tmp_path / "odd.tsv", tmp_path / "qc.png", min_genes_per_cell=1, max_mito_fraction=None
        )
