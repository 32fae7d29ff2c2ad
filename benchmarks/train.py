"""Training-step throughput of the cell transformer: cells/s, tokens/s and MFU.

Variants, each adding one optimisation to the previous:
  pad1201_fp32   every batch padded to the longest possible cell (1201 tokens), fp32 (the
                 seeds' way);
  grouped_fp32   each batch padded only to its longest cell, cells of similar length grouped;
  grouped_bf16   + bf16 autocast (CUDA; fused SDPA kernels);
  compiled_bf16  + torch.compile.
Tokens/s and MFU count real (non-padding) tokens only, so padding shows up as lost throughput.

    python benchmarks/train.py --device cuda --out benchmarks/results/train_cuda.json
    python benchmarks/train.py --device cpu --batch-size 8 --steps 3 --out benchmarks/results/train_cpu.json

Cell lengths come from a shard manifest (--manifest) or a log-normal fit to blood cells with
1,200 HVGs (mean about 500 tokens, at most 1,201).
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

from scllm.data import LengthGroupedBatchSampler, ShardDataset, collate, mask_values  # noqa: E402
from scllm.model import CellTransformer, ModelConfig, masked_mse, peak_flops  # noqa: E402

VARIANTS = ("pad1201_fp32", "grouped_fp32", "grouped_bf16", "compiled_bf16")
N_GENES, N_BINS, MAX_LEN = 1200, 51, 1201


def synthetic_lengths(n: int, rng: np.random.Generator, mean: float) -> np.ndarray:
    lengths = rng.lognormal(np.log(mean) - 0.18, 0.6, size=n).astype(np.int64) + 1
    return np.clip(lengths, 2, MAX_LEN)


def make_cells(lengths: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    cells = []
    for n in lengths:
        genes = np.r_[N_GENES, rng.choice(N_GENES, size=n - 1, replace=False)].astype(np.int32)
        values = np.r_[0, rng.integers(1, N_BINS, size=n - 1)].astype(np.int16)
        cells.append((genes, values))
    return cells


def pad_to(batch: dict, length: int, pad_id: int) -> dict:
    extra = length - batch["gene_ids"].shape[1]
    if extra <= 0:
        return batch
    b = batch["gene_ids"].shape[0]
    return {
        "gene_ids": torch.cat([batch["gene_ids"], torch.full((b, extra), pad_id, dtype=batch["gene_ids"].dtype)], 1),
        "values": torch.cat([batch["values"], torch.full((b, extra), -2, dtype=batch["values"].dtype)], 1),
        "padding_mask": torch.cat([batch["padding_mask"], torch.ones((b, extra), dtype=torch.bool)], 1),
    }


def run_variant(variant, cells, lengths, args, device) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=N_GENES + 2, n_bins=N_BINS, n_layers=args.layers, n_heads=args.heads,
                      d_model=args.d_model, d_ff=args.d_ff, dropout=0.2)
    raw = CellTransformer(cfg).to(device)
    model = torch.compile(raw, dynamic=True) if variant.startswith("compiled") else raw
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-4, fused=device.type == "cuda")
    bf16 = variant.endswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    grouped = not variant.startswith("pad1201")
    sampler = LengthGroupedBatchSampler(lengths, args.batch_size, seed=0, shuffle=True)
    batches = sampler.epoch_batches(0) if grouped else \
        [list(range(i, i + args.batch_size)) for i in range(0, len(cells) - args.batch_size + 1, args.batch_size)]
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(3)  # cells, real tokens, useful FLOPs
    total = args.warmup + args.steps
    if len(batches) < total:
        raise SystemExit(f"{len(batches)} batches < warmup + steps = {total}; raise --cells")
    for step, idx in enumerate(batches[:total]):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, counts[:] = time.perf_counter(), 0
        batch_cells = [cells[i] for i in idx]
        batch = collate(batch_cells, cfg.pad_id)
        if not grouped:
            batch = pad_to(batch, MAX_LEN, cfg.pad_id)
        masked, mask = mask_values(batch["values"], batch["padding_mask"], 0.5, gen)
        gene_ids, values, pad = (t.to(device, non_blocking=True) for t in (batch["gene_ids"], batch["values"], batch["padding_mask"]))
        masked, mask = masked.to(device), mask.to(device)
        with autocast:
            pred = model(gene_ids, masked, pad)
        loss = masked_mse(pred["expr_pred"], values, mask) + masked_mse(pred["mvc_pred"], values, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        optimizer.step()
        lens = np.array([len(g) for g, _ in batch_cells])
        counts += (len(lens), lens.sum(), float((lens * raw.estimate_flops_per_token(lens)).sum()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_flops(device)
    return {
        "variant": variant, "steps": args.steps, "seconds": seconds,
        "cells_per_s": counts[0] / seconds, "tokens_per_s": counts[1] / seconds,
        "mfu": counts[2] / seconds / peak if peak else None,
        "padded_fraction": None if grouped else 1 - counts[1] / (counts[0] * MAX_LEN),
        "loss": float(loss.detach()),
    }


def machine(device: torch.device) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    p.add_argument("--manifest", help="take cell lengths from this shard manifest's train split")
    p.add_argument("--mean-length", type=float, default=500.0)
    p.add_argument("--cells", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = args.variants or (VARIANTS if device.type == "cuda" else ("pad1201_fp32", "grouped_fp32"))
    rng = np.random.default_rng(0)
    if args.manifest:
        lengths = ShardDataset(args.manifest, "train").lengths[: args.cells]
    else:
        lengths = synthetic_lengths(args.cells, rng, args.mean_length)
    cells = make_cells(lengths, rng)
    results = []
    for variant in variants:
        row = run_variant(variant, cells, lengths, args, device)
        results.append(row)
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(f"{variant:14s} {row['cells_per_s']:9.1f} cells/s {row['tokens_per_s']:11.0f} tokens/s MFU {mfu}", flush=True)
    out = {"machine": machine(device), "settings": vars(args), "mean_length": float(np.mean(lengths)), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
