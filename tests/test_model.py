"""The cell transformer, masking and the masked loss."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from scllm.data import collate, mask_values
from scllm.model import CellTransformer, ModelConfig, masked_mse
from scllm.tokens import MASK_VALUE, PAD_VALUE

N_GENES, N_BINS = 30, 51
CLS_ID, PAD_ID = N_GENES, N_GENES + 1


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors gain nothing from threads, and OpenMP threads spin badly on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, **overrides) -> CellTransformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=N_GENES + 2, n_bins=N_BINS, n_layers=2, n_heads=2, d_model=32, d_ff=64, dropout=0.0,
               pad_id=PAD_ID)
    return CellTransformer(ModelConfig(**{**cfg, **overrides}))


def random_cells(n_cells, min_len=5, max_len=25, seed=0):
    """Cells as (gene_ids, values) token arrays: <cls> then distinct genes with bins 1..N_BINS-1."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        n = int(rng.integers(min_len, max_len + 1))
        genes = rng.choice(N_GENES, n, replace=False)
        cells.append((np.r_[CLS_ID, genes].astype(np.int32), np.r_[0, rng.integers(1, N_BINS, n)].astype(np.int16)))
    return cells


def test_tiny_model_overfits_one_batch():
    batch = collate(random_cells(8), PAD_ID)
    masked, mask = mask_values(batch["values"], batch["padding_mask"], 0.5, torch.Generator().manual_seed(0))
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        out = model(batch["gene_ids"], masked, batch["padding_mask"])
        loss = masked_mse(out["expr_pred"], batch["values"], mask) + masked_mse(out["mvc_pred"], batch["values"], mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.1 * losses[0], f"loss went from {losses[0]:.1f} to {losses[-1]:.1f}"


@pytest.mark.parametrize("ratio", [0.15, 0.25, 0.5, 0.75])
def test_masks_skip_cls_and_padding_and_match_ratio(ratio):
    cells = random_cells(16, min_len=1, max_len=29, seed=1)
    batch = collate(cells, PAD_ID)
    masked, mask = mask_values(batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(3))
    assert not mask[:, 0].any(), "<cls> was masked"
    assert not (mask & batch["padding_mask"]).any(), "padding was masked"
    for row, (genes, _) in enumerate(cells):
        assert mask[row].sum().item() == round(ratio * (len(genes) - 1))
    assert (masked[mask] == MASK_VALUE).all()
    assert torch.equal(masked[~mask], batch["values"][~mask])
    # Same generator seed, same masks; another seed, other masks.
    _, again = mask_values(batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(3))
    _, other = mask_values(batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(4))
    assert torch.equal(mask, again) and not torch.equal(mask, other)


@pytest.mark.parametrize("norm_first", [True, False])
def test_outputs_do_not_depend_on_padding(norm_first):
    model = tiny_model(seed=1, norm_first=norm_first).eval()
    short, long = random_cells(2, seed=2, min_len=6, max_len=6)[0], random_cells(1, seed=3, min_len=25)[0]
    alone = collate([short], PAD_ID)
    padded = collate([long, short], PAD_ID)
    assert padded["padding_mask"][1].sum() == len(long[0]) - len(short[0])
    # Mask a few tokens too, so the mask embedding row is exercised.
    for batch in (alone, padded):
        batch["values"][batch["values"].shape[0] - 1, 2:4] = MASK_VALUE
    with torch.no_grad():
        a = model(alone["gene_ids"], alone["values"], alone["padding_mask"])
        p = model(padded["gene_ids"], padded["values"], padded["padding_mask"])
    n = len(short[0])
    torch.testing.assert_close(p["cell_emb"][1], a["cell_emb"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(p["expr_pred"][1, :n], a["expr_pred"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(p["mvc_pred"][1, :n], a["mvc_pred"][0], atol=1e-5, rtol=0)
    assert torch.isfinite(p["expr_pred"]).all() and torch.isfinite(p["mvc_pred"]).all()


def test_training_mode_with_padding_gives_finite_gradients():
    model = tiny_model(dropout=0.2).train()
    batch = collate(random_cells(6, min_len=1), PAD_ID)
    out = model(batch["gene_ids"], batch["values"], batch["padding_mask"])
    assert out["expr_pred"].shape == out["mvc_pred"].shape == batch["gene_ids"].shape
    assert out["cell_emb"].shape == (6, 32)
    (out["expr_pred"].sum() + out["mvc_pred"].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not model.gene_emb.weight.grad[PAD_ID].any(), "the <pad> gene embedding must not learn"


def test_value_index_maps_mask_and_pad_to_their_own_rows():
    model = tiny_model()
    values = torch.tensor([[0, 1, 50, MASK_VALUE, PAD_VALUE]])
    assert model.value_index(values).tolist() == [[0, 1, 50, N_BINS, N_BINS + 1]]


def test_masked_mse_uses_masked_positions_only():
    pred = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    target = torch.tensor([[1, 0, 0], [0, 5, 9]])
    mask = torch.tensor([[False, True, False], [False, False, True]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((2.0**2 + 3.0**2) / 2)
    empty = masked_mse(pred, target, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()  # still part of the graph


def test_flops_estimate_grows_with_sequence_length():
    model = tiny_model()
    short, long = model.estimate_flops_per_token(10), model.estimate_flops_per_token(1000)
    assert short >= 6 * model.num_params() and long - short == 12 * 2 * 32 * 990
    assert model.num_params() < model.num_params(non_embedding=False)


def test_config_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(vocab_size=10, d_model=30, n_heads=4)
    assert ModelConfig(vocab_size=10).pad_id == 9


def test_import_scllm_does_not_import_torch():
    code = "import sys, scllm; assert 'torch' not in sys.modules, 'torch imported'; assert callable(scllm.load_model)"
    subprocess.run([sys.executable, "-c", code], check=True)
