"""Bad input: every case stops with an error that names the problem and the fix, and leaves no
artifact behind (neither the output nor its temporary).

Covered elsewhere, not repeated here: non-integer counts and var without Ensembl ids
(test_census.test_build_rejects_*), a cap below every sample
(test_census.test_cap_below_every_sample), a truncated shard
(test_tokens.test_truncated_shard_is_reported), vocab.json vs shards
(test_train.test_vocab_mismatch_names_both_hashes), unknown train settings
(test_train.test_bad_settings_are_rejected), misspelt config keys and wrong types through snakemake
(test_workflow.test_misspelt_config_key_is_rejected / test_invalid_config_value_*), and an offline
Census (test_census.test_open_census_offline_is_clear_and_quick).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from scllm.checks import file_sha256
from scllm.cli import main as cli_main
from scllm.errors import InputError
from scllm.prep import h5ad_source as census_mod
from scllm.prep import store as store_mod
from scllm.prep.binning import normalize_bin
from scllm.prep.census import CensusUnavailableError, open_census, sample_census
from scllm.prep.hvg import select_hvg
from scllm.prep.qc import filter_qc
from scllm.prep.split import split_cells
from scllm.prep.store import build_local_census
from scllm.shards import read_shard, write_shard
from scllm.tokens import build_vocab, vocab_sha256
from scllm.train.loop import pretrain

from conftest import TINY_MODEL, TINY_TRAIN, synthetic_source, write_synthetic_shards

REPO = Path(__file__).resolve().parents[1]


def leftovers(directory: Path, *names: str) -> list[str]:
    """Outputs or temporaries (.NAME.tmpPID) of ``names`` present in ``directory``."""
    found = [n for n in names if (directory / n).exists()]
    return found + [p.name for n in names for p in directory.glob(f".{n}.tmp*")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    synthetic_source().write_h5ad(root / "source.h5ad")
    build_local_census(root / "source.h5ad", root / "soma")
    return root / "soma"


@pytest.fixture(scope="module")
def cells_h5ad(store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cells")
    sample_census(
        root / "cells.h5ad", root / "samples.tsv", uri=str(store), max_cells=1000, chunk_size=16
    )
    return root / "cells.h5ad"


def sample(store, out: Path, **kwargs):
    return sample_census(
        out / "cells.h5ad", out / "samples.tsv", uri=str(store), chunk_size=16, **kwargs
    )


# --- the input h5ad and the Census ---------------------------------------------------------------


def test_negative_counts_in_a_layer_name_the_layer_setting(tmp_path):
    src = synthetic_source()
    src.layers["counts"] = src.X.copy()
    src.layers["counts"].data[3] = -2
    src.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(ValueError, match="non-negative integer counts") as err:
        build_local_census(tmp_path / "in.h5ad", tmp_path / "soma", counts_layer="counts")
    assert "layers['counts']" in str(err.value) and "census.h5ad.counts_layer" in str(err.value)
    with pytest.raises(
        ValueError, match=r"no layer 'raw'.*census\.h5ad\.counts_layer.*\['counts'\]"
    ):
        build_local_census(tmp_path / "in.h5ad", tmp_path / "soma", counts_layer="raw")
    assert leftovers(tmp_path, "soma") == []


def test_non_integer_counts_in_a_store_stop_sampling_midway(tmp_path, monkeypatch):
    """A store not built by build-census: the Census reader checks every block it streams."""
    src = synthetic_source()
    blood = (src.obs["tissue_general"] == "blood").to_numpy()
    dense = src.X.toarray()
    dense[np.flatnonzero(blood)[-3], 0] = 0.5  # late in the file: blocks are written before it
    src.X = sp.csr_matrix(dense)
    src.write_h5ad(tmp_path / "norm.h5ad")
    with monkeypatch.context() as m:
        m.setattr(store_mod, "check_counts", lambda *a, **k: None)
        build_local_census(tmp_path / "norm.h5ad", tmp_path / "soma")
    with pytest.raises(
        ValueError, match="Census X/raw holds values that are not non-negative integer counts"
    ):
        sample(tmp_path / "soma", tmp_path, max_cells=1000, disease=None, primary_only=False)
    assert leftovers(tmp_path, "cells.h5ad", "samples.tsv") == []


def test_missing_obs_columns_are_named(tmp_path, monkeypatch, capsys):
    src = synthetic_source()
    src.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(
        ValueError, match=r"no column 'patient' \(census\.h5ad\.donor_column.*available"
    ):
        build_local_census(tmp_path / "in.h5ad", tmp_path / "soma", donor_column="patient")
    with pytest.raises(ValueError, match=r"no column 'label' \(census\.h5ad\.cell_type_column"):
        build_local_census(tmp_path / "in.h5ad", tmp_path / "soma", cell_type_column="label")
    assert leftovers(tmp_path, "soma") == []
    # Each caller names its own setting, and a near miss gets the column meant.
    available = "available: ['cell_type', 'dataset_id', 'disease', 'donor_id', "
    available += "'is_primary_data', 'observation_joinid', 'tissue_general']"
    stage, cli = sample_stage_and_cli_errors(tmp_path, capsys, "cell_type_column", "celltype")
    assert stage == (
        f"obs has no column 'celltype' (census.h5ad.cell_type_column); {available}. "
        "Did you mean 'cell_type'?"
    )
    assert cli == (
        "scllm build-census: error: obs has no column 'celltype' (--cell-type-column); "
        f"{available}. Did you mean 'cell_type'?\n"
    )
    assert leftovers(tmp_path, "soma", "cells.h5ad", "s.tsv") == []

    # A Census-shaped store without donor_id (as a hand-made store might be).
    shaped = store_mod.census_shaped
    with monkeypatch.context() as m:
        m.setattr(store_mod, "census_shaped", lambda *a: _drop_obs(shaped(*a), "donor_id"))
        build_local_census(tmp_path / "in.h5ad", tmp_path / "soma")
    with pytest.raises(ValueError, match=r"lacks columns \['donor_id'\].*scllm build-census"):
        sample(tmp_path / "soma", tmp_path, max_cells=1000)
    assert leftovers(tmp_path, "cells.h5ad", "samples.tsv") == []


def _drop_obs(shaped: tuple, column: str) -> tuple:
    obs, var, matrix = shaped
    return obs.drop(columns=[column]), var, matrix


def test_pipeline_h5ad_without_sample_column(cells_h5ad, tmp_path):
    adata = ad.read_h5ad(cells_h5ad)
    del adata.obs["sample"]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(ValueError, match=r"no obs column\(s\) \['sample'\].*rerun sample_census"):
        filter_qc(
            tmp_path / "cells.h5ad",
            tmp_path / "filtered.h5ad",
            tmp_path / "qc.tsv",
            min_genes_per_cell=1,
        )
    assert leftovers(tmp_path, "filtered.h5ad", "qc.tsv") == []


def test_explicit_gene_id_column_without_ensembl_ids(tmp_path):
    src = synthetic_source()
    src.var["symbol"] = src.var_names
    src.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(
        ValueError, match=r"var\['symbol'\] \(census\.h5ad\.gene_id_column\) does not hold Ensembl"
    ):
        build_local_census(tmp_path / "in.h5ad", tmp_path / "soma", gene_id_column="symbol")
    assert leftovers(tmp_path, "soma") == []
    # scllm build-census names its own flag
    with pytest.raises(ValueError, match=r"var\['symbol'\] \(--gene-id-column\) does not hold"):
        build_local_census(
            tmp_path / "in.h5ad", tmp_path / "soma", gene_id_column="symbol", flags=True
        )


def sample_stage_and_cli_errors(tmp_path, capsys, field: str, value: str) -> tuple[str, str]:
    """The refusals of in.h5ad with one census.h5ad setting: by the workflow's sample stage
    (sample_h5ad), and by scllm build-census with the flag (what it prints)."""
    with pytest.raises(ValueError) as err:
        census_mod.sample_h5ad(
            tmp_path / "in.h5ad", tmp_path / "cells.h5ad", tmp_path / "s.tsv", **{field: value}
        )
    flag = "--" + field.replace("_", "-")
    h5ad, out = str(tmp_path / "in.h5ad"), str(tmp_path / "soma")
    assert cli_main(["build-census", h5ad, out, flag, value]) == 1
    return str(err.value), capsys.readouterr().err


def test_a_gene_id_column_var_lacks_names_the_setting_and_the_column_meant(tmp_path, capsys):
    synthetic_source().write_h5ad(tmp_path / "in.h5ad")
    stage, cli = sample_stage_and_cli_errors(tmp_path, capsys, "gene_id_column", "gene_id")
    assert stage == (
        "var has no column 'gene_id' (census.h5ad.gene_id_column); available: ['gene_ids']. "
        "Did you mean 'gene_ids'? Name a var column of Ensembl ids (ENSG...), or set "
        "census.h5ad.gene_id_column to null to detect the id column."
    )
    assert cli == (
        "scllm build-census: error: var has no column 'gene_id' (--gene-id-column); available: "
        "['gene_ids']. Did you mean 'gene_ids'? Name a var column of Ensembl ids (ENSG...), or "
        "leave out --gene-id-column to detect the id column.\n"
    )
    assert leftovers(tmp_path, "soma", "cells.h5ad", "s.tsv") == []


def test_unknown_organism(store, tmp_path):
    with pytest.raises(ValueError, match=r"census\.organism='mus_musculus'.*homo_sapiens"):
        sample(store, tmp_path, organism="mus_musculus")
    assert leftovers(tmp_path, "cells.h5ad", "samples.tsv") == []


def test_unknown_census_version_is_named(monkeypatch):
    """Offline an unknown release cannot be told from no network, so the release directory is
    faked: cellxgene_census' own open_soma then raises its ValueError for an unlisted version."""
    import cellxgene_census._open as census_open

    def description(version):  # the real function, minus the download of the directory
        directory = {
            "2025-01-30": {
                "soma": {
                    "uri": "s3://cellxgene-census-public-us-west-2/cell-census/2025-01-30/soma/"
                }
            }
        }
        if version not in directory:
            raise ValueError(f"Unable to locate Census version: {version}.")
        return directory[version]

    monkeypatch.setattr(
        census_open,
        "_get_census_mirrors",
        lambda: {
            "default": "AWS-S3-us-west-2",
            "AWS-S3-us-west-2": {
                "provider": "S3",
                "base_uri": "s3://cellxgene-census-public-us-west-2/",
                "region": "us-west-2",
            },
        },
    )
    monkeypatch.setattr(census_open, "get_census_version_description", description)
    with pytest.raises(CensusUnavailableError) as err:
        open_census(version="2031-02-30")
    message = str(err.value)
    assert "census.census_version='2031-02-30' is not a Census release" in message
    assert "get_census_version_directory()" in message and "2025-01-30" in message  # the fix
    assert isinstance(err.value.__cause__, ValueError)


