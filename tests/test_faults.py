"""Faults: a killed or preempted pretrain resumes to the same weights, a diverging loss stops the
run without overwriting good state, artifacts appear only complete (one writer at a time, never
a file for a folder or the reverse), and checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import pytest
import torch

import scllm.train as train_mod
from scllm import binning, census, hvg, qc, tokens
from scllm import io as io_mod
from scllm.errors import DiskFullError, OutputBusyError, UnsafeFileError, UnsafeOutputError
from scllm.io import atomic_path, remove_stale_temporaries
from scllm.train import (
    CHECKPOINT,
    PREEMPTED_EXIT_CODE,
    NonFiniteLossError,
    TrainingPreempted,
    pretrain,
)

from conftest import (
    TINY_MODEL,
    assert_same_weights,
    child_env,
    snapshot,
    start_writer,
    synthetic_source,
    tensors,
    train_module_args,
    write_synthetic_shards,
)

# 160 cells / 8 -> 20 steps per epoch, 40 in all; a step is logged as soon as it is done.
TRAIN = {
    "epochs": 2,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "checkpoint_every_steps": 3,
    "log_every_steps": 1,
    "bucket_size_batches": 2,
    "num_threads": 1,
    "device": "cpu",
}
TOTAL_STEPS = 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), n_train=160, n_val=8)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    assert pretrain(shards, out, TINY_MODEL, TRAIN)["global_step"] == TOTAL_STEPS
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    assert_same_weights(tensors(out / "best_model.pt"), tensors(reference / "best_model.pt"))
    a, b = tensors(out / CHECKPOINT), tensors(reference / CHECKPOINT)
    assert a["done"] and a["global_step"] == b["global_step"] == TOTAL_STEPS
    assert_same_weights(a["model"], b["model"])
    for key in b["optimizer"]["state"]:
        assert_same_weights(a["optimizer"]["state"][key], b["optimizer"]["state"][key])
    assert a["best_val_loss"] == b["best_val_loss"]
    assert [r["val_loss"] for r in a["epochs"]] == [r["val_loss"] for r in b["epochs"]]


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(".*.tmp*"))


def start_training(
    shards: Path, out: Path, tmp_path: Path, train: dict = TRAIN
) -> tuple[subprocess.Popen, Path]:
    """``python -m scllm.train`` as its own process; returns it and its log file."""
    params, log = (
        tmp_path / "params.json",
        tmp_path / f"train{len(list(tmp_path.glob('train*.log')))}.log",
    )
    params.write_text(json.dumps({"model": TINY_MODEL, "train": train}))
    with open(log.with_suffix(".stderr"), "w") as stderr:  # a file, not a pipe nobody drains
        proc = subprocess.Popen(
            [sys.executable, *train_module_args(shards, out, params, log)],
            env=child_env(OMP_NUM_THREADS="1"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return proc, log


def wait_for_step(
    proc: subprocess.Popen, log: Path, step: int, out: Path, timeout: float = 120
) -> None:
    """Until the process has logged ``step`` and a checkpoint exists."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf" step {step}/{TOTAL_STEPS} ")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stderr = log.with_suffix(".stderr").read_text()[-3000:]
            raise AssertionError(
                f"training ended (status {proc.returncode}) before step {step}:\n{stderr}"
            )
        if (out / CHECKPOINT).exists() and log.exists() and pattern.search(log.read_text()):
            return
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


# --- kill, preemption ----------------------------------------------------------------------------


def test_sigkill_at_a_random_step_resumes_to_the_same_weights(shards, reference, tmp_path, caplog):
    step = random.Random().randint(4, TOTAL_STEPS - 12)  # any step after the first checkpoint (3)
    out = tmp_path / "run"
    proc, log = start_training(shards, out, tmp_path)
    wait_for_step(proc, log, step, out)
    assert proc.poll() is None, "training finished before the kill; make the run longer"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed = tensors(out / CHECKPOINT)
    assert not killed["done"] and 3 <= killed["global_step"] < TOTAL_STEPS, (
        step,
        killed["global_step"],
    )
    (out / f".{CHECKPOINT}.tmp{proc.pid}").write_bytes(
        b"half a checkpoint"
    )  # as if killed mid-write

    with caplog.at_level(logging.INFO, logger="scllm"):
        pretrain(shards, out, TINY_MODEL, TRAIN)  # the rerun, as the job's retry would
    assert re.search(
        rf"resuming from .*: epoch \d, batch \d+, step {killed['global_step']}\n",
        caplog.text + "\n",
    )
    assert_same_run(out, reference)
    assert temporaries(out) == [], "a killed run's temporaries were left behind"


