"""sample_census on a synthetic local Census-shaped store, and open_census offline."""

from __future__ import annotations

import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scllm.prep.census import CensusUnavailableError, open_census, sample_census
from scllm.prep.store import build_local_census

from conftest import synthetic_source

CAP = 90


def eligible_counts(obs: pd.DataFrame) -> pd.Series:
    obs = obs.astype({"dataset_id": str, "donor_id": str, "tissue_general": str, "disease": str})
    m = obs[
        (obs.tissue_general == "blood")
        & obs.is_primary_data.astype(bool)
        & (obs.disease == "normal")
    ]
    return m.groupby(["dataset_id", "donor_id"]).size()


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    root = tmp_path_factory.mktemp("census")
    src = synthetic_source()
    h5ad = root / "source.h5ad"
    src.write_h5ad(h5ad)
    uri = root / "soma"
    build_local_census(h5ad, uri)
    return src, uri, root


def run_sample(census, tmp_path, seed, max_cells=CAP, name=None):
    _, uri, _ = census
    name = name or f"s{seed}_{max_cells}"
    out_h5ad, out_tsv = tmp_path / f"{name}.h5ad", tmp_path / f"{name}.tsv"
    sample_census(
        out_h5ad,
        out_tsv,
        uri=str(uri),
        max_cells=max_cells,
        seed=seed,
        disease="normal",
        chunk_size=16,
    )
    cells = ad.read_h5ad(out_h5ad)
    samples = pd.read_csv(out_tsv, sep="\t", dtype={"dataset_id": str, "donor_id": str})
    return cells, samples


def chosen_set(cells: ad.AnnData) -> set[tuple[str, str]]:
    return set(zip(cells.obs["dataset_id"].astype(str), cells.obs["donor_id"].astype(str)))


def test_sample_census_takes_whole_eligible_samples(census, tmp_path):
    src, _, _ = census
    cells, samples = run_sample(census, tmp_path, seed=0)
    eligible = eligible_counts(src.obs)
    assert len(eligible) == 7  # dsB/d3 (not primary) and dsC/d6 (lung) are not eligible
    obs = cells.obs

    # the filter: blood, primary, normal only
    assert (obs["tissue_general"].astype(str) == "blood").all()
    assert obs["is_primary_data"].astype(bool).all()
    assert (obs["disease"].astype(str) == "normal").all()

    # the cap holds, and the selection is not trivially empty or everything
    assert 0 < cells.n_obs <= CAP
    assert 1 <= len(chosen_set(cells)) < len(eligible)

    # every chosen sample is whole: all its eligible cells of the source, none missing
    per_sample = obs.groupby([obs["dataset_id"].astype(str), obs["donor_id"].astype(str)]).size()
    for key, n in per_sample.items():
        assert n == eligible[key], key
    # greedy "keep if it still fits": no left-out eligible sample would still fit under the cap
    for key, n in eligible.items():
        if key not in per_sample.index:
            assert cells.n_obs + n > CAP, f"{key} ({n} cells) fits but was left out"

    # samples.tsv lists every eligible sample once, with its count and chosen flag
    listed = samples.set_index(["dataset_id", "donor_id"])
    assert sorted(listed.index) == sorted(eligible.index)
    for key, n in eligible.items():
        assert listed.loc[key, "n_cells"] == n
        assert bool(listed.loc[key, "chosen"]) == (key in per_sample.index)
    # donor 'd1' of different datasets: separate samples
    assert {k for k in listed.index if k[1] == "d1"} == {
        ("dsA", "d1"),
        ("dsB", "d1"),
        ("dsC", "d1"),
    }

    # each sample's cells form one contiguous block of rows
    label = obs["sample"].astype(str).to_numpy()
    runs = label[np.r_[True, label[1:] != label[:-1]]]
    assert len(runs) == len(set(runs)) == len(per_sample)
    np.testing.assert_array_equal(
        label, obs["dataset_id"].astype(str) + "/" + obs["donor_id"].astype(str)
    )


def test_sample_census_counts_equal_source_rows(census, tmp_path):
    src, _, _ = census
    cells, _ = run_sample(census, tmp_path, seed=0)
    source_row = pd.Series(np.arange(src.n_obs), index=src.obs["observation_joinid"].values)
    rows = source_row.loc[cells.obs["observation_joinid"].astype(str).values].to_numpy()
    assert len(np.unique(rows)) == cells.n_obs
    np.testing.assert_array_equal(cells.X.toarray(), src.X[rows].toarray())
    # cell metadata follows the cell
    for col in ("dataset_id", "donor_id", "cell_type"):
        np.testing.assert_array_equal(cells.obs[col].astype(str).values, src.obs[col].values[rows])
    # genes keyed on Ensembl ids without version suffixes, in source order, names kept
    expected_ids = [g.split(".")[0] for g in src.var["gene_ids"]]
    assert list(cells.var_names) == expected_ids
    assert list(cells.var["feature_id"]) == expected_ids
    assert list(cells.var["feature_name"]) == list(src.var_names)
    # a cell's id across releases: (dataset_id, observation_joinid)
    assert list(cells.obs_names) == [
        f"{d}:{j}" for d, j in zip(cells.obs["dataset_id"], cells.obs["observation_joinid"])
    ]
    info = cells.uns["census"]
    assert int(info["seed"]) == 0 and int(info["max_cells"]) == CAP
    assert "blood" in info["value_filter"] and "normal" in info["value_filter"]


def test_sample_census_seeded(census, tmp_path):
    a, _ = run_sample(census, tmp_path, seed=0, name="a")
    b, _ = run_sample(census, tmp_path, seed=0, name="b")
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    for seed in range(1, 8):
        other, _ = run_sample(census, tmp_path, seed=seed)
        if chosen_set(other) != chosen_set(a):
            assert other.n_obs <= CAP
            break
    else:
        pytest.fail("seeds 1..7 all chose the same samples as seed 0")


def test_cap_below_every_sample(census, tmp_path):
    with pytest.raises(ValueError, match=r"census\.max_cells"):
        run_sample(census, tmp_path, seed=0, max_cells=3)
    assert not (tmp_path / "s0_3.h5ad").exists()


def test_build_rejects_non_integer_counts(tmp_path):
    src = synthetic_source()
    src.X = src.X.copy()
    src.X.data[5] = 0.5  # a normalized value
    src.write_h5ad(tmp_path / "norm.h5ad")
    with pytest.raises(ValueError, match="raw counts"):
        build_local_census(tmp_path / "norm.h5ad", tmp_path / "soma")
    assert not (tmp_path / "soma").exists()


def test_build_rejects_var_without_ensembl_ids(tmp_path):
    src = synthetic_source()
    src.var = pd.DataFrame(index=[f"GENE{i}" for i in range(src.n_vars)])  # symbols only
    src.write_h5ad(tmp_path / "symbols.h5ad")
    with pytest.raises(ValueError, match="Ensembl ids"):
        build_local_census(tmp_path / "symbols.h5ad", tmp_path / "soma")


def test_open_census_offline_is_clear_and_quick():
    t0 = time.time()
    with pytest.raises(CensusUnavailableError) as err:
        open_census(version="2025-01-30")
    assert time.time() - t0 < 30
    message = str(err.value)
    assert "cannot be reached" in message
    assert "snakemake --cores" in message


def test_open_census_missing_local_store(tmp_path):
    with pytest.raises(CensusUnavailableError, match="census.uri"):
        open_census(uri=str(tmp_path / "nowhere"))