def test_config_schema_rejects_misspelt_keys_and_moving_versions():
    """The checks snakemake runs before any job (the workflow tests run them through snakemake)."""
    from snakemake.utils import validate

    def check(**overrides):
        config = yaml.safe_load((REPO / "config/demo.yaml").read_text())
        for section, value in overrides.items():
            config[section] = (
                {**config.get(section, {}), **value} if isinstance(value, dict) else value
            )
        validate(config, str(REPO / "config/schema.yaml"))

    check()  # the embedded default is valid
    with pytest.raises(Exception, match="'censsu' was unexpected"):
        check(censsu={"max_cells": 5})
    with pytest.raises(Exception, match="'max_cell' was unexpected"):
        check(census={"max_cell": 5})
    with pytest.raises(
        Exception, match=r"(?s)'stable' does not match.*census_version.*dated Census release"
    ):
        check(census={"census_version": "stable"})
    with pytest.raises(Exception, match="'epoch' was unexpected"):
        check(train={"epoch": 3})


def test_unknown_model_setting(tmp_path):
    manifest = write_synthetic_shards(tmp_path / "shards", n_train=8, n_val=2)
    with pytest.raises(
        ValueError, match=r"unknown model settings \['n_layer'\]; known: .*'n_layers'"
    ):
        pretrain(manifest, tmp_path / "run", {**TINY_MODEL, "n_layer": 3}, TINY_TRAIN)
    assert not (tmp_path / "run").exists()