def test_sigterm_checkpoints_the_current_step_and_exits_for_requeue(shards, reference, tmp_path):
    train = {
        **TRAIN,
        "checkpoint_every_steps": 1000,
    }  # only epoch ends and the signal write checkpoints
    step = random.Random().randint(2, 17)  # inside epoch 1: no checkpoint yet when it arrives
    out = tmp_path / "run"
    proc, log = start_training(shards, out, tmp_path, train)
    pattern = re.compile(rf" step {step}/{TOTAL_STEPS} ")
    deadline = time.monotonic() + 120
    while not (log.exists() and pattern.search(log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "training ended or stalled before the signal"
        )
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE, log.with_suffix(".stderr").read_text()[
        -3000:
    ]
    text = log.read_text()
    found = re.search(
        rf"stopped by SIGTERM in epoch 1, batch \d+/20: checkpoint at step (\d+) saved to "
        rf".*{CHECKPOINT}; exiting with code {PREEMPTED_EXIT_CODE} so the job can be requeued",
        text,
    )
    assert found, text[-2000:]
    ckpt = tensors(out / CHECKPOINT)
    assert ckpt["global_step"] == int(found.group(1)) >= step and not ckpt["done"]
    assert ckpt["global_step"] < 20  # the signal's checkpoint, not an epoch end

    pretrain(shards, out, TINY_MODEL, train)  # the rerun (or the requeued job)
    assert_same_run(out, reference)


def test_sigusr1_checkpoints_and_stops_in_process(shards, reference, tmp_path, monkeypatch):
    """SIGUSR1 (sbatch --signal=USR1@SECONDS, before the time limit): pretrain() raises
    TrainingPreempted after checkpointing, and restores the caller's signal handlers."""
    calls = {"n": 0}
    masked_mse = train_mod.masked_mse

    def signalling_mse(*args):
        calls["n"] += 1
        if calls["n"] == 2 * 11:  # during step 11 (two losses per step)
            os.kill(os.getpid(), signal.SIGUSR1)
        return masked_mse(*args)

    monkeypatch.setattr(train_mod, "masked_mse", signalling_mse)
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(
        TrainingPreempted,
        match="stopped by SIGUSR1 in epoch 1, batch 11/20: checkpoint at step 11",
    ):
        pretrain(shards, tmp_path, TINY_MODEL, {**TRAIN, "checkpoint_every_steps": 1000})
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
    assert tensors(tmp_path / CHECKPOINT)["global_step"] == 11
    monkeypatch.setattr(train_mod, "masked_mse", masked_mse)
    pretrain(shards, tmp_path, TINY_MODEL, TRAIN)
    assert_same_run(tmp_path, reference)


# --- divergence ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["nan_loss", "inf_loss", "nan_weights"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    shards, reference, tmp_path, monkeypatch, fault
):
    """From step 25 (epoch 2) on, the loss (or, with a finite loss, the gradients and so the
    weights) is poisoned. The last checkpoint before it is step 24; epoch 1 gave best_model.pt."""
    calls = {"mse": 0, "clip": 0}
    masked_mse, clip = train_mod.masked_mse, torch.nn.utils.clip_grad_norm_
    train = dict(TRAIN)

    def poisoned_mse(*args):
        calls["mse"] += 1
        value = masked_mse(*args)
        return value * float(fault[:3]) if calls["mse"] > 2 * 24 else value

    def poisoned_clip(parameters, *args, **kwargs):
        parameters = list(parameters)
        calls["clip"] += 1
        if calls["clip"] == 27:  # a checkpoint step, never logged: only the weights show it
            for p in parameters:
                p.grad.fill_(float("nan"))
        return clip(parameters, *args, **kwargs)

    if fault == "nan_weights":
        train["log_every_steps"] = 1000
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned_clip)
    else:
        monkeypatch.setattr(train_mod, "masked_mse", poisoned_mse)
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(shards, tmp_path, TINY_MODEL, train)
    message = str(err.value)
    assert f"NaN or infinite by step {25 if fault != 'nan_weights' else 27} (epoch 2)" in message
    assert (
        f"{tmp_path / CHECKPOINT} keeps the last good state (step 24)" in message
        and "train.lr" in message
    )

    ckpt = tensors(tmp_path / CHECKPOINT)
    assert ckpt["global_step"] == 24 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values()
    )
    best = tensors(tmp_path / "best_model.pt")
    assert all(torch.isfinite(v).all() for v in best.values())
    assert_same_weights(best, ckpt["best_model"])
    assert temporaries(tmp_path) == []
    assert "nan" not in (tmp_path / "metrics.tsv").read_text().lower()

    if fault == "nan_loss":  # the kept checkpoint is usable: a rerun resumes from it and completes
        monkeypatch.setattr(train_mod, "masked_mse", masked_mse)
        pretrain(shards, tmp_path, TINY_MODEL, TRAIN)
        assert_same_run(tmp_path, reference)


