"""Cells from token shards, length-grouped batches, per-batch padding and masking.

Padding belongs to the batch: cells are kept ragged and each batch is padded only to its
longest cell. Batches group cells of similar length (sorted inside large random buckets), which
removes most padding while keeping the batch order random.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from scllm.errors import CorruptArtifactError
from scllm.tokens import (
    MASK_VALUE,
    PAD_VALUE,
    RETOKENIZE,
    open_listed_shard,
    read_manifest,
    read_vocab,
    vocab_sha256,
)

T = TypeVar("T")
# The tensors of a training batch (training_batch), in the order the training step unpacks them.
TRAINING_BATCH_KEYS = ("gene_ids", "values", "padding_mask", "masked_values", "mask")
# Added by training_batch only when views leave genes out: the whole cells behind the rows.
PROFILE_KEYS = ("profile_gene_ids", "profile_values")


class RaggedCells:
    """Cells as CSR-like ragged arrays: cell i is tokens ``offsets[i]:offsets[i+1]``."""

    def __init__(self, offsets: np.ndarray, gene_ids: np.ndarray, values: np.ndarray):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.gene_ids = np.asarray(gene_ids)
        self.values = np.asarray(values)
        if self.offsets[-1] != len(self.gene_ids) or len(self.gene_ids) != len(self.values):
            raise ValueError("offsets do not match the token arrays")
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.offsets[i], self.offsets[i + 1]
        return self.gene_ids[start:stop], self.values[start:stop]

    def cells(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.cell(i) for i in indices]


class ShardDataset:
    """All cells of one split of a shard manifest, in manifest order, read from the shards on
    demand.

    Only the cells' lengths (2 bytes a cell) stay in memory: they are all the length-grouped
    sampler needs. ``cells(indices)`` reads a batch's tokens from the shard files when the batch is
    made (``ShardReader``), so a training process's memory does not grow with the corpus. Every
    shard is checked against the manifest (sha256, arrays, counts, vocabulary) when it is opened,
    a block at a time.
    """

    def __init__(self, manifest_path: str | Path, split: str):
        manifest_path = Path(manifest_path)
        self.manifest = manifest = read_manifest(manifest_path)
        if split not in manifest.get("splits", {}):
            raise ValueError(
                f"{manifest_path} has no split {split!r} "
                f"(has {sorted(manifest.get('splits', {}))})"
            )
        check_vocab(manifest, manifest_path.parent / "vocab.json", manifest_path)
        self.split = split
        self.shards = [
            open_listed_shard(manifest_path.parent, manifest, entry)
            for entry in manifest["splits"][split]
        ]
        # cell i of the split is cell i - first_cell[k] of shard k
        self.first_cell = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([s.n_cells for s in self.shards], out=self.first_cell[1:])
        # A cell has at most n_genes + 1 tokens: int16 (2 bytes a cell) unless the vocabulary is
        # huge.
        dtype = np.int16 if int(manifest["n_genes"]) < np.iinfo(np.int16).max else np.int32
        self.lengths = np.empty(
            self.first_cell[-1], dtype=dtype
        )  # filled in place: no second copy
        for shard, start in zip(self.shards, self.first_cell):
            self.lengths[start : start + shard.n_cells] = np.diff(shard.offsets())

    def __len__(self) -> int:
        return len(self.lengths)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.cells([i])[0]

    def cells(self, indices) -> list[tuple[np.ndarray, np.ndarray]]:
        """(gene ids, values) of each cell, read from its shard."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"cell indices must lie in 0..{len(self) - 1} (split {self.split!r})")
        shard = np.searchsorted(self.first_cell, indices, side="right") - 1
        local = (indices - self.first_cell[shard]).tolist()  # plain ints: this runs for every cell
        return [
            self.shards[k].cell(i, n)
            for k, i, n in zip(shard.tolist(), local, self.lengths[indices].tolist())
        ]

    def close(self) -> None:
        for shard in self.shards:
            shard.close()


def check_vocab(manifest: dict, vocab_path: Path, manifest_path) -> dict[str, int]:
    """Read vocab.json next to the manifest and make sure it is the one the shards were built
    with."""
    vocab = read_vocab(vocab_path)
    actual = vocab_sha256(vocab)
    if actual != manifest["vocab_sha256"]:
        raise CorruptArtifactError(
            f"vocabulary mismatch: {vocab_path} has sha256 {actual} but {manifest_path} records "
            f"{manifest['vocab_sha256']}. vocab.json and the shards come from different runs. "
            + RETOKENIZE
        )
    if len(vocab) != manifest["vocab_size"]:
        raise CorruptArtifactError(
            f"{vocab_path} has {len(vocab)} entries but {manifest_path} says "
            f"vocab_size={manifest['vocab_size']}. " + RETOKENIZE
        )
    return vocab


