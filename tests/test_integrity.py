"""Nothing corrupt reaches the model: damaged shards, bad counts, empty and duplicated inputs and
foreign pickles are refused where they are read, in one paragraph that names the file and the fix,
and nothing is written or checkpointed from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scllm.checks import file_sha256
from scllm.cli import main as cli_main
from scllm.errors import CorruptArtifactError, InputError, UnsafeFileError
from scllm.eval.embed import embed_h5ad, embed_shards
from scllm.prep.census import sample_census
from scllm.prep.split import split_cells
from scllm.prep.store import build_local_census
from scllm.shards import ShardDataset, read_shard
from scllm.train.checkpoint import CHECKPOINT, load_model
from scllm.train.loop import pretrain

from conftest import child_env, train_module_args

FIX = "snakemake --forcerun tokenize_shards"
N_GENES = 24  # synthetic_shards' default vocabulary
GENE_IDS = [f"ENSG{i:011d}" for i in range(N_GENES)]


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory, synthetic_shards) -> Path:
    return synthetic_shards(
        tmp_path_factory.mktemp("shards"), n_train=40, n_val=8, cells_per_shard=20
    )


@pytest.fixture(scope="module")
def model_dir(clean_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    pretrain(clean_shards, out, TINY, {**TRAIN, "epochs": 1})
    return out


TINY = {"n_layers": 1, "n_heads": 2, "d_model": 16, "d_ff": 32, "dropout": 0.0}
TRAIN = {
    "epochs": 2,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "checkpoint_every_steps": 2,
    "log_every_steps": 2,
    "bucket_size_batches": 2,
    "num_threads": 1,
    "device": "cpu",
}


@pytest.fixture
def shards(clean_shards, tmp_path) -> Path:
    """A private copy of the shards (manifest path) to damage."""
    shutil.copytree(clean_shards.parent, tmp_path / "shards")
    return tmp_path / "shards" / "manifest.json"


@pytest.fixture
def binned(tmp_path) -> Path:
    """An h5ad with as many rows as the synthetic shards' cell_index needs (embed_shards reads
    its obs)."""
    obs = pd.DataFrame({"sample": "s"}, index=[f"c{i}" for i in range(40)])
    ad.AnnData(X=sp.csr_matrix((40, N_GENES), dtype=np.float32), obs=obs).write_h5ad(
        tmp_path / "binned.h5ad"
    )
    return tmp_path / "binned.h5ad"


def edit_shard(manifest: Path, rel: str, **arrays) -> None:
    """Overwrite arrays of a listed shard and record its new sha256, as if the manifest had been
    rewritten to match: only the checks of the arrays themselves can then catch the damage."""
    path = manifest.parent / rel
    with h5py.File(path, "a") as f:
        for name, change in arrays.items():
            values = f[name][:]
            change(values)
            f[name][...] = values
    listed = json.loads(manifest.read_text())
    for entry in (e for entries in listed["splits"].values() for e in entries if e["path"] == rel):
        entry["sha256"] = file_sha256(path)
    manifest.write_text(json.dumps(listed))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def embed_validation(model_dir: Path, manifest: Path, binned: Path, out: Path):
    return embed_shards(model_dir, manifest.parent, binned, out, cells="validation", device="cpu")


# --- damaged shards: through a real pretrain run and through embed -------------------------------


@pytest.mark.parametrize("dataset", ["offsets", "gene_ids", "values"])
def test_flipped_bytes_in_a_shard_stop_pretrain_and_embed_naming_the_file_and_fix(
    shards, model_dir, binned, tmp_path, flip_bytes, dataset
):
    split = "validation" if dataset == "values" else "train"  # embed reads validation shards
    flip_bytes(shards.parent / f"{split}/shard_00000.h5", dataset)
    message = rf"shard .*{split}/shard_00000\.h5 has sha256 .* but the manifest recorded .*{FIX}"
    with pytest.raises(CorruptArtifactError, match=message):
        pretrain(shards, tmp_path / "run", TINY, TRAIN)
    assert not (tmp_path / "run").exists(), "pretrain wrote something from damaged shards"
    if split == "validation":
        with pytest.raises(CorruptArtifactError, match=message):
            embed_validation(model_dir, shards, binned, tmp_path / "emb.h5ad")
        assert not (tmp_path / "emb.h5ad").exists()


def test_a_damaged_shard_never_reaches_the_checkpoint_of_a_resumed_run(
    shards, tmp_path, flip_bytes
):
    out = tmp_path / "run"
    assert pretrain(shards, out, TINY, {**TRAIN, "max_steps": 2})["global_step"] == 2
    before = {p.name: digest(p) for p in out.iterdir()}
    flip_bytes(shards.parent / "train/shard_00001.h5", "offsets")
    with pytest.raises(CorruptArtifactError, match=rf"train/shard_00001\.h5 has sha256.*{FIX}"):
        pretrain(shards, out, TINY, TRAIN)
    assert {p.name: digest(p) for p in out.iterdir()} == before, "the run's files changed"
    assert torch.load(out / CHECKPOINT, weights_only=True)["global_step"] == 2


# Damage the sha256 cannot see (the manifest rewritten to match): the arrays' own checks catch it.
ARRAY_DAMAGE = {
    "a garbage cell length": (
        {"offsets": lambda o: o.__setitem__(3, o[3] + 5700)},
        "offsets decrease or repeat",
    ),
    "offsets past the tokens": (
        {"offsets": lambda o: o.__setitem__(-1, o[-1] + 1)},
        r"offsets end at \d+ but",
    ),
    "a gene outside the vocabulary": (
        {"gene_ids": lambda g: g.__setitem__(5, 1 << 20)},
        r"gene ids outside the vocabulary 0\.\.23 \(e\.g\. \[1048576\]\)",
    ),
    "a value outside the bins": (
        {"values": lambda v: v.__setitem__(5, 999)},
        r"values outside the bins 1\.\.50",
    ),
    "a cell without <cls>": (
        {"gene_ids": lambda g: g.__setitem__(0, 0)},
        "a cell does not start with the <cls> token",
    ),
}


@pytest.mark.parametrize("damage", ARRAY_DAMAGE)
def test_damage_behind_a_matching_sha256_is_caught_by_the_array_checks(
    shards, model_dir, binned, tmp_path, damage
):
    arrays, problem = ARRAY_DAMAGE[damage]
    edit_shard(shards, "validation/shard_00000.h5", **arrays)
    message = rf"shard .*validation/shard_00000\.h5 is damaged: {problem}.*{FIX}"
    with pytest.raises(CorruptArtifactError, match=message):
        pretrain(shards, tmp_path / "run", TINY, TRAIN)
    assert not (tmp_path / "run").exists()
    with pytest.raises(CorruptArtifactError, match=message):
        embed_validation(model_dir, shards, binned, tmp_path / "emb.h5ad")
    assert not (tmp_path / "emb.h5ad").exists()
    with pytest.raises(CorruptArtifactError, match=problem):  # a shard read on its own too
        read_shard(shards.parent / "validation/shard_00000.h5")


def test_a_damaged_hdf5_header_and_an_unchecked_manifest_name_the_rerun_that_works(
    shards, model_dir, binned, tmp_path
):
    path = shards.parent / "validation/shard_00000.h5"
    data = bytearray(path.read_bytes())
    data[:64] = b"\0" * 64  # the HDF5 superblock
    path.write_bytes(bytes(data))
    for run in (
        lambda: pretrain(shards, tmp_path / "run", TINY, TRAIN),
        lambda: embed_validation(model_dir, shards, binned, tmp_path / "emb.h5ad"),
    ):
        with pytest.raises(
            CorruptArtifactError, match=rf"validation/shard_00000\.h5 has sha256.*{FIX}"
        ) as err:
            run()
        assert "not enough" in str(err.value)  # says why deleting the file would not do
    listed = json.loads(shards.read_text())
    listed["splits"]["validation"][0]["sha256"] = file_sha256(path)
    shards.write_text(json.dumps(listed))
    with pytest.raises(
        CorruptArtifactError, match=rf"cannot read shard .*validation/shard_00000\.h5.*{FIX}"
    ):
        ShardDataset(shards, "validation")
    del listed["splits"]["train"][1]["sha256"]  # a manifest that cannot vouch for its shards
    shards.write_text(json.dumps(listed))
    with pytest.raises(
        CorruptArtifactError, match=rf"records no sha256 for train/shard_00001\.h5.*{FIX}"
    ):
        pretrain(shards, tmp_path / "run", TINY, TRAIN)
    assert not (tmp_path / "run").exists() and not (tmp_path / "emb.h5ad").exists()


def test_python_m_scllm_train_refuses_in_one_paragraph(shards, tmp_path, flip_bytes):
    """The entry point the multi-GPU rule uses; rule scripts share its error hook
    (setup_logging)."""
    flip_bytes(shards.parent / "train/shard_00000.h5", "gene_ids")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"model": TINY, "train": TRAIN}))
    proc = subprocess.run(
        [
            sys.executable,
            *train_module_args(shards, tmp_path / "run", params, tmp_path / "train.log"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "CRITICAL" not in proc.stderr
    assert "ERROR CorruptArtifactError: shard " in proc.stderr and FIX in proc.stderr
    assert FIX in (tmp_path / "train.log").read_text()
    assert not (tmp_path / "run").exists()


# --- inputs of counts: scllm embed, build_local_census, sample_census ----------------------------


def write_counts(path: Path, X, obs_names=None, gene_ids=GENE_IDS) -> Path:
    obs = pd.DataFrame(
        index=obs_names if obs_names is not None else [f"cell{i}" for i in range(X.shape[0])]
    )
    ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(gene_ids))).write_h5ad(path)
    return path


def counts(n_cells: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, (n_cells, N_GENES)).astype(np.float32)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli_main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_scllm_embed_refuses_nan_and_inf(model_dir, tmp_path, capsys, bad, layout):
    X = counts()
    X[7, 3] = bad
    path = write_counts(tmp_path / "in.h5ad", X if layout == "dense" else sp.csr_matrix(X))
    code, err = run_cli(
        capsys, "embed", str(model_dir), str(path), str(tmp_path / "out.h5ad"), "--device", "cpu"
    )
    assert code == 1
    assert (
        f"X of {path} holds values that are not finite non-negative values (NaN or infinite" in err
    )
    assert "Traceback" not in err
    assert not (tmp_path / "out.h5ad").exists()


def test_an_input_without_cells_is_refused_by_every_entry_point(model_dir, tmp_path, capsys):
    empty = write_counts(tmp_path / "empty.h5ad", sp.csr_matrix((0, N_GENES), dtype=np.float32))
    with pytest.raises(InputError, match=rf"the input h5ad {empty} holds no cells"):
        build_local_census(empty, tmp_path / "store")  # what census.source: h5ad runs
    assert not (tmp_path / "store").exists()
    code, err = run_cli(capsys, "build-census", str(empty), str(tmp_path / "store"))
    assert (
        code == 1
        and "holds no cells" in err
        and "ArrowAdapter" not in err
        and "Traceback" not in err
    )
    code, err = run_cli(
        capsys, "embed", str(model_dir), str(empty), str(tmp_path / "out.h5ad"), "--device", "cpu"
    )
    assert code == 1 and f"{empty} holds no cells" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "out.h5ad").exists()


def test_scllm_embed_makes_duplicate_cell_ids_unique_and_says_which_gene_column_counts(
    model_dir, tmp_path, caplog
):
    X = sp.csr_matrix(np.hstack([counts(), counts(seed=1)[:, :1]]))  # gene 0 twice
    path = write_counts(
        tmp_path / "in.h5ad", X, obs_names=["a", "b"] * 6, gene_ids=GENE_IDS + GENE_IDS[:1]
    )
    with caplog.at_level(logging.WARNING, logger="scllm"):
        embed_h5ad(model_dir, path, tmp_path / "out.h5ad", device="cpu")
    assert "2 cell id(s) occur more than once" in caplog.text
    assert (
        "1 vocabulary genes match more than one column" in caplog.text
        and "the first column" in caplog.text
    )
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obs_names.tolist()[:4] == ["a", "b", "a-1", "b-1"] and out.obs_names.is_unique


def test_duplicate_gene_ids_are_refused(tmp_path):
    path = write_counts(
        tmp_path / "in.h5ad", sp.csr_matrix(counts()), gene_ids=GENE_IDS[:-1] + GENE_IDS[:1]
    )
    with pytest.raises(
        InputError, match=r"1 gene id\(s\) occur more than once \(e\.g\. \['ENSG00000000000'\]\)"
    ):
        build_local_census(path, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_duplicate_barcodes_become_distinct_cells_never_in_both_splits(tmp_path, caplog):
    """Two 10x lanes with the same barcodes, concatenated without making them unique."""
    barcodes = [f"AAACCTG-{i}" for i in range(30)]
    path = write_counts(
        tmp_path / "in.h5ad", sp.csr_matrix(counts(60)), obs_names=barcodes + barcodes
    )
    with caplog.at_level(logging.WARNING, logger="scllm"):
        build_local_census(path, tmp_path / "store")
    assert (
        "30 cell id(s) occur more than once" in caplog.text
        and "obs_names_make_unique" in caplog.text
    )
    sample_census(
        tmp_path / "cells.h5ad",
        tmp_path / "samples.tsv",
        uri=str(tmp_path / "store"),
        max_cells=100,
    )
    cells = ad.read_h5ad(tmp_path / "cells.h5ad")
    assert cells.n_obs == 60 and cells.obs_names.is_unique
    assert "in:AAACCTG-0" in cells.obs_names and "in:AAACCTG-0-1" in cells.obs_names
    table = split_cells(tmp_path / "cells.h5ad", tmp_path / "split.tsv", validation_fraction=0.5)
    assert table["cell"].is_unique
    assert not set(table.loc[table.split == "train", "cell"]) & set(
        table.loc[table.split == "validation", "cell"]
    )

    # a pipeline file with duplicate ids (written by hand or an older version) is refused by split
    cells.obs_names = [f"in:{barcode}" for barcode in barcodes + barcodes]
    cells.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(
        CorruptArtifactError,
        match=r"holds 30 cell id\(s\) more than once.*--forcerun sample_census",
    ):
        split_cells(tmp_path / "dup.h5ad", tmp_path / "dup_split.tsv")
    assert not (tmp_path / "dup_split.tsv").exists()


# --- foreign pickles (on resume: test_faults.test_checkpoints_load_with_weights_only) ------------


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_hostile_best_model_is_refused_as_not_a_checkpoint(
    model_dir, clean_shards, binned, tmp_path, capsys
):
    hostile = tmp_path / "model"
    shutil.copytree(model_dir, hostile)
    marker = tmp_path / "code_ran"
    torch.save({"weights": Payload(marker)}, hostile / "best_model.pt")
    torch.load(hostile / "best_model.pt", weights_only=False)  # the payload works when allowed to
    assert marker.exists()
    marker.unlink()
    input_h5ad = write_counts(tmp_path / "in.h5ad", sp.csr_matrix(counts()))
    code, err = run_cli(
        capsys,
        "embed",
        str(hostile),
        str(input_h5ad),
        str(tmp_path / "out.h5ad"),
        "--device",
        "cpu",
    )
    assert code == 1
    assert f"{hostile / 'best_model.pt'} is not a checkpoint of this project" in err
    assert "must not be loaded" in err and "delete best_model.pt and rerun snakemake" in err
    assert "weights_only" not in err and "Traceback" not in err
    with pytest.raises(
        UnsafeFileError, match="is not a checkpoint of this project"
    ):  # the pipeline's embed rule
        embed_shards(hostile, clean_shards.parent, binned, tmp_path / "emb.h5ad", device="cpu")
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "out.h5ad").exists() and not (tmp_path / "emb.h5ad").exists()

    (hostile / "best_model.pt").write_bytes(b"PK\x03\x04 truncated")  # damaged rather than hostile
    with pytest.raises(
        CorruptArtifactError, match=r"cannot read .*best_model\.pt .*truncated or damaged"
    ):
        load_model(hostile)
    torch.save(
        {"weight": torch.zeros(3)}, hostile / "best_model.pt"
    )  # tensors, but not this model's
    with pytest.raises(
        CorruptArtifactError,
        match=r"best_model\.pt does not hold the weights of the model .*args\.json",
    ):
        load_model(hostile)