def test_non_finite_loss_before_any_checkpoint(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(
        train_mod, "masked_mse", lambda *args: torch.tensor(float("nan"), requires_grad=True)
    )
    with pytest.raises(NonFiniteLossError, match="by step 1 .*no checkpoint had been written yet"):
        pretrain(shards, tmp_path, TINY_MODEL, TRAIN)
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / "best_model.pt").exists()


# --- atomic artifacts ----------------------------------------------------------------------------


class InjectedFault(Exception):
    """Not one of the types a stage handles itself."""


def fail_on_call(n: int, real):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise InjectedFault(f"injected on call {n}")
        return real(*args, **kwargs)

    return wrapper


def test_a_failure_mid_stage_leaves_neither_the_artifact_nor_its_temporary(tmp_path, monkeypatch):
    """Each streaming stage fails after writing part of its output, then runs for real to feed
    the next."""
    synthetic_source().write_h5ad(tmp_path / "source.h5ad")
    with monkeypatch.context() as m:
        m.setattr(census, "_write_table", fail_on_call(2, census._write_table))
        with pytest.raises(InjectedFault):
            census.build_local_census(tmp_path / "source.h5ad", tmp_path / "soma")
    assert sorted(os.listdir(tmp_path)) == ["source.h5ad"]
    census.build_local_census(tmp_path / "source.h5ad", tmp_path / "soma")

    def stage(name, patch, run, outputs):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            with pytest.raises(InjectedFault):
                run()
        assert [o for o in outputs if (tmp_path / o).exists()] == [], f"{name} left an output"
        assert temporaries(tmp_path) == [], f"{name} left a temporary"
        run()
        assert all((tmp_path / o).exists() for o in outputs)

    def sample():
        census.sample_census(
            tmp_path / "cells.h5ad",
            tmp_path / "samples.tsv",
            uri=str(tmp_path / "soma"),
            max_cells=1000,
            chunk_size=8,
        )

    stage(
        "sample_census",
        (census, "check_counts", fail_on_call(5, census.check_counts)),
        sample,
        ["cells.h5ad", "samples.tsv"],
    )
    n_chunks = -(-ad.read_h5ad(tmp_path / "cells.h5ad", backed="r").n_obs // 16)
    stage(
        "filter_qc",
        (qc, "read_rows", fail_on_call(n_chunks + 3, qc.read_rows)),  # in the writing pass
        lambda: qc.filter_qc(
            tmp_path / "cells.h5ad",
            tmp_path / "filtered.h5ad",
            tmp_path / "qc.tsv",
            min_genes_per_cell=5,
            chunk_size=16,
        ),
        ["filtered.h5ad", "qc.tsv"],
    )
    stage(
        "select_hvg",
        (hvg, "read_rows", fail_on_call(3, hvg.read_rows)),
        lambda: hvg.select_hvg(
            tmp_path / "filtered.h5ad",
            tmp_path / "hvg.tsv",
            n_top_genes=20,
            min_cells_per_sample=10,
        ),
        ["hvg.tsv"],
    )
    stage(
        "normalize_bin",
        (binning, "bin_csr", fail_on_call(3, binning.bin_csr)),
        lambda: binning.normalize_bin(
            tmp_path / "filtered.h5ad",
            tmp_path / "hvg.tsv",
            tmp_path / "binned.h5ad",
            chunk_size=16,
        ),
        ["binned.h5ad"],
    )
    from scllm.split import split_cells

    split_cells(tmp_path / "binned.h5ad", tmp_path / "split.tsv", validation_fraction=0.2)
    stage(
        "tokenize_shards",
        (tokens, "sequences_from_binned", fail_on_call(4, tokens.sequences_from_binned)),
        lambda: tokens.tokenize_shards(
            tmp_path / "binned.h5ad",
            tmp_path / "split.tsv",
            tmp_path / "shards",
            cells_per_shard=10,
            chunk_size=16,
        ),
        ["shards"],
    )
    assert len(list((tmp_path / "shards").rglob("*.h5"))) >= 4

    # pretrain: a failure while writing the checkpoint leaves the previous state only
    def half_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise InjectedFault("disk full")

    stage(
        "pretrain",
        (train_mod.torch, "save", half_save),
        lambda: pretrain(
            tmp_path / "shards/manifest.json",
            tmp_path / "model",
            TINY_MODEL,
            {**TRAIN, "epochs": 1},
        ),
        ["model/best_model.pt", f"model/{CHECKPOINT}"],
    )


def test_atomic_path_removes_what_a_killed_writer_left(tmp_path):
    (tmp_path / ".cells.h5ad.tmp4242").write_bytes(b"partial")
    (tmp_path / ".shards.tmp4243").mkdir()
    (tmp_path / ".other.tmp4244").write_bytes(b"someone else's")
    with atomic_path(tmp_path / "cells.h5ad") as tmp:
        tmp.write_bytes(b"complete")
    with atomic_path(tmp_path / "shards") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp4244", "cells.h5ad", "shards"]


def test_a_full_disk_while_checkpointing_is_named_and_the_run_resumes_once_freed(
    shards, reference, tmp_path, monkeypatch
):
    """The 5th checkpoint (step 15) is written to /dev/full, which fails as a full disk does:
    torch's own error names neither the file nor the cause."""
    real_save, calls = torch.save, {"checkpoints": 0}

    def save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(f".{CHECKPOINT}.tmp"):
            calls["checkpoints"] += 1
            if calls["checkpoints"] == 5:
                f = "/dev/full"
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError) as err:
        pretrain(shards, tmp_path, TINY_MODEL, TRAIN)
    message = str(err.value)
    assert f"could not write {tmp_path / CHECKPOINT}: the disk (or your quota) is full" in message
    assert "MB free there now" in message and "resumes from its last checkpoint" in message
    assert tensors(tmp_path / CHECKPOINT)["global_step"] == 12  # the last good one, kept
    assert temporaries(tmp_path) == []
    # the fix: space again (the real torch.save); the rerun resumes and ends as if never stopped
    monkeypatch.setattr(torch, "save", real_save)
    pretrain(shards, tmp_path, TINY_MODEL, TRAIN)
    assert_same_run(tmp_path, reference)


