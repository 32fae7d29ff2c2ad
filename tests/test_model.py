"""The cell transformer, masking and the masked loss."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from scllm.model import CellTransformer, ModelConfig
from scllm.tokens import MASK_VALUE, PAD_VALUE, collate
from scllm.train.batches import mask_values
from scllm.train.objectives import (
    contrastive_loss,
    ecs_loss,
    gepc_profile_mse,
    masked_mse,
    variance_covariance_loss,
)

N_GENES, N_BINS = 30, 51
CLS_ID, PAD_ID = N_GENES, N_GENES + 1


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors gain nothing from threads, and OpenMP threads spin badly on a busy 2-core
    # machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, **overrides) -> CellTransformer:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=N_GENES + 2,
        n_bins=N_BINS,
        n_layers=2,
        n_heads=2,
        d_model=32,
        d_ff=64,
        dropout=0.0,
        pad_id=PAD_ID,
    )
    return CellTransformer(ModelConfig(**{**cfg, **overrides}))


def random_cells(n_cells, min_len=5, max_len=25, seed=0):
    """Cells as (gene_ids, values) token arrays: <cls> then distinct genes with bins
    1..N_BINS-1."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        n = int(rng.integers(min_len, max_len + 1))
        genes = rng.choice(N_GENES, n, replace=False)
        cells.append(
            (
                np.r_[CLS_ID, genes].astype(np.int32),
                np.r_[0, rng.integers(1, N_BINS, n)].astype(np.int16),
            )
        )
    return cells


def test_tiny_model_overfits_one_batch():
    batch = collate(random_cells(8), PAD_ID)
    masked, mask = mask_values(
        batch["values"], batch["padding_mask"], 0.5, torch.Generator().manual_seed(0)
    )
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        out = model(batch["gene_ids"], masked, batch["padding_mask"])
        loss = masked_mse(out["expr_pred"], batch["values"], mask) + masked_mse(
            out["gepc_pred"], batch["values"], mask
        )
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
    masked, mask = mask_values(
        batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(3)
    )
    assert not mask[:, 0].any(), "<cls> was masked"
    assert not (mask & batch["padding_mask"]).any(), "padding was masked"
    for row, (genes, _) in enumerate(cells):
        assert mask[row].sum().item() == round(ratio * (len(genes) - 1))
    assert (masked[mask] == MASK_VALUE).all()
    assert torch.equal(masked[~mask], batch["values"][~mask])
    # Same generator seed, same masks; another seed, other masks.
    _, again = mask_values(
        batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(3)
    )
    _, other = mask_values(
        batch["values"], batch["padding_mask"], ratio, torch.Generator().manual_seed(4)
    )
    assert torch.equal(mask, again) and not torch.equal(mask, other)


@pytest.mark.parametrize("norm_first", [True, False])
def test_outputs_do_not_depend_on_padding(norm_first):
    model = tiny_model(seed=1, norm_first=norm_first).eval()
    short, long = (
        random_cells(2, seed=2, min_len=6, max_len=6)[0],
        random_cells(1, seed=3, min_len=25)[0],
    )
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
    torch.testing.assert_close(p["gepc_pred"][1, :n], a["gepc_pred"][0], atol=1e-5, rtol=0)
    assert torch.isfinite(p["expr_pred"]).all() and torch.isfinite(p["gepc_pred"]).all()


def test_training_mode_with_padding_gives_finite_gradients():
    model = tiny_model(dropout=0.2).train()
    batch = collate(random_cells(6, min_len=1), PAD_ID)
    out = model(batch["gene_ids"], batch["values"], batch["padding_mask"])
    assert out["expr_pred"].shape == out["gepc_pred"].shape == batch["gene_ids"].shape
    assert out["cell_emb"].shape == (6, 32)
    (out["expr_pred"].sum() + out["gepc_pred"].sum()).backward()
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
    code = (
        "import sys, scllm; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert callable(scllm.load_model)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- cell-embedding readouts and objectives, each against a plain-Python computation -------------


@pytest.mark.parametrize("style", ["cls", "mean", "cls+mean", "sum"])
def test_cell_embedding_readouts(style):
    model = tiny_model(seed=4, cell_emb_style=style).eval()
    cells = random_cells(3, min_len=3, max_len=9, seed=5)
    batch = collate(cells, PAD_ID)
    x = {}
    model.read_cell = (lambda orig: lambda h, pad: (x.setdefault("h", h), orig(h, pad))[1])(
        model.read_cell
    )
    with torch.no_grad():
        emb = model(batch["gene_ids"], batch["values"], batch["padding_mask"])["cell_emb"]
    h = x["h"]
    for row, (genes, _) in enumerate(cells):
        cls, mean = h[row, 0], h[row, 1 : len(genes)].mean(0)  # gene tokens only, no padding
        total = h[row, 1 : len(genes)].sum(0) / math.sqrt(N_GENES + 2)
        expected = {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean]), "sum": total}[
            style
        ]
        torch.testing.assert_close(emb[row], expected, atol=1e-6, rtol=0)
    assert emb.shape[1] == model.cell_emb_dim == (64 if style == "cls+mean" else 32)


