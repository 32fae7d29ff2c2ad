"""Pretraining: sampler, collate, end-to-end pretrain(), exact resume, load_model/embed."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import scllm
from scllm.eval.encode import embed_shard_cells
from scllm.shards import ShardDataset, read_shard
from scllm.tokens import PAD_VALUE, build_vocab, collate, vocab_sha256, write_vocab
from scllm.train.batches import LengthGroupedBatchSampler
from scllm.train.checkpoint import CHECKPOINT, EPOCH_COLUMNS, METRIC_COLUMNS, load_model
from scllm.train.launch import free_port
from scllm.train.loop import pretrain

from conftest import (
    TINY_MODEL,
    TINY_TRAIN,
    assert_same_weights,
    child_env,
    tensors,
    train_module_args,
    write_synthetic_shards,
)

ARTIFACTS = [
    "best_model.pt",
    "args.json",
    "vocab.json",
    "genes.tsv",
    "metrics.tsv",
    "epochs.tsv",
    "loss_curve.png",
    "last_checkpoint.pt",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))


# --- batches ------------------------------------------------------------------------------------


def test_sampler_covers_every_cell_once_deterministically():
    lengths = np.random.default_rng(0).integers(2, 300, 1003)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=16, seed=7, bucket_size_batches=10)
    epoch0 = sampler.epoch_batches(0)
    assert len(epoch0) == len(sampler) == -(-1003 // 16)
    assert sorted(np.concatenate(epoch0).tolist()) == list(range(1003))
    again = LengthGroupedBatchSampler(
        lengths, batch_size=16, seed=7, bucket_size_batches=10
    ).epoch_batches(0)
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, again))
    epoch1 = sampler.epoch_batches(1)
    assert sorted(np.concatenate(epoch1).tolist()) == list(range(1003))
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, epoch1))
    other_seed = LengthGroupedBatchSampler(
        lengths, 16, seed=8, bucket_size_batches=10
    ).epoch_batches(0)
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, other_seed))
    # Resuming skips exactly the batches already done.
    assert all(np.array_equal(a, b) for a, b in zip(sampler.epoch_batches(0, skip=5), epoch0[5:]))


def test_sampler_groups_lengths_and_reduces_padding():
    lengths = np.random.default_rng(1).integers(2, 1200, 3200)
    grouped = LengthGroupedBatchSampler(
        lengths, 32, seed=0, bucket_size_batches=100
    ).epoch_batches(0)
    random_batches = np.array_split(np.random.default_rng(0).permutation(3200), 100)
    padded = lambda batches: sum(len(b) * lengths[b].max() for b in batches)  # noqa: E731
    assert padded(grouped) < 0.6 * padded(random_batches)
    assert padded(grouped) < 1.1 * lengths.sum()


def test_sampler_partitions_batches_across_ranks():
    lengths = np.arange(1, 91)  # 90 cells / 8 = 12 batches, 4 ranks -> 3 each
    ranks = [
        LengthGroupedBatchSampler(lengths, 8, seed=3, bucket_size_batches=2, rank=r, world_size=4)
        for r in range(4)
    ]
    per_rank = [s.epoch_batches(2) for s in ranks]
    assert all(len(b) == len(ranks[0]) == 3 for b in per_rank)
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(seen) == len(set(seen.tolist()))  # no cell on two ranks
    # 5 ranks: 12 batches -> 2 each, the last 2 batches of this epoch's order are dropped.
    five = [
        LengthGroupedBatchSampler(
            lengths, 8, seed=3, bucket_size_batches=2, rank=r, world_size=5
        ).epoch_batches(2)
        for r in range(5)
    ]
    assert [len(b) for b in five] == [2] * 5


def test_collate_pads_to_the_longest_cell_of_the_batch():
    cells = [
        (np.array([5, 1, 2], np.int32), np.array([0, 3, 4], np.int16)),
        (np.array([5, 0, 3, 4, 1], np.int32), np.array([0, 1, 2, 3, 4], np.int16)),
    ]
    batch = collate(cells, pad_id=9)
    assert batch["gene_ids"].shape == batch["values"].shape == (2, 5)
    assert batch["gene_ids"][0].tolist() == [5, 1, 2, 9, 9]
    assert batch["values"][0].tolist() == [0, 3, 4, PAD_VALUE, PAD_VALUE]
    assert batch["padding_mask"].tolist() == [[False] * 3 + [True] * 2, [False] * 5]
    assert batch["gene_ids"].dtype == batch["values"].dtype == torch.int64


def test_shard_dataset_reads_all_shards_of_a_split(shards):
    train = ShardDataset(shards, "train")
    assert len(train) == 44  # 3 shards of 20, 20, 4 cells
    first = read_shard(shards.parent / "train/shard_00001.h5")
    g, v = train.cell(20)
    assert np.array_equal(g, first.cell(0)[0]) and np.array_equal(v, first.cell(0)[1])
    assert all(
        g[0] == 24 for g, _ in train.cells(range(len(train)))
    )  # every cell starts with <cls>
    with pytest.raises(ValueError, match="no split 'test'"):
        ShardDataset(shards, "test")


def test_vocab_mismatch_names_both_hashes(tmp_path):
    manifest = write_synthetic_shards(tmp_path, n_train=4, n_val=2)
    data = json.loads(manifest.read_text())
    recorded = data["vocab_sha256"]
    write_vocab(build_vocab([f"OTHER{i}" for i in range(24)]), tmp_path / "vocab.json")
    with pytest.raises(ValueError, match="vocabulary mismatch") as err:
        pretrain(manifest, tmp_path / "run", TINY_MODEL, TINY_TRAIN)
    actual = vocab_sha256(json.loads((tmp_path / "vocab.json").read_text()))
    assert recorded in str(err.value) and actual in str(err.value)
    assert "tokenize_shards" in str(err.value)


# --- pretrain ------------------------------------------------------------------------------------


def test_pretrain_writes_every_artifact_and_rerun_is_a_noop(shards, tmp_path):
    out = tmp_path / "run"
    summary = pretrain(shards, out, TINY_MODEL, TINY_TRAIN)
    assert summary["done"] and summary["global_step"] == 12  # 44 cells / 8 -> 6 steps x 2 epochs
    for name in ARTIFACTS:
        assert (out / name).stat().st_size > 0, name
    args = json.loads((out / "args.json").read_text())
    assert args["data"]["vocab_sha256"] == json.loads(shards.read_text())["vocab_sha256"]
    assert (
        args["model"]["d_model"] == 32
        and args["model"]["vocab_size"] == 26
        and args["train"]["lr"] == 3e-3
    )
    # provenance: the manifest relative to the model directory, the software that trained it
    assert not Path(args["data"]["manifest"]).is_absolute()
    assert (out / args["data"]["manifest"]).resolve() == shards.resolve()
    software = args["provenance"]
    assert (
        software["scllm"] == scllm.__version__
        and software["packages"]["torch"] == torch.__version__
    )
    assert re.fullmatch(
        r"[0-9a-f]{40}(-dirty)?|unknown \(not a git checkout\)", software["git_commit"]
    )
    assert (out / "vocab.json").read_bytes() == (shards.parent / "vocab.json").read_bytes()
    metrics = [line.split("\t") for line in (out / "metrics.tsv").read_text().splitlines()]
    assert (
        metrics[0]
        == METRIC_COLUMNS
        == [
            "epoch",
            "step",
            "lr",
            "train_loss",
            "expr_mse",
            "gepc_mse",
            "ecs_loss",
            "contrastive_loss",
            "cells_per_s",
            "tokens_per_s",
            "mfu",
        ]
    )
    assert [int(r[1]) for r in metrics[1:]] == [2, 4, 6, 8, 10, 12]
    rows = [line.split("\t") for line in (out / "epochs.tsv").read_text().splitlines()]
    assert (
        rows[0]
        == EPOCH_COLUMNS
        == [
            "epoch",
            "step",
            "train_loss",
            "val_loss",
            "val_expr_mse",
            "val_gepc_mse",
            "val_mean_bin_baseline_mse",
            "train_expr_mse",
            "train_gepc_mse",
            "train_contrastive",
        ]
    )
    # no contrastive term in these settings: its column is empty, every other one a number
    assert len(rows) == 3 and all(row[-1] == "" for row in rows[1:])
    assert all(np.isfinite(float(x)) for row in rows[1:] for x in row[:-1])
    assert summary["best_val_loss"] == pytest.approx(min(float(r[3]) for r in rows[1:]), rel=1e-5)
    # the objective is the sum of its terms (GEPC weight 1), epoch by epoch
    for row in rows[1:]:
        epoch = dict(zip(rows[0], row))
        total = float(epoch["train_expr_mse"]) + float(epoch["train_gepc_mse"])
        assert float(epoch["train_loss"]) == pytest.approx(total, rel=1e-5)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "last_checkpoint.pt", weights_only=True)
    assert ckpt["done"] and ckpt["global_step"] == 12

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = pretrain(shards, out, TINY_MODEL, TINY_TRAIN)
    assert again == summary
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes, (
        "a finished run rewrote files"
    )

    # Outputs deleted after completion (as Snakemake does before rerunning) come back without
    # training.
    (out / "best_model.pt").unlink()
    (out / "metrics.tsv").unlink()
    pretrain(shards, out, TINY_MODEL, TINY_TRAIN)
    assert_same_weights(tensors(out / "best_model.pt"), ckpt["best_model"])
    assert (out / "metrics.tsv").exists()


def test_resume_is_bitwise_exact(shards, tmp_path):
    full = pretrain(shards, tmp_path / "a", TINY_MODEL, TINY_TRAIN)
    # Stopped mid-epoch 1 (step 4 of 6), then mid-epoch 2 after a checkpoint (step 8), then
    # finished.
    first = pretrain(shards, tmp_path / "b", TINY_MODEL, {**TINY_TRAIN, "max_steps": 4})
    assert first == {**first, "global_step": 4, "done": False}
    assert not (tmp_path / "b" / "best_model.pt").exists()
    second = pretrain(shards, tmp_path / "b", TINY_MODEL, {**TINY_TRAIN, "max_steps": 8})
    assert second["global_step"] == 8 and (tmp_path / "b" / "best_model.pt").exists()
    last = pretrain(shards, tmp_path / "b", TINY_MODEL, TINY_TRAIN)
    assert last["done"] and last["global_step"] == full["global_step"]
    assert last["best_val_loss"] == full["best_val_loss"]
    assert_same_weights(
        tensors(tmp_path / "a" / "best_model.pt"), tensors(tmp_path / "b" / "best_model.pt")
    )
    a, b = (
        tensors(tmp_path / "a" / "last_checkpoint.pt"),
        tensors(tmp_path / "b" / "last_checkpoint.pt"),
    )
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["optimizer"]["state"][0], b["optimizer"]["state"][0])
    assert [r["step"] for r in a["metrics"]] == [
        r["step"] for r in b["metrics"]
    ]  # no rows lost or doubled
    assert [r["val_loss"] for r in a["epochs"]] == [r["val_loss"] for r in b["epochs"]]


def test_checkpoint_from_before_the_gepc_rename_resumes_exactly(shards, tmp_path):
    """A checkpoint whose GEPC head and columns are named mvc (the old name) resumes as if
    written today: same final weights as an uninterrupted run, no blank GEPC column."""
    pretrain(shards, tmp_path / "a", TINY_MODEL, TINY_TRAIN)
    pretrain(shards, tmp_path / "b", TINY_MODEL, {**TINY_TRAIN, "max_steps": 4})
    ckpt = tensors(tmp_path / "b" / CHECKPOINT)
    ckpt["model"] = {k.replace("gepc_", "mvc_"): v for k, v in ckpt["model"].items()}
    ckpt["metrics"] = [
        {k.replace("gepc_mse", "mvc_mse"): v for k, v in r.items()} for r in ckpt["metrics"]
    ]
    assert ckpt["metrics"] and all("mvc_mse" in r for r in ckpt["metrics"])
    torch.save(ckpt, tmp_path / "b" / CHECKPOINT)
    pretrain(shards, tmp_path / "b", TINY_MODEL, TINY_TRAIN)
    assert_same_weights(
        tensors(tmp_path / "a" / "best_model.pt"), tensors(tmp_path / "b" / "best_model.pt")
    )
    rows = [line.split("\t") for line in (tmp_path / "b" / "metrics.tsv").read_text().splitlines()]
    column = rows[0].index("gepc_mse")
    assert all(row[column] for row in rows[1:])


def test_a_checkpoint_from_before_a_new_setting_resumes_exactly(shards, tmp_path, caplog):
    """Settings added since a checkpoint was written (here train.init_from and
    train.contrastive_view) count as their defaults: the run resumes, it does not restart."""
    pretrain(shards, tmp_path / "a", TINY_MODEL, TINY_TRAIN)
    pretrain(shards, tmp_path / "b", TINY_MODEL, {**TINY_TRAIN, "max_steps": 4})
    ckpt = tensors(tmp_path / "b" / CHECKPOINT)
    for key in ("init_from", "contrastive_view"):
        del ckpt["args"]["train"][key]
    del ckpt["epoch_terms"]  # written before the epoch's terms were recorded
    torch.save(ckpt, tmp_path / "b" / CHECKPOINT)
    with caplog.at_level(logging.INFO, logger="scllm"):
        pretrain(shards, tmp_path / "b", TINY_MODEL, TINY_TRAIN)
    assert "resuming from" in caplog.text and "step 4" in caplog.text  # not a fresh start
    assert_same_weights(
        tensors(tmp_path / "a" / "best_model.pt"), tensors(tmp_path / "b" / "best_model.pt")
    )


def test_changed_settings_start_a_fresh_run(shards, tmp_path, caplog):
    pretrain(shards, tmp_path, TINY_MODEL, {**TINY_TRAIN, "epochs": 1, "max_steps": 3})
    with caplog.at_level(logging.WARNING, logger="scllm"):
        summary = pretrain(shards, tmp_path, TINY_MODEL, {**TINY_TRAIN, "epochs": 1, "lr": 1e-3})
    assert "train.lr" in caplog.text and "starting from scratch" in caplog.text
    assert summary["global_step"] == 6 and summary["done"]
    assert json.loads((tmp_path / "args.json").read_text())["train"]["lr"] == 1e-3


def test_fresh_start_removes_the_earlier_runs_model(shards, tmp_path):
    pretrain(shards, tmp_path, TINY_MODEL, {**TINY_TRAIN, "epochs": 1})
    assert (tmp_path / "best_model.pt").exists()
    # new settings, stopped before the first epoch ends: the old weights must not remain
    pretrain(shards, tmp_path, TINY_MODEL, {**TINY_TRAIN, "epochs": 1, "lr": 1e-3, "max_steps": 2})
    assert not (tmp_path / "best_model.pt").exists()
    assert json.loads((tmp_path / "args.json").read_text())["train"]["lr"] == 1e-3


def test_bad_settings_are_rejected(shards, tmp_path):
    with pytest.raises(ValueError, match="unknown train settings.*'lrate'"):
        pretrain(shards, tmp_path, TINY_MODEL, {"lrate": 1})
    with pytest.raises(ValueError, match="model.vocab_size is set by the shards"):
        pretrain(shards, tmp_path, {**TINY_MODEL, "vocab_size": 99}, TINY_TRAIN)


def test_pca_init_on_one_training_cell_is_refused_and_random_init_trains(tmp_path):
    """One training cell has no principal axes: the init would be NaN and the loss NaN at step 1,
    which advice about the learning rate cannot fix. The message's fix does."""
    one = write_synthetic_shards(tmp_path / "one", n_train=1, n_val=4)
    settings = {**TINY_TRAIN, "gene_emb_init": "pca", "epochs": 1}
    with pytest.raises(ValueError, match=r"gene_emb_init: pca needs training cells that differ"):
        pretrain(one, tmp_path / "model", TINY_MODEL, settings)
    assert not (tmp_path / "model" / "best_model.pt").exists()
    summary = pretrain(
        one, tmp_path / "model", TINY_MODEL, {**settings, "gene_emb_init": "random"}
    )
    assert np.isfinite(summary["best_val_loss"])