def test_atomic_path_names_a_full_disk_for_plain_writes_too(tmp_path):
    (tmp_path / "table.tsv").write_text("earlier\n")
    with pytest.raises(DiskFullError, match=r"could not write .*table\.tsv: the disk"):
        with atomic_path(tmp_path / "table.tsv") as tmp:
            os.symlink("/dev/full", tmp)
            with open(tmp, "w") as f:
                f.write("x" * 100_000)
                f.flush()
    assert (tmp_path / "table.tsv").read_text() == "earlier\n" and temporaries(tmp_path) == []


def leftovers(directory: Path) -> list[str]:
    """Temporaries and writer lock files of atomic_path in ``directory``."""
    return sorted(
        p.name for p in directory.iterdir() if ".tmp" in p.name or p.name.endswith(".lock")
    )


def test_a_second_writer_of_one_output_is_refused_while_the_first_completes(tmp_path):
    target = tmp_path / "cells.h5ad"
    proc, go = start_writer(target, tmp_path / "signals")
    refusal = f"another process is writing {target} now; wait for it or choose another output"
    with pytest.raises(OutputBusyError, match=re.escape(refusal)):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"second writer")
    assert remove_stale_temporaries(tmp_path) == []  # a live writer's temporary stays
    assert f".cells.h5ad.tmp{proc.pid}" in leftovers(tmp_path)
    with atomic_path(tmp_path / "other.h5ad") as tmp:  # the advice: another output
        tmp.write_bytes(b"other")
    go.touch()
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    assert target.read_bytes() == b"first half, second half"  # one complete file
    assert leftovers(tmp_path) == []
    with atomic_path(target) as tmp:  # the advice: wait for it
        tmp.write_bytes(b"second writer")
    assert target.read_bytes() == b"second writer"


