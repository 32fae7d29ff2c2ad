"""Training batches: length-grouped batches of cells, padded (``scllm.tokens.collate``) and
masked, prepared ahead of the step in a background thread.

Padding belongs to the batch: cells are kept ragged and each batch is padded only to its
longest cell. Batches group cells of similar length (sorted inside large random buckets), which
removes most padding while keeping the batch order random.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from scllm.config import TrainConfig
from scllm.shards import ShardDataset, check_vocab, read_manifest
from scllm.tokens import MASK_VALUE, collate

if TYPE_CHECKING:
    from scllm.train.distributed import Environment

T = TypeVar("T")
# The tensors of a training batch (training_batch), in the order the training step unpacks them.
TRAINING_BATCH_KEYS = ("gene_ids", "values", "padding_mask", "masked_values", "mask")
# Added by training_batch only when views leave genes out: the whole cells behind the rows.
PROFILE_KEYS = ("profile_gene_ids", "profile_values")


class LengthGroupedBatchSampler:
    """Batches of cell indices, grouped by length, deterministic for a given (seed, epoch).

    Per epoch: permute all cells, cut the permutation into buckets of ``bucket_size_batches``
    batches, sort each bucket by length and cut it into batches, then shuffle the batches.
    With ``world_size`` > 1, rank r takes batches r, r + world_size, ...; the last
    ``n_batches % world_size`` batches of the shuffled list are dropped (at most world_size - 1,
    different ones each epoch) so every rank runs the same number of steps.

    Works from the lengths alone, and holds an epoch as one int32 array of cell indices (batches
    are views into it), so 10M cells cost 40 MB here rather than a list of millions of arrays.

    Parameters
    ----------
    lengths : array_like of int
        Every cell's token count.
    batch_size : int
        Cells a batch (the last batch of a bucket may be shorter).
    seed : int, default 0
        Seed of the order (with the epoch).
    bucket_size_batches : int, default 100
        Batches a bucket.
    rank, world_size : int, default 0 and 1
        This process's rank and the number of processes.
    shuffle : bool, default True
        Shuffle the cells and the batches; False keeps file order (buckets still sorted by
        length).

    Raises
    ------
    ValueError
        ``batch_size`` or ``bucket_size_batches`` below 1.
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
        """The epoch's batches for all ranks, in order.

        Parameters
        ----------
        epoch : int
            The epoch (with the seed, it fixes the order).

        Returns
        -------
        Batches
        """
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
        """This rank's batches of ``epoch``, without the first ``skip`` (for resuming).

        Parameters
        ----------
        epoch : int
            The epoch.
        skip : int, default 0
            Batches already done.

        Returns
        -------
        Batches
        """
        batches = self.all_batches(epoch)
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size][skip:]

    def __len__(self) -> int:
        n_batches = -(-len(self.lengths) // self.batch_size)  # every bucket but the last is full
        return n_batches // self.world_size


class Batches(Sequence):
    """A list of batches without a list: batch k is ``order[bounds[j]:bounds[j + 1]]``.

    Here ``j = picked[k]``, and each batch is a view, not a copy. Slicing gives another
    ``Batches`` over the same order.

    Parameters
    ----------
    order : numpy.ndarray
        Cell indices, batch after batch.
    bounds : numpy.ndarray
        Where each batch starts in ``order``, then ``len(order)``.
    picked : numpy.ndarray
        The batches, by number, in the order they are given.
    """

    def __init__(self, order: np.ndarray, bounds: np.ndarray, picked: np.ndarray):
        self.order, self.bounds, self.picked = order, bounds, picked

    def __len__(self) -> int:
        return len(self.picked)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Batches(self.order, self.bounds, self.picked[k])
        j = self.picked[k]
        return self.order[self.bounds[j] : self.bounds[j + 1]]


def mask_values(
    values: torch.Tensor, padding_mask: torch.Tensor, ratio: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``round(ratio * n_gene_tokens)`` random gene tokens per cell (round half to even).

    Position 0 (<cls>) and padding are never masked. Draws from ``generator`` (CPU) so masks are
    reproducible.

    Parameters
    ----------
    values : torch.Tensor
        Token values [B, L].
    padding_mask : torch.Tensor
        bool [B, L], True at padding.
    ratio : float
        The share of each cell's gene tokens to mask.
    generator : torch.Generator
        A CPU generator.

    Returns
    -------
    masked : torch.Tensor
        ``values`` with MASK_VALUE at the masked positions.
    mask : torch.Tensor
        bool [B, L], True at the masked positions (on the device of ``values``).
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
    """Boolean mask of the ``k[r]`` lowest scores of each row r; among equal scores, the first.

    The positions scoring at most the row's k-th lowest score: one np.sort of the values, several
    times faster than an argsort on the CPU. Only an exact tie at that score (float64 draws:
    practically never) needs the order of positions, and then a stable argsort decides.

    Parameters
    ----------
    scores : numpy.ndarray
        Scores, rows x positions.
    k : numpy.ndarray
        How many to pick in each row.

    Returns
    -------
    numpy.ndarray
        bool, shaped as ``scores``.
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
    view: Callable | None = None,
) -> dict:
    """Collate ``cells`` and mask them at a ratio drawn from ``ratios``.

    ``views`` > 1 repeats the cells that many times (rows ``i + k * len(cells)`` are the same
    cell), each copy with its own mask: the views a contrastive objective compares. With a
    ``view`` each copy is cut from its cell (gene tokens left out, values binned anew), so two
    views share no trivial fingerprint of the cell; then ``profile_gene_ids``/``profile_values``
    keep the whole cells (same rows) for objectives that reconstruct the cell, where a gene left
    out of a view counts as masked, not unexpressed. Every random draw comes from ``generator``,
    so the batch depends only on its seed.

    Parameters
    ----------
    cells : list of tuple of numpy.ndarray
        (gene ids, values) of each cell.
    pad_id : int
        The ``<pad>`` token id.
    ratios : list of float
        The mask ratios, one drawn for the batch.
    generator : torch.Generator
        A CPU generator, the batch's only source of randomness.
    pin_memory : bool, default False
        Pin the tensors so copies to a GPU can overlap.
    views : int, default 1
        Copies of each cell.
    view : callable or None, default None
        ``view(gene_ids, values, generator=...)`` cuts a view from a cell (see
        :func:`contrastive_view`); None: views are whole cells.

    Returns
    -------
    dict
        :func:`collate`'s tensors plus ``masked_values`` (the model's input), ``mask``, the
        profile tensors when views are cut, and ``lengths`` (tokens per row, numpy).
    """
    cells = list(cells) * views
    whole = None
    if views > 1 and view is not None:
        whole = collate(cells, pad_id)  # the genes a view leaves out are still the cell's
        cells = [view(g, v, generator=generator) for g, v in cells]
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


def contrastive_view(kind: str, keep: float, n_bins: int) -> Callable | None:
    """How a contrastive view is cut from a cell (``train.contrastive_view``).

    ``genes``: a uniform random subset of its gene tokens (:func:`gene_subset`); ``thinned``: the
    genes a shallower sequencing would still show, binned anew (:func:`thinned_subset`).

    Parameters
    ----------
    kind : str
        "genes" or "thinned".
    keep : float
        The share of genes a view keeps (``train.contrastive_view_genes``).
    n_bins : int
        The number of bins, for ``thinned``.

    Returns
    -------
    callable or None
        ``view(gene_ids, values, generator=...)``; None at ``keep`` >= 1: the views are the whole
        cell.

    Raises
    ------
    ValueError
        An unknown ``kind`` (with ``keep`` < 1).
    """
    if keep >= 1:
        return None
    if kind == "genes":
        return partial(gene_subset, fraction=keep)
    if kind == "thinned":
        return partial(thinned_subset, keep=keep, n_bins=n_bins)
    raise ValueError(f"unknown contrastive view {kind!r}")


def gene_subset(
    gene_ids: np.ndarray, values: np.ndarray, fraction: float, generator: torch.Generator
):
    """``<cls>`` and a random ``fraction`` of a cell's gene tokens (at least one), in their order.

    A cell with fewer than two gene tokens is returned whole.

    Parameters
    ----------
    gene_ids, values : numpy.ndarray
        The cell's tokens, ``<cls>`` first.
    fraction : float
        The share of gene tokens to keep.
    generator : torch.Generator
        The draw's generator.

    Returns
    -------
    tuple of numpy.ndarray
        (gene ids, values) of the view.
    """
    n = len(gene_ids) - 1
    if n < 2:
        return gene_ids, values
    keep = max(1, round(fraction * n))
    chosen = np.sort(torch.randperm(n, generator=generator)[:keep].numpy()) + 1
    rows = np.r_[0, chosen]
    return gene_ids[rows], values[rows]


def thinned_subset(
    gene_ids: np.ndarray, values: np.ndarray, keep: float, n_bins: int, generator: torch.Generator
):
    """``<cls>`` and the gene tokens a shallower sequencing of the cell would show, binned anew.

    At least one gene is kept, in their order. A gene at quantile q of the cell's bins (ties in
    random order) is kept with probability ``keep ** (1 - q)``: the least expressed genes vanish
    first, as under binomial thinning, which loses a count-1 gene with probability 1 - depth and a
    highly expressed one almost never. The genes kept, ranked in the same order, get the bins the
    pipeline's per-cell quantile bins give distinct values: ``1 + rank * (n_bins - 2) // (kept -
    1)``, from 1 to n_bins - 1, so a view's bins mean what a shallow cell's bins mean. A lone gene
    gets the middle bin (the pipeline draws a lone value's bin uniformly). A cell with fewer than
    two gene tokens is returned whole.

    Parameters
    ----------
    gene_ids, values : numpy.ndarray
        The cell's tokens, ``<cls>`` first.
    keep : float
        The sequencing depth kept, 0 to 1.
    n_bins : int
        The number of bins.
    generator : torch.Generator
        The draw's generator.

    Returns
    -------
    tuple of numpy.ndarray
        (gene ids, values) of the view.
    """
    n = len(gene_ids) - 1
    if n < 2:
        return gene_ids, values
    noise = torch.rand(2, n, generator=generator, dtype=torch.float64).numpy()
    order = np.lexsort((noise[0], values[1:]))  # by bin, ties in random order
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    kept = np.flatnonzero(noise[1] < keep ** (1 - (rank + 0.5) / n))
    if kept.size == 0:
        kept = order[-1:]  # the most expressed gene: a view is never empty
    if kept.size == 1:
        bins = np.array([n_bins // 2])
    else:
        new_rank = np.argsort(np.argsort(rank[kept]))
        bins = 1 + new_rank * (n_bins - 2) // (kept.size - 1)
    return gene_ids[np.r_[0, kept + 1]], np.r_[values[:1], bins.astype(values.dtype)]


def prefetched(make: Callable[[int], T], keys: Iterable[int], depth: int = 2) -> Iterator[T]:
    """Yield ``make(k)`` for each key, building up to ``depth`` items ahead in a background thread.

    Batch preparation (collate and masking on the CPU) then overlaps the training step instead
    of adding to it. Items come in order and are the same as without the thread; an exception
    in ``make`` is raised where its item would have been yielded.

    Parameters
    ----------
    make : callable
        Builds the item of a key.
    keys : iterable of int
        The keys, in order.
    depth : int, default 2
        Items built ahead at the most, at least 1.

    Yields
    ------
    object
        ``make(k)`` for each key in order.

    Raises
    ------
    ValueError
        ``depth`` below 1.
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


@dataclass(frozen=True)
class TrainingData:
    """The shards, their batches for this process, and the run's length in steps.

    Made by ``TrainingData.load``.

    Attributes
    ----------
    manifest_path : Path
        The shards' manifest.json.
    manifest : dict
        The manifest.
    train_ds, val_ds : ShardDataset
        The training and validation cells.
    train_sampler : LengthGroupedBatchSampler
        This process's training batches.
    val_batches : list of tuple
        (batch index, cell indices): this rank's share of the validation batches, the same every
        epoch.
    steps_per_epoch, total_steps : int
        Optimizer steps an epoch and in the whole run.
    """

    manifest_path: Path
    manifest: dict
    train_ds: ShardDataset
    val_ds: ShardDataset
    train_sampler: LengthGroupedBatchSampler
    val_batches: list  # [(batch index, cell indices)], this rank's share, the same every epoch
    steps_per_epoch: int
    total_steps: int

    @property
    def shard_dir(self) -> Path:
        """The shards folder (the manifest's)."""
        return self.manifest_path.parent

    @classmethod
    def load(cls, manifest_path: Path, cfg: TrainConfig, env: Environment) -> TrainingData:
        """Open the shards of a manifest and plan this process's batches.

        Parameters
        ----------
        manifest_path : Path
            The shards' manifest.json.
        cfg : TrainConfig
            Batch size, seed, bucket size and epochs.
        env : Environment
            This process's rank and the number of processes.

        Returns
        -------
        TrainingData

        Raises
        ------
        ValueError
            No validation cells, or too few training cells for one batch per process.
        CorruptArtifactError
            The vocabulary or a shard does not match the manifest.
        """
        manifest = read_manifest(manifest_path)
        check_vocab(manifest, manifest_path.parent / "vocab.json", manifest_path)
        train_ds = ShardDataset(manifest_path, "train")
        val_ds = ShardDataset(manifest_path, "validation")
        if len(val_ds) == 0:
            raise ValueError(
                f"{manifest_path} has no validation cells; pretrain needs them to choose "
                "best_model.pt: raise split.validation_fraction or sample more cells"
            )
        sampler = partial(
            LengthGroupedBatchSampler,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            bucket_size_batches=cfg.bucket_size_batches,
        )
        train_sampler = sampler(train_ds.lengths, rank=env.rank, world_size=env.world_size)
        # Validation: the same batches every epoch (no shuffle), this rank's share of them.
        val_batches = sampler(val_ds.lengths, shuffle=False).all_batches(0)
        val_batches = list(enumerate(val_batches))[env.rank :: env.world_size]
        steps_per_epoch = len(train_sampler)
        if steps_per_epoch == 0:
            raise ValueError(
                f"{len(train_ds)} training cells make no batch for {env.world_size} process(es)"
            )
        return cls(
            manifest_path,
            manifest,
            train_ds,
            val_ds,
            train_sampler,
            val_batches,
            steps_per_epoch,
            cfg.epochs * steps_per_epoch,
        )


def derived_seed(*keys: int) -> int:
    """A seed for one purpose, derived from several integers (numpy's SeedSequence).

    Parameters
    ----------
    *keys : int
        E.g. the run's seed, a purpose number and a rank or batch index.

    Returns
    -------
    int
        A non-negative 63-bit seed.
    """
    return int(
        np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1
    )