def test_init_from_continues_the_weights_and_refuses_another_shape_or_vocabulary(shards, tmp_path):
    parent = tmp_path / "parent"
    pretrain(shards, parent, TINY_MODEL, TINY_TRAIN)
    settings = {**TINY_TRAIN, "init_from": str(parent), "lr": 1e-9, "epochs": 1}
    pretrain(shards, tmp_path / "child", TINY_MODEL, settings)
    before = torch.load(parent / "best_model.pt", weights_only=True)
    after = torch.load(tmp_path / "child" / "best_model.pt", weights_only=True)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-5
    args = json.loads((tmp_path / "child" / "args.json").read_text())
    assert args["parent"]["path"] == str(parent) and len(args["parent"]["best_model_sha256"]) == 64
    with pytest.raises(ValueError, match=r"another shape:\n  model.d_model: 64 here, 32 in"):
        pretrain(shards, tmp_path / "wide", {**TINY_MODEL, "d_model": 64}, settings)
    other = write_synthetic_shards(tmp_path / "other", n_genes=30)
    with pytest.raises(ValueError, match="was trained on the vocabulary .* these shards use"):
        pretrain(other, tmp_path / "other_model", TINY_MODEL, settings)


# --- using the model -----------------------------------------------------------------------------


def test_load_model_and_embed_cells(shards, tmp_path):
    pretrain(shards, tmp_path, TINY_MODEL, {**TINY_TRAIN, "epochs": 1})
    model, vocab, args = load_model(tmp_path)
    assert not model.training and vocab["<cls>"] == 24 and args["model"]["n_layers"] == 2
    assert_same_weights(model.state_dict(), tensors(tmp_path / "best_model.pt"))

    shard_path = shards.parent / "validation/shard_00000.h5"
    emb = embed_shard_cells(model, shard_path, batch_size=5)
    shard = read_shard(shard_path)
    assert emb.shape == (shard.n_cells, 32) and emb.dtype == np.float32 and np.isfinite(emb).all()
    for i in (0, 7, shard.n_cells - 1):  # each cell alone equals the cell within a padded batch
        g, v = shard.cell(i)
        alone = embed_shard_cells(model, (np.array([0, len(g)]), g, v))
        np.testing.assert_allclose(alone[0], emb[i], atol=1e-5, rtol=0)
    assert not np.allclose(emb[0], emb[1])

    (tmp_path / "vocab.json").write_text(json.dumps({"<cls>": 0, "<pad>": 1}))
    with pytest.raises(ValueError, match="different runs"):
        load_model(tmp_path)


