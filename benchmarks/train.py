"""Training-step throughput of the cell transformer: cells/s, tokens/s, achieved FLOP/s and MFU.

Variants, each adding one optimisation to the previous:
  pad1201_fp32   every batch padded to the longest possible cell (1201 tokens), fp32 (the
                 seeds' way);
  grouped_fp32   each batch padded only to its longest cell, cells of similar length grouped;
  grouped_bf16   + bf16 autocast (fused SDPA attention kernels);
  compiled_bf16  + torch.compile.
  tokens_bf16    grouped_bf16 with batches cut by a token budget (--max-tokens: cells per batch
                 times its longest cell) instead of a fixed number of cells, so that short cells
                 make large batches and long cells small ones.
Each variant runs the training step of scllm.train.loop: batches collated and masked in a
background thread (scllm.train.batches.training_batch and .prefetched), forward, both masked
losses, backward, gradient clipping, AdamW. Tokens/s, FLOP/s and MFU count real (non-padding)
tokens only, so padding shows up as lost throughput.

    SHARDS=$(python -c 'from scllm.provenance import run_data_files as f
print(f("results/demo")["shards"])')   # the demo run's shards (results/data/...)
    python benchmarks/train.py --device cuda --manifest $SHARDS/manifest.json \\
        --batch-size 32 128 --out benchmarks/results/train_cuda_pbmc3k.json
    python benchmarks/train.py --device cpu --manifest $SHARDS/manifest.json \\
        --cells 1000 --batch-size 4 --warmup 2 --steps 4 \\
        --variants pad1201_fp32 grouped_fp32 grouped_bf16 compiled_bf16 \\
        --out benchmarks/results/train_cpu_pbmc3k.json

Cell lengths: resampled from a shard manifest's training cells (--manifest: real data), or a
log-normal with mean --mean-length (synthetic; capped at 1,201 tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scllm.config import TrainConfig  # noqa: E402
from scllm.model import CellTransformer, ModelConfig, attention_kernels, peak_flops
from scllm.shards import ShardDataset  # noqa: E402
from scllm.tokens import PAD_VALUE  # noqa: E402
from scllm.train.batches import (  # noqa: E402
    TRAINING_BATCH_KEYS,
    LengthGroupedBatchSampler,
    prefetched,
    training_batch,
)
from scllm.train.objectives import masked_mse  # noqa: E402

VARIANTS = ("pad1201_fp32", "grouped_fp32", "grouped_bf16", "compiled_bf16", "tokens_bf16")
N_GENES, N_BINS, MAX_LEN = 1200, 51, 1201
DEFAULTS = TrainConfig()  # the library's training settings: the benchmark times those
MASK_RATIOS = DEFAULTS.mask_ratios
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, for the "what MFU would this need" line


def synthetic_lengths(n: int, rng: np.random.Generator, mean: float) -> np.ndarray:
    lengths = rng.lognormal(np.log(mean) - 0.18, 0.6, size=n).astype(np.int64) + 1
    return np.clip(lengths, 2, MAX_LEN)


def make_cells(
    lengths: np.ndarray, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random cells of the given lengths: <cls> then distinct genes with bins 1..N_BINS-1."""
    cells = []
    for n in lengths:
        genes = np.r_[N_GENES, rng.choice(N_GENES, size=n - 1, replace=False)].astype(np.int32)
        values = np.r_[0, rng.integers(1, N_BINS, size=n - 1)].astype(np.int16)
        cells.append((genes, values))
    return cells


def pad_to(batch: dict, length: int, pad_id: int) -> dict:
    """Pad a training batch to ``length`` tokens (the seeds' fixed-length batches)."""
    extra = length - batch["gene_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {
        "gene_ids": pad_id,
        "values": PAD_VALUE,
        "masked_values": PAD_VALUE,
        "padding_mask": True,
        "mask": False,
    }
    out = dict(batch)
    for key, value in fill.items():
        t = batch[key]
        out[key] = torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], 1)
    return out