class LengthGroupedBatchSampler:
    """Batches of cell indices, grouped by length, deterministic for a given (seed, epoch).

    Per epoch: permute all cells, cut the permutation into buckets of ``bucket_size_batches``
    batches, sort each bucket by length and cut it into batches, then shuffle the batches.
    With ``world_size`` > 1, rank r takes batches r, r + world_size, ...; the last
    ``n_batches % world_size`` batches of the shuffled list are dropped (at most world_size - 1,
    different ones each epoch) so every rank runs the same number of steps.

    Works from the lengths alone, and holds an epoch as one int32 array of cell indices (batches
    are views into it), so 10M cells cost 40 MB here rather than a list of millions of arrays.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        seed: int = 0,
        bucket_size_batches: int = 100,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1 or bucket_size_batches < 1:
            raise ValueError("batch_size and bucket_size_batches must be >= 1")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.bucket = batch_size * bucket_size_batches
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle

    def all_batches(self, epoch: int) -> Batches:
        """The epoch's batches for all ranks, in order."""
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        # Generator.permutation(n) is shuffle(arange(n)), and its draws depend on n only: an int32
        # arange shuffled in place is the same permutation in half the memory.
        order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        if self.shuffle:
            rng.shuffle(order)
        starts = []
        for start in range(0, n, self.bucket):
            bucket = order[start : start + self.bucket]
            bucket[:] = bucket[np.argsort(-self.lengths[bucket], kind="stable")]
            starts.append(np.arange(start, start + len(bucket), self.batch_size))
        starts = np.concatenate(starts + [np.zeros(0, np.int64)])
        bounds = np.append(starts, n)
        picked = rng.permutation(len(starts)) if self.shuffle else np.arange(len(starts))
        return Batches(order, bounds, picked)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Batches:
        """This rank's batches of ``epoch``, without the first ``skip`` (for resuming)."""
        batches = self.all_batches(epoch)
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size][skip:]

    def __len__(self) -> int:
        n_batches = -(-len(self.lengths) // self.batch_size)  # every bucket but the last is full
        return n_batches // self.world_size


class Batches(Sequence):
    """A list of batches without a list: batch k is ``order[bounds[j]:bounds[j + 1]]`` with
    ``j = picked[k]`` (a view, not a copy). Slicing gives another ``Batches`` over the same
    order."""

    def __init__(self, order: np.ndarray, bounds: np.ndarray, picked: np.ndarray):
        self.order, self.bounds, self.picked = order, bounds, picked

    def __len__(self) -> int:
        return len(self.picked)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Batches(self.order, self.bounds, self.picked[k])
        j = self.picked[k]
        return self.order[self.bounds[j] : self.bounds[j + 1]]


def collate(cells: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest cell: gene pad = ``pad_id``, value pad = PAD_VALUE."""
    max_len = max(len(g) for g, _ in cells)
    gene_ids = np.full((len(cells), max_len), pad_id, dtype=np.int64)
    values = np.full((len(cells), max_len), PAD_VALUE, dtype=np.int64)
    for row, (g, v) in enumerate(cells):
        gene_ids[row, : len(g)] = g
        values[row, : len(v)] = v
    gene_ids, values = torch.from_numpy(gene_ids), torch.from_numpy(values)
    return {"gene_ids": gene_ids, "values": values, "padding_mask": values == PAD_VALUE}


def mask_values(
    values: torch.Tensor, padding_mask: torch.Tensor, ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``round(ratio * n_gene_tokens)`` random gene tokens per cell (round half to even).

    Position 0 (<cls>) and padding are never masked. Returns (input values with MASK_VALUE at the
    masked positions, boolean mask). Draws from ``generator`` (CPU) so masks are reproducible.
    """
    padding = padding_mask.cpu()
    n_genes = (~padding).sum(1) - 1
    n_mask = torch.round(n_genes.double() * ratio).long()
    # float64 scores make ties (which would depend on the sort) practically impossible.
    scores = torch.rand(values.shape, generator=generator, dtype=torch.float64)
    scores[:, 0] = 2.0  # rand() < 1, so these rank after every gene token
    scores[padding] = 2.0
    mask = torch.from_numpy(lowest_per_row(scores.numpy(), n_mask.numpy())).to(values.device)
    return values.masked_fill(mask, MASK_VALUE), mask


def lowest_per_row(scores: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Boolean mask of the ``k[r]`` lowest scores of each row r; among equal scores, the first
    ones.

    The positions scoring at most the row's k-th lowest score: one np.sort of the values, several
    times faster than an argsort on the CPU. Only an exact tie at that score (float64 draws:
    practically never) needs the order of positions, and then a stable argsort decides.
    """
    kth = np.take_along_axis(np.sort(scores, axis=1), np.maximum(k - 1, 0)[:, None], axis=1)
    mask = (scores <= kth) & (k[:, None] > 0)
    if not np.array_equal(mask.sum(1), k):  # a tie at the threshold
        order = np.argsort(scores, axis=1, kind="stable")
        mask = np.zeros_like(mask)
        np.put_along_axis(mask, order, np.arange(scores.shape[1]) < k[:, None], axis=1)
    return mask


def training_batch(
    cells: list[tuple[np.ndarray, np.ndarray]],
    pad_id: int,
    ratios: list[float],
    generator: torch.Generator,
    pin_memory: bool = False,
    views: int = 1,
    view_genes: float = 1.0,
) -> dict:
    """Collate ``cells`` and mask them at a ratio drawn from ``ratios``.

    ``views`` > 1 repeats the cells that many times (rows ``i + k * len(cells)`` are the same
    cell), each copy with its own mask: the views a contrastive objective compares. With
    ``view_genes`` < 1 each view keeps only that fraction of the cell's gene tokens (a random
    subset, at least one), so two views share no trivial fingerprint of the cell's gene set;
    then ``profile_gene_ids``/``profile_values`` keep the whole cells (same rows) for objectives
    that reconstruct the cell, where a gene left out of a view counts as masked, not unexpressed.

    Every random draw comes from ``generator``, so the batch depends only on its seed. Adds
    ``masked_values`` (the model's input), ``mask`` and ``lengths`` (tokens per cell, numpy) to
    :func:`collate`'s output. ``pin_memory`` pins the tensors so copies to a GPU can overlap.
    """
    cells = list(cells) * views
    whole = None
    if views > 1 and view_genes < 1:
        whole = collate(cells, pad_id)  # the genes a view leaves out are still the cell's
        cells = [gene_subset(g, v, view_genes, generator) for g, v in cells]
    batch = collate(cells, pad_id)
    ratio = ratios[int(torch.randint(len(ratios), (1,), generator=generator))]
    batch["masked_values"], batch["mask"] = mask_values(
        batch["values"], batch["padding_mask"], ratio, generator
    )
    if whole is not None:  # what a whole-profile objective reconstructs
        batch["profile_gene_ids"], batch["profile_values"] = whole["gene_ids"], whole["values"]
    if pin_memory:
        batch = {key: t.pin_memory() for key, t in batch.items()}
    batch["lengths"] = np.array([len(g) for g, _ in cells])
    return batch


def gene_subset(
    gene_ids: np.ndarray, values: np.ndarray, fraction: float, generator: torch.Generator
):
    """``<cls>`` and a random ``fraction`` of a cell's gene tokens (at least one), in their
    order."""
    n = len(gene_ids) - 1
    if n < 2:
        return gene_ids, values
    keep = max(1, round(fraction * n))
    chosen = np.sort(torch.randperm(n, generator=generator)[:keep].numpy()) + 1
    rows = np.r_[0, chosen]
    return gene_ids[rows], values[rows]


def prefetched(make: Callable[[int], T], keys: Iterable[int], depth: int = 2) -> Iterator[T]:
    """Yield ``make(k)`` for each key, building up to ``depth`` items ahead in a background thread.

    Batch preparation (collate and masking on the CPU) then overlaps the training step instead
    of adding to it. Items come in order and are the same as without the thread; an exception
    in ``make`` is raised where its item would have been yielded.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, not {depth}")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scllm-batches")
    keys = iter(keys)
    pending = deque(pool.submit(make, k) for _, k in zip(range(depth), keys))
    try:
        while pending:
            item = pending.popleft().result()
            for k in keys:  # top up: at most one new key per yielded item
                pending.append(pool.submit(make, k))
                break
            yield item
    finally:  # also when the consumer stops early (preemption, max_steps, an error)
        pool.shutdown(wait=True, cancel_futures=True)
