"""Batch preparation for training: masking, training_batch and the background prefetcher."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from scllm.tokens import MASK_VALUE, collate
from scllm.train.batches import mask_values, prefetched, training_batch

PAD_ID = 31


def random_cells(n_cells, seed=0, min_len=1, max_len=40):
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        n = int(rng.integers(min_len, max_len + 1))
        cells.append(
            (
                np.r_[30, rng.choice(30, min(n, 30), replace=False)].astype(np.int32),
                np.r_[0, rng.integers(1, 51, min(n, 30))].astype(np.int16),
            )
        )
    return cells


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_masks_are_the_lowest_scores_of_the_generators_draws(ratio):
    """The masked tokens of a cell are its round(ratio * genes) gene tokens with the lowest
    uniform draws (float64, one per position, row-major) from the generator: written out here
    independently, so any change to the masking (which a resumed run relies on) shows."""
    batch = collate(random_cells(25, seed=1), PAD_ID)
    _, mask = mask_values(
        batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(7)
    )

    scores = torch.rand(
        batch["values"].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    ).numpy()
    expected = np.zeros(mask.shape, dtype=bool)
    for row in range(mask.shape[0]):
        genes = np.flatnonzero(~batch["padding_mask"][row].numpy())[1:]  # not <cls>, not padding
        n_mask = int(np.round(ratio * len(genes)))  # numpy rounds half to even, like torch.round
        expected[row, genes[np.argsort(scores[row, genes], kind="stable")[:n_mask]]] = True
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_training_batch_depends_only_on_its_generator_seed():
    cells = random_cells(12, seed=2)
    a = training_batch(cells, PAD_ID, [0.25, 0.5, 0.75], torch.Generator().manual_seed(5))
    b = training_batch(cells, PAD_ID, [0.25, 0.5, 0.75], torch.Generator().manual_seed(5))
    for key in ("gene_ids", "values", "padding_mask", "masked_values", "mask"):
        assert torch.equal(a[key], b[key]), key
    np.testing.assert_array_equal(a["lengths"], [len(g) for g, _ in cells])
    # The ratio is the generator's first draw; the masks come from the draws after it.
    gen = torch.Generator().manual_seed(5)
    ratio = [0.25, 0.5, 0.75][int(torch.randint(3, (1,), generator=gen))]
    masked, mask = mask_values(a["values"], a["padding_mask"], ratio, gen)
    assert torch.equal(a["mask"], mask) and torch.equal(a["masked_values"], masked)
    assert (a["masked_values"][a["mask"]] == MASK_VALUE).all()
    n_genes = a["lengths"] - 1
    assert a["mask"].sum(1).tolist() == np.round(ratio * n_genes).astype(int).tolist()


def test_prefetched_yields_every_item_in_order():
    assert list(prefetched(lambda k: k * k, range(20))) == [k * k for k in range(20)]
    assert list(prefetched(lambda k: k, range(0))) == []


def test_prefetched_builds_at_most_depth_items_ahead():
    started = []

    def make(k):
        started.append(k)
        return k

    stream = prefetched(make, range(100), depth=2)
    assert next(stream) == 0
    time.sleep(0.1)  # let the worker run as far ahead as it may
    assert max(started) <= 2, f"built {started} with one item consumed"
    stream.close()


def test_prefetched_raises_the_workers_error_at_its_item():
    def make(k):
        if k == 3:
            raise ValueError("cell 3 is broken")
        return k

    seen = []
    with pytest.raises(ValueError, match="cell 3 is broken"):
        for item in prefetched(make, range(10)):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_prefetched_stops_its_thread_and_cancels_pending_work_when_closed():
    built = []

    def make(k):
        time.sleep(0.05)
        built.append(k)
        return k

    stream = prefetched(make, range(1000), depth=2)
    assert next(stream) == 0
    stream.close()  # what happens when training stops early (preemption, max_steps, an error)
    # close() returns once the worker is gone: no waiting here, and nothing built after.
    assert not [t for t in threading.enumerate() if t.name.startswith("scllm-batches")]
    n_built = len(built)
    time.sleep(0.2)
    assert len(built) == n_built <= 3, f"built {built} after one item and close()"


def test_lowest_per_row_equals_a_stable_argsort_also_with_ties():
    """The fast mask selection picks what the first k positions of a stable argsort pick."""
    from scllm.train.batches import lowest_per_row

    rng = np.random.default_rng(0)
    for trial in range(200):
        rows, cols = rng.integers(1, 9), rng.integers(1, 60)
        # few distinct values in half the trials: ties everywhere, also at the threshold
        scores = (
            rng.integers(0, 4, (rows, cols)).astype(float)
            if trial % 2
            else rng.random((rows, cols))
        )
        k = rng.integers(0, cols + 1, rows)
        order = np.argsort(scores, axis=1, kind="stable")
        expected = np.zeros((rows, cols), dtype=bool)
        for r in range(rows):
            expected[r, order[r, : k[r]]] = True
        assert np.array_equal(lowest_per_row(scores, k), expected), trial


def test_masks_equal_those_of_earlier_versions():
    """mask_values as it was (one stable torch argsort of the scores) gives the same masks."""

    def earlier(values, padding_mask, ratio, generator):
        n_genes = (~padding_mask).sum(1) - 1
        n_mask = torch.round(n_genes.double() * ratio).long()
        scores = torch.rand(values.shape, generator=generator, dtype=torch.float64)
        scores[:, 0] = 2.0
        scores[padding_mask] = 2.0
        order = scores.argsort(dim=1, stable=True)
        take = torch.arange(values.shape[1]) < n_mask[:, None]
        mask = torch.zeros_like(take).scatter_(1, order, take)
        return values.masked_fill(mask, MASK_VALUE), mask

    for seed in range(50):
        batch = collate(random_cells(17, seed=seed, max_len=300), PAD_ID)
        for ratio in (0.25, 0.5, 0.75):
            ours = mask_values(
                batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(seed)
            )
            theirs = earlier(
                batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(seed)
            )
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