# --- empty selections ----------------------------------------------------------------------------


def test_census_filter_matching_nothing(store, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"no cells match the Census filter \[tissue_general == 'brain'"
        r".*census\.tissue_general",
    ):
        sample(store, tmp_path, tissue_general="brain")
    with pytest.raises(ValueError, match="census.tissue_general/disease"):
        sample(store, tmp_path, disease="influenza")
    assert leftovers(tmp_path, "cells.h5ad", "samples.tsv") == []


def test_qc_removing_everything(cells_h5ad, tmp_path):
    outputs = (tmp_path / "filtered.h5ad", tmp_path / "qc.tsv")
    with pytest.raises(
        ValueError,
        match=r"no cell expresses >= qc\.min_genes_per_cell=1000.*lower qc\.min_genes_per_cell",
    ):
        filter_qc(cells_h5ad, *outputs, min_genes_per_cell=1000, chunk_size=16)
    with pytest.raises(
        ValueError, match=r"qc\.min_gene_counts=1000000000 .*; lower qc\.min_gene_counts"
    ):
        filter_qc(cells_h5ad, *outputs, min_gene_counts=10**9, chunk_size=16)
    assert leftovers(tmp_path, "filtered.h5ad", "qc.tsv") == []


def test_hvg_and_binning_with_nothing_left(cells_h5ad, tmp_path):
    with pytest.raises(
        ValueError, match=r"no sample could be used.*lower hvg\.min_cells_per_sample"
    ):
        select_hvg(cells_h5ad, tmp_path / "hvg.tsv", n_top_genes=10, min_cells_per_sample=10_000)
    assert leftovers(tmp_path, "hvg.tsv") == []
    features = ad.read_h5ad(cells_h5ad, backed="r").var
    pd.DataFrame(
        {
            "feature_id": features.index[:10],
            "feature_name": features["feature_name"][:10],
            "rank": range(10),
        }
    ).to_csv(tmp_path / "hvg.tsv", sep="\t", index=False)
    with pytest.raises(
        ValueError,
        match=r"normalize_bin\.min_expressed_hvgs=11 .*lower normalize_bin\.min_expressed_hvgs",
    ):
        normalize_bin(
            cells_h5ad,
            tmp_path / "hvg.tsv",
            tmp_path / "binned.h5ad",
            min_expressed_hvgs=11,
            chunk_size=16,
        )
    assert leftovers(tmp_path, "binned.h5ad") == []


