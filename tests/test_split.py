"""Train/validation split: by cell (seeded fraction) and by whole samples (held-out donors)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scllm.prep.split import assign_split, read_split, split_cells

SIZES = {
    "dsA/d1": 900,
    "dsA/d2": 1400,
    "dsB/d1": 700,
    "dsB/d3": 1100,
    "dsC/d4": 500,
    "dsC/d5": 400,
}


def make_obs(sizes=SIZES) -> pd.DataFrame:
    samples = np.repeat(list(sizes), list(sizes.values()))
    return pd.DataFrame(
        {"sample": pd.Categorical(samples)}, index=[f"c{i}" for i in range(len(samples))]
    )


def test_by_cell_fraction_and_seed():
    obs = make_obs()
    n = len(obs)
    a = assign_split(obs, 0.03, "cell", seed=0)
    assert set(a.unique()) == {"train", "validation"}
    assert list(a.index) == list(obs.index)
    n_val = int((a == "validation").sum())
    assert abs(n_val - 0.03 * n) <= 1
    # validation cells come from across the data, not a contiguous block
    val_rows = np.flatnonzero(a.to_numpy() == "validation")
    assert val_rows.max() - val_rows.min() > n / 2
    assert obs["sample"][a == "validation"].nunique() == len(SIZES)

    b = assign_split(obs, 0.03, "cell", seed=0)
    c = assign_split(obs, 0.03, "cell", seed=1)
    pd.testing.assert_series_equal(a, b)
    assert (a != c).any()
    assert (c == "validation").sum() == n_val


def test_by_cell_tiny_data_keeps_both_sets():
    obs = make_obs({"s": 5})
    a = assign_split(obs, 0.03, "cell", seed=0)
    assert (a == "validation").sum() == 1 and (a == "train").sum() == 4


@pytest.mark.parametrize("seed", range(6))
def test_by_sample_holds_out_whole_samples(seed):
    obs = make_obs()
    split = assign_split(obs, 0.1, "sample", seed=seed)
    table = pd.DataFrame({"sample": obs["sample"].astype(str), "split": split})
    per_sample = table.groupby("sample")["split"].nunique()
    assert (per_sample == 1).all()  # no sample in both splits
    val_samples = set(table.loc[table.split == "validation", "sample"])
    train_samples = set(table.loc[table.split == "train", "sample"])
    assert val_samples and train_samples and not (val_samples & train_samples)
    assert val_samples | train_samples == set(SIZES)


def test_by_sample_seeded():
    obs = make_obs()
    held = [
        frozenset(obs["sample"][assign_split(obs, 0.1, "sample", seed=s) == "validation"])
        for s in range(8)
    ]
    assert held[0] == frozenset(
        obs["sample"][assign_split(obs, 0.1, "sample", seed=0) == "validation"]
    )
    assert len(set(held)) > 1


def test_by_sample_with_two_samples_keeps_one_for_training():
    obs = make_obs({"a": 10, "b": 10})
    split = assign_split(obs, 0.9, "sample", seed=0)
    assert (split == "train").sum() == 10 and (split == "validation").sum() == 10


def test_by_sample_needs_two_samples():
    with pytest.raises(ValueError, match=r"split\.by"):
        assign_split(make_obs({"only": 50}), 0.03, "sample", seed=0)


def test_unknown_by():
    with pytest.raises(ValueError, match=r"split\.by"):
        assign_split(make_obs(), 0.03, "donor", seed=0)


def test_split_cells_writes_table_in_cell_order(tmp_path):
    obs = make_obs({"s0": 40, "s1": 60})
    adata = ad.AnnData(X=sp.csr_matrix((len(obs), 3), dtype=np.uint8), obs=obs)
    adata.write_h5ad(tmp_path / "binned.h5ad")
    split_cells(
        tmp_path / "binned.h5ad",
        tmp_path / "split.tsv",
        validation_fraction=0.1,
        by="sample",
        seed=2,
    )
    table = read_split(tmp_path / "split.tsv")
    assert list(table.columns) == ["cell", "sample", "split"]
    assert list(table["cell"]) == list(obs.index)
    assert list(table["sample"]) == list(obs["sample"].astype(str))
    assert table.groupby("sample")["split"].nunique().max() == 1
    assert set(table["split"]) == {"train", "validation"}