def test_torchrun_two_processes_on_cpu(shards, tmp_path):
    """DDP through torchrun with gloo: both ranks train in lock-step and rank 0 writes the
    outputs."""
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"model": TINY_MODEL, "train": {**TINY_TRAIN, "epochs": 1}}))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *train_module_args(shards, tmp_path / "run", params, tmp_path / "train.log"),
    ]
    result = subprocess.run(
        cmd, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["world_size"] == 2
    ckpt = tensors(tmp_path / "run" / "last_checkpoint.pt")
    assert (
        ckpt["done"] and ckpt["global_step"] == 3 and len(ckpt["rng"]) == 2
    )  # 6 batches over 2 ranks
    log_text = (tmp_path / "train.log").read_text()
    assert "2 process(es)" in log_text and "validation loss" in log_text


def test_log_lines_show_elapsed_time_and_time_left(shards, tmp_path, caplog, monkeypatch):
    import scllm.train.loop as train_mod
    from scllm.files import Progress

    clock = iter([100.0, 110.0, 125.0])
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: next(clock))
    progress = Progress(first=20, total=100)  # resumed at step 20, clock 100 s
    assert progress.text(40) == "elapsed 0:00:10, about 0:00:30 to go"  # 20 steps in 10 s, 60 left
    assert (
        progress.text(57) == "elapsed 0:00:25, about 0:00:29 to go"
    )  # 37 steps in 25 s, 43 left: 29.05 s
    monkeypatch.undo()

    with caplog.at_level(logging.INFO, logger="scllm"):
        pretrain(shards, tmp_path, TINY_MODEL, TINY_TRAIN)
    step_lines = [
        r.getMessage()
        for r in caplog.records
        if " step " in r.getMessage() and "loss" in r.getMessage()
    ]
    epoch_lines = [r.getMessage() for r in caplog.records if " done: train loss" in r.getMessage()]
    assert step_lines and len(epoch_lines) == TINY_TRAIN["epochs"]
    # each line names the objective's terms with their weights
    terms = r"loss [\d.]+ = expression MSE [\d.]+ \+ 1 x GEPC MSE [\d.]+;"
    assert all(re.search(terms, line) for line in step_lines + epoch_lines), step_lines[0]
    assert all(
        re.search(r"validation loss [\d.]+ = masked MSE of the expression head [\d.]+", line)
        for line in epoch_lines
    )
    pattern = r"; elapsed \d+:\d\d:\d\d, about \d+:\d\d:\d\d to go$"
    assert all(re.search(pattern, line) for line in step_lines + epoch_lines[:-1]), (
        step_lines + epoch_lines
    )
    assert epoch_lines[-1].endswith("about 0:00:00 to go")