def test_continuous_value_encoder_trains_and_ignores_padding():
    model = tiny_model(value_encoder="continuous").eval()
    assert not hasattr(model, "value_emb")
    short = random_cells(1, min_len=5, max_len=5, seed=6)[0]
    long = random_cells(1, min_len=20, seed=7)[0]
    with torch.no_grad():
        alone = model(
            *(collate([short], PAD_ID)[k] for k in ("gene_ids", "values", "padding_mask"))
        )
        both = model(
            *(collate([long, short], PAD_ID)[k] for k in ("gene_ids", "values", "padding_mask"))
        )
    torch.testing.assert_close(both["cell_emb"][1], alone["cell_emb"][0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="value_encoder"):
        tiny_model(value_encoder="embedding")
    with pytest.raises(ValueError, match="cell_emb_style"):
        tiny_model(cell_emb_style="max")


def test_ecs_loss_matches_scgpt_formula():
    emb = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    threshold = 0.3
    total = 0.0
    for i in range(5):
        for j in range(5):
            cos = (
                0.0
                if i == j
                else float(torch.dot(emb[i], emb[j]) / (emb[i].norm() * emb[j].norm()))
            )
            total += 1 - (max(cos, 0.0) - threshold) ** 2
    assert ecs_loss(emb, threshold).item() == pytest.approx(total / 25, abs=1e-6)


def test_variance_covariance_loss_matches_vicreg_formula():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(7, 4)) * [0.2, 1.0, 3.0, 0.5]  # two dimensions under the target std
    emb[:, 3] += 0.8 * emb[:, 1]  # and one correlated pair
    n, d = emb.shape
    centred = emb - emb.mean(0)
    std = np.sqrt(centred.var(0, ddof=1) + 1e-4)
    cov = centred.T @ centred / (n - 1)
    expected = np.maximum(1 - std, 0).mean() + (cov**2).sum() / d - (np.diag(cov) ** 2).sum() / d
    got = variance_covariance_loss(torch.tensor(emb, dtype=torch.float32)).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # decorrelated unit-variance dimensions cost (almost) nothing
    white = np.linalg.qr(rng.normal(size=(200, 4)))[0] * np.sqrt(199)
    assert (
        variance_covariance_loss(torch.tensor(white - white.mean(0), dtype=torch.float32)).item()
        < 0.05
    )
    with pytest.raises(ValueError, match="at least 2 rows"):
        variance_covariance_loss(torch.zeros(1, 4))


def test_contrastive_loss_matches_nt_xent():
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))  # 3 cells x 2 views
    t = 0.5
    z = [e / e.norm() for e in emb]
    total = 0.0
    for i in range(6):
        positive = (i + 3) % 6
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(6) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[positive]) / t) / denominator)
    assert contrastive_loss(emb, 2, t).item() == pytest.approx(total / 6, abs=1e-5)
    # Views that agree and cells that differ give a lower loss than random embeddings.
    aligned = torch.eye(3, 4).repeat(2, 1)
    assert contrastive_loss(aligned, 2, t) < contrastive_loss(emb, 2, t)
    with pytest.raises(ValueError, match="views"):
        contrastive_loss(emb[:5], 2, t)


def test_gepc_profile_mse_covers_masked_and_unexpressed_genes():
    cells = random_cells(4, min_len=3, max_len=10, seed=8)
    batch = collate(cells, PAD_ID)
    _, mask = mask_values(
        batch["values"], batch["padding_mask"], 0.5, torch.Generator().manual_seed(2)
    )
    pred = torch.randn(4, N_GENES, generator=torch.Generator().manual_seed(3))
    se, n = 0.0, 0
    for row, (genes, values) in enumerate(cells):
        masked = {
            int(g): int(v)
            for g, v, m in zip(genes[1:], values[1:], mask[row, 1 : len(genes)])
            if m
        }
        visible = {int(g) for g in genes[1:]} - set(masked)
        for gene in range(N_GENES):
            if gene not in visible:
                se += (float(pred[row, gene]) - masked.get(gene, 0)) ** 2
                n += 1
    assert gepc_profile_mse(
        pred, batch["gene_ids"], batch["values"], mask
    ).item() == pytest.approx(se / n, rel=1e-5)
    # visible_too: the whole profile, each cell's visible genes scored against their bins as well
    se_all = 0.0
    for row, (genes, values) in enumerate(cells):
        profile = dict(zip(genes[1:].tolist(), values[1:].tolist()))
        se_all += sum((float(pred[row, g]) - profile.get(g, 0)) ** 2 for g in range(N_GENES))
    assert gepc_profile_mse(
        pred, batch["gene_ids"], batch["values"], mask, visible_too=True
    ).item() == pytest.approx(se_all / (4 * N_GENES), rel=1e-5)
    model = tiny_model()
    out = model(batch["gene_ids"], batch["values"], batch["padding_mask"], all_genes=True)
    assert out["gepc_all_pred"].shape == (4, N_GENES)
    # The per-token GEPC prediction is the whole-vocabulary one read at the cell's genes.
    genes = batch["gene_ids"][0, 1 : len(cells[0][0])]
    torch.testing.assert_close(
        out["gepc_pred"][0, 1 : len(cells[0][0])], out["gepc_all_pred"][0, genes]
    )


def test_weights_saved_under_the_old_head_names_still_load():
    """The GEPC head's parameters were once named mvc_*: such a state dict loads into gepc_*."""
    cfg = ModelConfig(vocab_size=12, n_bins=51, n_layers=1, n_heads=2, d_model=8, d_ff=16)
    torch.manual_seed(0)
    saved = CellTransformer(cfg).state_dict()
    legacy = {k.replace("gepc_", "mvc_"): v for k, v in saved.items()}
    assert any(k.startswith("mvc_") for k in legacy) and not any(
        k.startswith("gepc_") for k in legacy
    )
    torch.manual_seed(1)
    model = CellTransformer(cfg)
    model.load_state_dict(legacy)  # strict: every key found
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