# --- damaged files -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_h5ad(cells_h5ad, tmp_path, damage):
    data = cells_h5ad.read_bytes()
    broken = {
        "truncated": data[: len(data) // 2],
        "garbage": b"not an h5ad\n" * 100,
        "empty": b"",
    }[damage]
    (tmp_path / "cells.h5ad").write_bytes(broken)
    # a stage reading the pipeline's own file
    with pytest.raises(
        ValueError, match=r"cannot open .*cells\.h5ad as h5ad.*rerun the stage that writes it"
    ):
        filter_qc(tmp_path / "cells.h5ad", tmp_path / "filtered.h5ad", tmp_path / "qc.tsv")
    with pytest.raises(ValueError, match="cannot open"):
        split_cells(tmp_path / "cells.h5ad", tmp_path / "split.tsv")
    assert leftovers(tmp_path, "filtered.h5ad", "qc.tsv", "split.tsv") == []
    # the user's own input
    with pytest.raises(ValueError, match=r"cannot read .*cells\.h5ad as h5ad.*export it again"):
        build_local_census(tmp_path / "cells.h5ad", tmp_path / "soma")
    assert leftovers(tmp_path, "soma") == []


def test_a_missing_pipeline_h5ad_is_named_missing(tmp_path):
    missing = tmp_path / "cells.h5ad"
    with pytest.raises(InputError) as err:
        filter_qc(missing, tmp_path / "filtered.h5ad", tmp_path / "qc.tsv")
    assert str(err.value) == f"{missing} does not exist; rerun the stage that writes it"
    assert leftovers(tmp_path, "filtered.h5ad", "qc.tsv") == []


def test_missing_input_h5ad(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"census\.h5ad\.path"):
        build_local_census(tmp_path / "nowhere.h5ad", tmp_path / "soma")
    # scllm build-census: its own argument, no config key
    missing = tmp_path / "nowhere.h5ad"
    with pytest.raises(FileNotFoundError) as err:
        build_local_census(missing, tmp_path / "soma", flags=True)
    assert str(err.value) == f"no h5ad at {missing}; check the path"


def test_truncated_shard_or_manifest_stops_pretrain_before_any_output(tmp_path):
    manifest = write_synthetic_shards(tmp_path / "shards", n_train=30, n_val=6, cells_per_shard=10)
    shard = tmp_path / "shards/train/shard_00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(
        ValueError, match=r"shard .*shard_00001\.h5 has sha256 .*--forcerun tokenize_shards"
    ):
        pretrain(manifest, tmp_path / "run", TINY_MODEL, TINY_TRAIN)
    assert not (tmp_path / "run").exists()
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(ValueError, match=r"cannot read .*manifest\.json.*tokenize_shards"):
        pretrain(manifest, tmp_path / "run", TINY_MODEL, TINY_TRAIN)
    assert not (tmp_path / "run").exists()


