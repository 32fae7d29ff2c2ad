"""The CUDA path: bf16 autocast, the fused attention kernels, training, resume and torch.compile
on a GPU. Skipped where no CUDA device is visible (CI has none); benchmarks/gpu_check.sh runs
them on a GPU machine.

Set SCLLM_CUDA_REPORT to a file path to have the measured tolerances written there as JSON.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from scllm.model import FUSED_ATTENTION_OPS, CellTransformer, ModelConfig, attention_kernels
from scllm.tokens import collate
from scllm.train.batches import mask_values
from scllm.train.loop import pretrain

from conftest import TINY_MODEL, TINY_TRAIN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_TRAIN = {**TINY_TRAIN, "device": "cuda"}


def report(key: str, value) -> None:
    """Add a measured number to the JSON file SCLLM_CUDA_REPORT names (if set)."""
    path = os.environ.get("SCLLM_CUDA_REPORT")
    if not path:
        return
    data = json.loads(open(path).read()) if os.path.exists(path) else {}
    data[key] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def random_batch(
    n_cells: int, n_genes: int, n_bins: int, seed: int, device
) -> tuple[torch.Tensor, ...]:
    """Cells of uneven lengths (so there is padding), masked at 40%, on ``device``."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        n = int(rng.integers(8, n_genes))
        genes = np.r_[n_genes, rng.choice(n_genes, n, replace=False)]
        cells.append((genes, np.r_[0, rng.integers(1, n_bins, n)]))
    batch = collate(cells, pad_id=n_genes + 1)
    masked, _ = mask_values(
        batch["values"], batch["padding_mask"], 0.4, torch.Generator().manual_seed(seed)
    )
    return batch["gene_ids"].to(device), masked.to(device), batch["padding_mask"].to(device)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, synthetic_shards):
    return synthetic_shards(tmp_path_factory.mktemp("cuda_shards"))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bf16_forward_matches_fp32():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=202, n_bins=51, n_layers=4, n_heads=4, d_model=128, d_ff=256, dropout=0.0
    )
    model = CellTransformer(cfg).cuda().eval()
    inputs = random_batch(32, 200, 51, seed=1, device="cuda")
    with torch.no_grad():
        fp32 = model(*inputs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(*inputs)
    real = ~inputs[2]
    errors = {
        "expr_pred": relative_error(bf16["expr_pred"][real], fp32["expr_pred"][real]),
        "cell_emb": relative_error(bf16["cell_emb"], fp32["cell_emb"]),
    }
    report("bf16_vs_fp32_relative_error", errors)
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per operation); four layers of
    # matmuls and softmax land at about 1e-2. A wrong mask or cast would be off by order 1.
    assert all(np.isfinite(v) and v < 3e-2 for v in errors.values()), errors


def test_training_forward_runs_a_fused_attention_kernel():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=202, n_bins=51, n_layers=2, n_heads=4, d_model=128, d_ff=256, dropout=0.1
    )
    model = CellTransformer(cfg).cuda().train()
    inputs = random_batch(16, 200, 51, seed=2, device="cuda")
    kernels = {}
    for precision, autocast in (
        ("bf16", torch.autocast("cuda", dtype=torch.bfloat16)),
        ("fp32", None),
    ):
        kernels[precision] = attention_kernels(model, *inputs, autocast=autocast)
    report("attention_kernels_training_forward", kernels)
    # With a padding mask, flash attention is not eligible; the memory-efficient or cuDNN kernel
    # is.
    assert kernels["bf16"] != "math" and set(kernels["bf16"].split(",")) <= set(
        FUSED_ATTENTION_OPS
    ), kernels


def largest_relative_difference(a: dict, b: dict) -> float:
    """max over tensors of ||a - b|| / ||a||."""
    return max(
        float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp(min=1e-12))
        for k in a
    )


def test_pretrain_on_cuda_resumes_within_tolerance(shards, tmp_path):
    full = pretrain(shards, tmp_path / "a", TINY_MODEL, CUDA_TRAIN)
    again = pretrain(shards, tmp_path / "a2", TINY_MODEL, CUDA_TRAIN)
    pretrain(shards, tmp_path / "b", TINY_MODEL, {**CUDA_TRAIN, "max_steps": 4})
    resumed = pretrain(shards, tmp_path / "b", TINY_MODEL, CUDA_TRAIN)
    assert resumed["done"] and resumed["global_step"] == full["global_step"]

    def weights(run):
        return torch.load(
            tmp_path / run / "last_checkpoint.pt", map_location="cpu", weights_only=True
        )["model"]

    a, a2, b = weights("a"), weights("a2"), weights("b")
    rerun, resume = largest_relative_difference(a, a2), largest_relative_difference(a, b)
    report(
        "cuda_weights_relative_difference",
        {
            "rerun": rerun,
            "resume": resume,
            "bitwise_equal_resume": resume == 0,
            "val_loss": [full["best_val_loss"], again["best_val_loss"], resumed["best_val_loss"]],
        },
    )
    # CUDA's atomics (embedding and attention backward) can make even two fresh runs differ in
    # the last bits; a resume must stay within that kind of noise, far below the weights' size.
    assert resume < 1e-3 and rerun < 1e-3, (rerun, resume)
    assert abs(resumed["best_val_loss"] - full["best_val_loss"]) < 1e-3 * full["best_val_loss"]


def test_compiled_training_on_cuda_matches_eager(shards, tmp_path):
    settings = {**CUDA_TRAIN, "epochs": 1}
    eager = pretrain(shards, tmp_path / "eager", TINY_MODEL, settings)
    compiled = pretrain(shards, tmp_path / "compiled", TINY_MODEL, {**settings, "compile": True})
    report("compiled_vs_eager_val_loss", [compiled["best_val_loss"], eager["best_val_loss"]])
    assert np.isfinite(compiled["best_val_loss"])
    assert abs(compiled["best_val_loss"] - eager["best_val_loss"]) < 2e-2 * eager["best_val_loss"]