def test_threads_of_one_process_are_kept_apart_too(tmp_path):
    target, inside, done = tmp_path / "out.tsv", threading.Event(), threading.Event()

    def first():
        with atomic_path(target) as tmp:
            tmp.write_text("first")
            inside.set()
            done.wait(30)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(30)
    with pytest.raises(OutputBusyError, match="another process is writing"):
        with atomic_path(target) as tmp:
            tmp.write_text("second")
    done.set()
    thread.join()
    assert target.read_text() == "first" and leftovers(tmp_path) == []


def test_a_killed_writers_temporary_is_removed_by_the_next_writer(tmp_path):
    target = tmp_path / "cells.h5ad"
    for cleanup in ("next write", "remove_stale_temporaries"):
        proc, _ = start_writer(target, tmp_path / cleanup)
        proc.kill()  # SIGKILL: the kernel drops its lock, the temporary and lock file stay
        proc.wait(timeout=30)
        assert leftovers(tmp_path) == [".cells.h5ad.scllm.lock", f".cells.h5ad.tmp{proc.pid}"]
        if cleanup == "next write":
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"complete")
            assert target.read_bytes() == b"complete"
        else:
            assert remove_stale_temporaries(tmp_path) == [tmp_path / f".cells.h5ad.tmp{proc.pid}"]
        assert leftovers(tmp_path) == []


def test_atomic_path_never_puts_a_file_where_a_folder_is_nor_the_reverse(tmp_path):
    folder, file = tmp_path / "outdir", tmp_path / "notes.txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "kept.txt").write_text("the user's")
    file.write_text("the user's notes")
    link = tmp_path / "link"
    link.symlink_to(folder)
    before = {p: snapshot(p) for p in (folder, file)}
    for path, kind, write in (
        (folder, "a folder", Path.write_text),
        (link, "a link to a folder", Path.write_text),
        (link, "a link to a folder", lambda tmp, _: tmp.mkdir()),
        (file, "a file", lambda tmp, _: tmp.mkdir()),
    ):
        with pytest.raises(UnsafeOutputError) as err:
            with atomic_path(path) as tmp:
                write(tmp, "new")
        assert str(err.value).startswith(f"{path} is {kind}; writing")
        assert "Nothing was changed: choose another output path" in str(err.value)
        assert {p: snapshot(p) for p in (folder, file)} == before
        assert link.resolve() == folder and leftovers(tmp_path) == []
    with atomic_path(tmp_path / "other.txt") as tmp:  # the advice: another output path
        tmp.write_text("new")
    assert (tmp_path / "other.txt").read_text() == "new"


def test_a_file_system_without_locks_still_gets_its_outputs(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(io_mod.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="scllm"):
        with atomic_path(tmp_path / "out.tsv") as tmp:
            tmp.write_text("done")
    assert (tmp_path / "out.tsv").read_text() == "done" and leftovers(tmp_path) == []
    assert "writers of" in caplog.text and "are not kept apart here" in caplog.text


# --- loading checkpoints -------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoints_load_with_weights_only(shards, reference, tmp_path, caplog):
    """A checkpoint or model file holding an arbitrary pickled object is refused, and its code
    never runs."""
    from scllm.embedding import load_model

    marker = tmp_path / "payload_ran"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload works when allowed to
    assert marker.exists()
    marker.rmdir()

    # load_model on a model directory whose best_model.pt is such a file
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("args.json", "vocab.json"):
        (model_dir / name).write_bytes((reference / name).read_bytes())
    (model_dir / "best_model.pt").write_bytes((tmp_path / "evil.pt").read_bytes())
    with pytest.raises(
        UnsafeFileError, match="is not a checkpoint of this project.*must not be loaded"
    ) as err:
        load_model(model_dir)
    assert "weights_only" not in str(err.value)  # torch's text advises the unsafe load
    assert not marker.exists()

    # resuming from such a last_checkpoint.pt: refused with a warning, training starts afresh
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes((tmp_path / "evil.pt").read_bytes())
    with caplog.at_level(logging.WARNING, logger="scllm"):
        pretrain(shards, run, TINY_MODEL, {**TRAIN, "max_steps": 3})
    assert f"{run / CHECKPOINT} is not a checkpoint of this project" in caplog.text
    assert "Starting from scratch" in caplog.text and "weights_only" not in caplog.text
    assert not marker.exists()
    assert tensors(run / CHECKPOINT)["global_step"] == 3