# --- vocabularies --------------------------------------------------------------------------------


def test_shards_and_model_with_different_vocabularies(tmp_path):
    from scllm.eval.encode import embed_shard_cells
    from scllm.shards import ShardDataset
    from scllm.train.checkpoint import load_model

    manifest = write_synthetic_shards(tmp_path / "a", n_train=16, n_val=4)
    pretrain(manifest, tmp_path / "model", TINY_MODEL, {**TINY_TRAIN, "epochs": 1})
    model, _, _ = load_model(tmp_path / "model")

    # a shard of the same shape but another gene vocabulary
    other = build_vocab([f"ENSG{i:011d}" for i in range(100, 124)])
    shard = read_shard(tmp_path / "a/validation/shard_00000.h5")
    write_shard(
        tmp_path / "other.h5",
        shard.offsets,
        shard.gene_ids,
        shard.values,
        shard.cell_index,
        {**shard.attrs, "vocab_sha256": vocab_sha256(other)},
    )
    with pytest.raises(ValueError, match="tokenize the cells with the model's vocab.json") as err:
        embed_shard_cells(model, tmp_path / "other.h5")
    assert vocab_sha256(other) in str(err.value) and model.vocab_sha256 in str(err.value)

    # a shard of another run listed in a manifest
    (tmp_path / "a/validation/shard_00000.h5").unlink()
    (tmp_path / "other.h5").rename(tmp_path / "a/validation/shard_00000.h5")
    with pytest.raises(ValueError, match="has sha256 .* but the manifest recorded"):
        ShardDataset(manifest, "validation")
    listed = json.loads(manifest.read_text())  # as if the manifest had been rewritten to match
    listed["splits"]["validation"][0]["sha256"] = file_sha256(
        tmp_path / "a/validation/shard_00000.h5"
    )
    manifest.write_text(json.dumps(listed))
    with pytest.raises(ValueError, match="come from different runs. .*--forcerun tokenize_shards"):
        ShardDataset(manifest, "validation")