def token_budget_batches(
    lengths: np.ndarray, max_tokens: int, seed: int = 0, bucket_cells: int = 20_000
) -> list[np.ndarray]:
    """Batches of at most ``max_tokens`` padded tokens: permute the cells, sort each bucket of
    ``bucket_cells`` longest first, and let a batch take cells while (cells + 1) x its first
    (longest) cell's length fits the budget; then shuffle the batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), bucket_cells):
        bucket = order[start : start + bucket_cells]
        bucket = bucket[np.argsort(-lengths[bucket], kind="stable")]
        i = 0
        while i < len(bucket):
            n = max(1, max_tokens // int(lengths[bucket[i]]))
            batches.append(bucket[i : i + n])
            i += n
    return [batches[i] for i in rng.permutation(len(batches))]


def flops_per_cell(model: CellTransformer, lengths: np.ndarray) -> np.ndarray:
    """Useful training FLOPs of each cell: its real tokens times FLOPs per token at its length."""
    return lengths * model.estimate_flops_per_token(lengths)


def attention_kernel(model, batch: dict, device: torch.device, autocast) -> str:
    """The SDPA kernel a training-mode forward pass of ``model`` runs on ``batch``."""
    inputs = [batch[key].to(device) for key in ("gene_ids", "masked_values", "padding_mask")]
    return attention_kernels(model, *inputs, autocast=autocast)


def train_step(
    model, raw_model, optimizer, batch: dict, device, autocast=None
) -> tuple[torch.Tensor, int]:
    """One step as scllm.train runs it (``model`` may be compiled; ``raw_model`` holds the
    weights to clip). Returns the loss and the number of tokens computed, padding included."""
    gene_ids, values, padding_mask, masked, mask = (
        batch[key].to(device, non_blocking=True) for key in TRAINING_BATCH_KEYS
    )
    with autocast or nullcontext():
        pred = model(gene_ids, masked, padding_mask)
    loss = masked_mse(pred["expr_pred"], values, mask) + masked_mse(
        pred["gepc_pred"], values, mask
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), DEFAULTS.grad_clip)
    optimizer.step()
    return loss, gene_ids.numel()


def run_variant(variant: str, batch_size: int, cells, lengths, args, device) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=N_GENES + 2,
        n_bins=N_BINS,
        n_layers=args.layers,
        n_heads=args.heads,
        d_model=args.d_model,
        d_ff=args.d_ff,
        dropout=0.2,
    )
    raw = CellTransformer(cfg).to(device)
    model = torch.compile(raw, dynamic=True) if variant.startswith("compiled") else raw
    optimizer = torch.optim.AdamW(raw.parameters(), lr=DEFAULTS.lr, fused=device.type == "cuda")
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if variant.endswith("bf16")
        else nullcontext()
    )
    grouped = not variant.startswith("pad1201")
    # Every variant times the same cells in the same batches; pad1201 pads them to 1,201 tokens.
    # tokens_bf16 takes batch_size as its token budget.
    if variant == "tokens_bf16":
        batches = token_budget_batches(lengths, batch_size)
    else:
        batches = LengthGroupedBatchSampler(
            lengths, batch_size, seed=0, shuffle=True
        ).epoch_batches(0)
    total = args.warmup + args.steps
    if len(batches) < total:
        raise SystemExit(
            f"{len(batches)} batches of {batch_size} < warmup + steps = {total}; raise --cells"
        )
    pin = device.type == "cuda"

    def make_batch(b: int) -> dict:
        batch = training_batch(
            [cells[i] for i in batches[b]],
            cfg.pad_id,
            MASK_RATIOS,
            torch.Generator().manual_seed(b),
            pin_memory=pin and grouped,
        )
        if grouped:
            return batch
        batch = pad_to(batch, MAX_LEN, cfg.pad_id)
        return {key: t.pin_memory() if pin and key != "lengths" else t for key, t in batch.items()}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counts = np.zeros(4)  # cells, real tokens, computed (padded) tokens, useful FLOPs
    for step, batch in enumerate(prefetched(make_batch, range(total))):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, counts[:] = time.perf_counter(), 0
        loss, computed_tokens = train_step(model, raw, optimizer, batch, device, autocast)
        lens = batch["lengths"]
        counts += (len(lens), lens.sum(), computed_tokens, flops_per_cell(raw, lens).sum())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = peak_flops(device)
    return {
        "variant": variant,
        "batch_size": batch_size if variant != "tokens_bf16" else None,
        "max_tokens": batch_size if variant == "tokens_bf16" else None,
        "mean_cells_per_batch": counts[0] / args.steps,
        "steps": args.steps,
        "seconds": seconds,
        "cells_per_s": counts[0] / seconds,
        "tokens_per_s": counts[1] / seconds,
        "mean_timed_length": counts[1] / counts[0],
        "useful_tflops": counts[3] / seconds / 1e12,
        "mfu": counts[3] / seconds / peak if peak else None,
        "padding_fraction": 1 - counts[1] / counts[2],
        "attention": attention_kernel(raw, make_batch(0), device, autocast),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "loss": float(loss.detach()),
    }


def input_pipeline_rate(
    cells, lengths, batch_size: int, pin_memory: bool, n_batches: int = 50
) -> float:
    """Cells/s that one thread collates and masks (training_batch), with no model: the most a
    training process can be fed, since batch preparation runs in one background thread."""
    batches = LengthGroupedBatchSampler(lengths, batch_size, seed=0).epoch_batches(0)[:n_batches]
    start = time.perf_counter()
    for b, idx in enumerate(batches):
        training_batch(
            [cells[i] for i in idx],
            N_GENES + 1,
            MASK_RATIOS,
            torch.Generator().manual_seed(b),
            pin_memory,
        )
    return sum(len(idx) for idx in batches) / (time.perf_counter() - start)


def step_overhead(args, device, steps: int = 20) -> dict:
    """Seconds per training step of a model with the benchmark's layer count but d_model 8, on
    2 cells of 8 tokens: the step's compute is negligible, so this is the fixed cost of running
    a step eagerly (Python, dispatch, kernel launches, optimizer), counted in aten ops too. A step
    must carry enough cells to amortise it: at this overhead, 8,000 cells/s leaves no time for
    compute below 8,000 x overhead cells per step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=N_GENES + 2, n_bins=N_BINS, n_layers=args.layers, n_heads=1, d_model=8, d_ff=8
    )
    model = CellTransformer(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=DEFAULTS.lr, fused=device.type == "cuda")
    cells = make_cells(np.array([8, 8]), np.random.default_rng(0))
    batch = training_batch(cells, cfg.pad_id, [0.5], torch.Generator().manual_seed(0))
    batch = {
        key: batch[key].to(device) for key in TRAINING_BATCH_KEYS
    }  # on the device already: no copies timed
    # As training runs by default: bf16 autocast on CUDA (it adds cast kernels), fp32 on CPU.
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    for _ in range(3):
        train_step(model, model, optimizer, batch, device, autocast)
    with Counter():
        train_step(model, model, optimizer, batch, device, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, model, optimizer, batch, device, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {
        "seconds_per_step": seconds,
        "ops_per_step": Counter.n,
        "min_cells_per_step_for_8000_cells_per_s": 8000 * seconds,
    }


def machine(device: torch.device) -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=VARIANTS,
        help="default: all on CUDA; pad1201_fp32 and grouped_fp32 on CPU",
    )
    p.add_argument(
        "--manifest", help="resample cell lengths from this shard manifest's training cells"
    )
    p.add_argument(
        "--mean-length", type=float, default=500.0, help="synthetic lengths: log-normal mean"
    )
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[DEFAULTS.batch_size],
        help="one or more cells-per-step values",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        nargs="+",
        default=[16384, 65536],
        help="tokens_bf16: padded-token budgets per batch",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--layers", type=int, default=ModelConfig.n_layers)
    p.add_argument("--heads", type=int, default=ModelConfig.n_heads)
    p.add_argument("--d-model", type=int, default=ModelConfig.d_model)
    p.add_argument("--d-ff", type=int, default=ModelConfig.d_ff)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision(
            "high"
        )  # the fp32 variants use TF32 tensor cores on CUDA
    variants = args.variants or (
        VARIANTS if device.type == "cuda" else ("pad1201_fp32", "grouped_fp32")
    )
    rng = np.random.default_rng(0)
    if args.manifest:
        real = ShardDataset(args.manifest, "train").lengths
        lengths = rng.choice(real, size=args.cells, replace=True)
        source = f"resampled from the {len(real)} training cells of {args.manifest}"
    else:
        lengths = synthetic_lengths(args.cells, rng, args.mean_length)
        source = f"synthetic log-normal, mean {args.mean_length:g}"
    cells = make_cells(lengths, rng)
    probe = CellTransformer(
        ModelConfig(
            vocab_size=N_GENES + 2,
            n_layers=args.layers,
            n_heads=args.heads,
            d_model=args.d_model,
            d_ff=args.d_ff,
        )
    )
    mean_flops = float(flops_per_cell(probe, lengths).mean())
    print(
        f"lengths: {source}; mean {lengths.mean():.0f}, max {lengths.max()} tokens; "
        f"{mean_flops / 1e9:.1f} GFLOP per cell (training step); at 40% MFU of an H100 "
        f"that is {0.4 * H100_BF16_PEAK / mean_flops:,.0f} cells/s",
        flush=True,
    )

    pipeline = []
    for bs in args.batch_size:
        pipeline.append(
            {
                "batch_size": bs,
                "cells_per_s": input_pipeline_rate(cells, lengths, bs, device.type == "cuda"),
            }
        )
        print(
            f"input pipeline, batch {bs}: {pipeline[-1]['cells_per_s']:,.0f} cells/s (one thread)",
            flush=True,
        )

    overhead = step_overhead(args, device)
    print(
        f"fixed cost of an eager training step: {overhead['seconds_per_step'] * 1e3:.1f} ms "
        f"({overhead['ops_per_step']} aten ops); 8,000 cells/s needs more than "
        f"{overhead['min_cells_per_step_for_8000_cells_per_s']:.0f} cells per step",
        flush=True,
    )

    results = []
    out = {
        "machine": machine(device),
        "settings": vars(args),
        "lengths": source,
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "flops_per_cell": mean_flops,
        "input_pipeline": pipeline,
        "step_overhead": overhead,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        for bs in args.max_tokens if variant == "tokens_bf16" else args.batch_size:
            try:
                row = run_variant(variant, bs, cells, lengths, args, device)
            except Exception as error:  # out of memory, a compile failure: record it, go on
                row = {
                    "variant": variant,
                    "batch_size": bs,
                    "error": f"{type(error).__name__}: {error}"[:500],
                }
            if "error" in row:
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # here, after the failed variant's frames are gone
                print(f"{variant:14s} batch {bs:4d}: {row['error']}", flush=True)
            else:
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                print(
                    f"{variant:14s} batch {bs:5d}: {row['cells_per_s']:9.1f} cells/s "
                    f"{row['tokens_per_s']:11.0f} tokens/s {row['useful_tflops']:8.3f} TFLOP/s "
                    f"MFU {mfu} padding {row['padding_fraction']:.1%} "
                    f"attention {row['attention']}",
                    flush=True,
                )
            results.append(row)
            # Written after every row: a run cut short keeps what it measured.
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