def test_resuming_on_shards_of_another_vocabulary_starts_afresh(tmp_path, caplog):
    first = write_synthetic_shards(tmp_path / "a", n_train=16, n_val=4)
    pretrain(first, tmp_path / "run", TINY_MODEL, {**TINY_TRAIN, "epochs": 1, "max_steps": 1})
    second = write_synthetic_shards(tmp_path / "b", n_train=16, n_val=4)
    data = json.loads(second.read_text())
    vocab = build_vocab([f"ENSG{i:011d}" for i in range(100, 124)])  # other genes, same size
    (tmp_path / "b/vocab.json").write_text(json.dumps(vocab))
    data["vocab_sha256"] = vocab_sha256(vocab)
    for entry in (e for entries in data["splits"].values() for e in entries):
        with h5py.File(tmp_path / "b" / entry["path"], "a") as f:
            f.attrs["vocab_sha256"] = data["vocab_sha256"]
        entry["sha256"] = file_sha256(tmp_path / "b" / entry["path"])
    second.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="scllm"):
        summary = pretrain(second, tmp_path / "run", TINY_MODEL, {**TINY_TRAIN, "epochs": 1})
    assert "data.vocab_sha256" in caplog.text and "starting from scratch" in caplog.text
    assert summary["done"]
    assert json.loads((tmp_path / "run/vocab.json").read_text()) == vocab


def _advised(message: str, adata: ad.AnnData, pattern: str) -> ad.AnnData:
    """Run the code a refusal advises (the first statement matching ``pattern``) on ``adata``,
    as a user would paste it."""
    code = re.search(pattern, message).group(0)
    scope = {"adata": adata}
    exec(code, scope)  # noqa: S102 - the message's own advice, taken literally
    return scope["adata"]


@pytest.mark.parametrize("suffixes", [False, True], ids=["same ids", "same once unversioned"])
def test_duplicate_ids_in_a_gene_id_column_get_advice_that_works(tmp_path, suffixes):
    src = synthetic_source()
    ids = src.var["gene_ids"].str.split(".").str[0].tolist()
    ids[5] = ids[4] + (".2" if suffixes else "")  # a repeat in the column, not in var_names
    src.var["gene_ids"] = ids
    src.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(InputError, match=r"1 gene id\(s\) occur more than once") as err:
        build_local_census(tmp_path / "in.h5ad", tmp_path / "soma")
    assert "adata.var['gene_ids']" in str(err.value)
    assert leftovers(tmp_path, "soma") == []
    fixed = _advised(str(err.value), src, r"adata = adata\[.*?\]\.copy\(\)")
    assert fixed.n_vars == src.n_vars - 1
    fixed.write_h5ad(tmp_path / "fixed.h5ad")
    build_local_census(tmp_path / "fixed.h5ad", tmp_path / "soma")
    assert (tmp_path / "soma").is_dir()


def test_cells_without_a_donor_are_refused_and_the_advised_fixes_work(tmp_path):
    src = synthetic_source()
    donors = src.obs["donor_id"].astype(object)
    donors.iloc[[3, 50, 51, 52, 90]] = np.nan
    src.obs["patient"] = pd.Categorical(donors)
    src.obs["tissue_general"] = "blood"  # every cell passes the filter
    src.write_h5ad(tmp_path / "in.h5ad")
    common = dict(donor_column="patient", primary_only=False, disease=None, max_cells=10**6)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"5 of \d+ cells have no value in obs\['patient'\]") as e:
        census_mod.sample_h5ad(tmp_path / "in.h5ad", out / "cells.h5ad", out / "s.tsv", **common)
    assert leftovers(out, "cells.h5ad", "s.tsv") == []
    message = str(e.value)
    # fix 1: a sample of their own
    named = _advised(message, src.copy(), r"adata\.obs\['patient'\] = .*?'unknown'\)")
    named.write_h5ad(tmp_path / "named.h5ad")
    census_mod.sample_h5ad(tmp_path / "named.h5ad", out / "cells.h5ad", out / "s.tsv", **common)
    samples = pd.read_csv(out / "s.tsv", sep="\t")
    assert samples.loc[samples.donor_id == "unknown", "n_cells"].sum() == 5
    assert not (samples.donor_id == "nan").any()
    # fix 2: drop them
    dropped = _advised(message, src.copy(), r"adata = adata\[adata\.obs.*?\]\.copy\(\)")
    assert dropped.n_obs == src.n_obs - 5
    dropped.write_h5ad(tmp_path / "dropped.h5ad")
    build_local_census(tmp_path / "dropped.h5ad", tmp_path / "soma", donor_column="patient")
