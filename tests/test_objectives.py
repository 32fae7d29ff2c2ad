"""The cell-embedding levers in training: objectives switched on in a real run, gene-subset and
thinned views, gene embeddings initialised from the data's principal axes, and bad settings
refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scllm.model import CellTransformer, ModelConfig
from scllm.shards import ShardDataset
from scllm.train.batches import contrastive_view, gene_subset, thinned_subset, training_batch
from scllm.train.loop import pretrain
from scllm.train.optim import init_gene_embeddings_from_pca

TINY_MODEL = {"n_layers": 1, "n_heads": 2, "d_model": 16, "d_ff": 32, "dropout": 0.0}
TRAIN = {
    "epochs": 1,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 1,
    "log_every_steps": 1,
    "num_threads": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, synthetic_shards):
    return synthetic_shards(tmp_path_factory.mktemp("shards"), n_train=40, n_val=8)


@pytest.mark.parametrize(
    "settings, column",
    [
        ({"ecs_weight": 10.0}, "ecs_loss"),
        ({"contrastive_weight": 1.0}, "contrastive_loss"),
        ({"contrastive_weight": 1.0, "contrastive_view": "thinned"}, "contrastive_loss"),
        ({"gepc_targets": "masked+unexpressed"}, "gepc_mse"),
        ({"gepc_targets": "all", "gene_emb_init": "pca"}, "gepc_mse"),
    ],
)
def test_each_objective_trains_and_is_logged(shards, tmp_path, settings, column):
    summary = pretrain(
        shards, tmp_path, {**TINY_MODEL, "cell_emb_style": "mean"}, {**TRAIN, **settings}
    )
    assert summary["done"] and np.isfinite(summary["best_val_loss"])
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t")
    assert metrics[column].notna().all() and np.isfinite(metrics[column]).all()
    if column in ("ecs_loss", "contrastive_loss"):  # logged only when switched on
        other = {"ecs_loss": "contrastive_loss", "contrastive_loss": "ecs_loss"}[column]
        assert metrics[other].isna().all()
    assert (metrics["cells_per_s"] > 0).all()
    # epochs.tsv: the objective and its terms; the objective is their weighted sum (ECS is not
    # recorded per epoch)
    epochs = pd.read_csv(tmp_path / "epochs.tsv", sep="\t")
    contrastive = settings.get("contrastive_weight", 0.0)
    assert epochs["train_contrastive"].notna().all() == bool(contrastive)
    if column != "ecs_loss":
        terms = epochs["train_expr_mse"] + epochs["train_gepc_mse"]
        terms += contrastive * epochs["train_contrastive"].fillna(0.0)
        np.testing.assert_allclose(epochs["train_loss"], terms, rtol=1e-5)


def test_defaults_log_neither_extra_objective(shards, tmp_path):
    pretrain(shards, tmp_path, TINY_MODEL, TRAIN)
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t")
    assert metrics["ecs_loss"].isna().all() and metrics["contrastive_loss"].isna().all()


def test_gene_subset_views_differ_and_keep_cls():
    genes = np.r_[30, np.arange(20)].astype(np.int32)
    values = np.r_[0, np.arange(1, 21)].astype(np.int16)
    gen = torch.Generator().manual_seed(0)
    a, b = gene_subset(genes, values, 0.5, gen), gene_subset(genes, values, 0.5, gen)
    for g, v in (a, b):
        assert g[0] == 30 and v[0] == 0 and len(g) == 11  # <cls> + round(0.5 * 20)
        assert np.all(np.diff(g[1:]) > 0) and np.array_equal(
            v[1:], g[1:] + 1
        )  # pairs kept together
    assert not np.array_equal(a[0], b[0])
    half = contrastive_view("genes", 0.5, 51)
    batch = training_batch(
        [(genes, values)] * 3, 31, [0.5], torch.Generator().manual_seed(1), views=2, view=half
    )
    assert batch["gene_ids"].shape == (6, 11)
    full = training_batch(
        [(genes, values)] * 3, 31, [0.5], torch.Generator().manual_seed(1), views=2
    )
    assert full["gene_ids"].shape == (6, 21) and torch.equal(
        full["gene_ids"][0], full["gene_ids"][3]
    )


def thinned_cells(n_cells, seed=0, n_bins=51):
    """Cells of 2..60 genes (ascending ids, <cls> = 100) with bins 1..n_bins-1, many tied."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        n = int(rng.integers(2, 61))
        genes = np.r_[100, np.sort(rng.choice(100, n, replace=False))].astype(np.int32)
        cells.append((genes, np.r_[0, rng.integers(1, n_bins, n)].astype(np.uint8)))
    return cells


@pytest.mark.parametrize("keep", [0.5, 0.05, 1e-6])
def test_thinned_view_keeps_cls_and_gene_order_and_rebins_monotonically(keep):
    gen = torch.Generator().manual_seed(0)
    for genes, values in thinned_cells(300):
        g, v = thinned_subset(genes, values, keep, 51, gen)
        assert g[0] == 100 and v[0] == 0 and v.dtype == values.dtype
        assert len(g) >= 2  # never an empty cell
        assert np.all(np.diff(g[1:]) > 0) and np.isin(g[1:], genes[1:]).all()  # a subsequence
        if len(g) > 2:  # the kept genes span the bins, as the pipeline's quantile bins would
            assert v[1:].min() == 1 and v[1:].max() == 50
        else:
            assert v[1] == 25  # a lone gene: the middle bin
        # a gene with a higher original bin never gets a lower new bin
        old = values[1:][np.searchsorted(genes[1:], g[1:])]
        by_old = np.lexsort((v[1:], old))
        assert np.all(np.diff(v[1:][by_old].astype(int)) >= 0)


def test_thinned_view_bins_distinct_values_as_the_pipeline_does():
    from scipy.sparse import csr_matrix

    from scllm.prep.binning import bin_csr

    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(1)
    for n_bins in (51, 5):
        for _ in range(50):
            n = int(rng.integers(3, 40))
            genes = np.r_[100, np.arange(n)].astype(np.int32)
            values = np.r_[0, rng.permutation(n) + 1].astype(np.int16)  # distinct: no ties
            g, v = thinned_subset(genes, values, 0.3, n_bins, gen)
            if len(g) < 3:
                continue
            pipeline = bin_csr(csr_matrix(values[g[1:] + 1][None].astype(float)), n_bins)
            np.testing.assert_array_equal(v[1:], pipeline.toarray()[0])


def test_thinned_view_drops_low_bins_first_at_the_formulas_rate():
    n, keep, draws = 40, 0.5, 4000
    genes = np.r_[100, np.arange(n)].astype(np.int32)
    values = np.r_[0, np.random.default_rng(2).permutation(n) + 1].astype(np.int16)  # distinct
    gen = torch.Generator().manual_seed(2)
    kept = np.zeros(n)
    for _ in range(draws):
        g, _ = thinned_subset(genes, values, keep, 51, gen)
        kept[g[1:]] += 1
    share = kept / draws
    expected = keep ** (1 - (values[1:] - 0.5) / n)  # values 1..n are the ranks here
    assert np.abs(share - expected).max() < 0.04  # ~5 standard errors of 4000 draws
    assert share.mean() == pytest.approx(expected.mean(), abs=0.005)
    by_bin = share[np.argsort(values[1:])]
    assert by_bin[:10].mean() < 0.6 < 0.9 < by_bin[-10:].mean()


def test_thinned_view_depends_only_on_its_generator_seed():
    cells = thinned_cells(20, seed=3)

    def views(seed):
        gen = torch.Generator().manual_seed(seed)
        return [thinned_subset(g, v, 0.5, 51, gen) for g, v in cells]

    a, b, c = views(7), views(7), views(8)
    for (ga, va), (gb, vb) in zip(a, b):
        assert np.array_equal(ga, gb) and np.array_equal(va, vb)
    assert any(not np.array_equal(ga, gc) for (ga, _), (gc, _) in zip(a, c))
    one = (np.array([100, 4], dtype=np.int32), np.array([0, 17], dtype=np.uint8))
    assert thinned_subset(*one, 0.5, 51, torch.Generator()) == one  # one gene: left whole


def test_contrastive_view_picks_the_cut():
    assert (
        contrastive_view("genes", 1.0, 51) is None and contrastive_view("thinned", 1, 51) is None
    )
    assert contrastive_view("genes", 0.5, 51).func is gene_subset
    assert contrastive_view("thinned", 0.5, 51).keywords == {"keep": 0.5, "n_bins": 51}
    with pytest.raises(ValueError, match="contrastive view"):
        contrastive_view("depth", 0.5, 51)


def test_training_batch_with_thinned_views_is_a_valid_batch():
    from scllm.tokens import MASK_VALUE

    cells, pad = thinned_cells(8, seed=4), 101
    thinned = contrastive_view("thinned", 0.5, 51)

    def make():
        gen = torch.Generator().manual_seed(4)
        return training_batch(cells, pad, [0.5], gen, views=2, view=thinned)

    batch, again = make(), make()
    assert set(batch) == set(again) and all(
        torch.equal(batch[k], again[k]) for k in batch if k != "lengths"
    )
    lengths, padding = batch["lengths"], batch["padding_mask"]
    assert len(lengths) == 16 and batch["gene_ids"].shape == (16, lengths.max())
    assert (~padding).sum(1).tolist() == lengths.tolist() and (lengths >= 2).all()
    assert (batch["gene_ids"][:, 0] == 100).all() and (batch["values"][:, 0] == 0).all()
    genes = batch["values"][:, 1:][~padding[:, 1:]]
    assert genes.min() >= 1 and genes.max() <= 50
    assert not batch["mask"][:, 0].any() and not batch["mask"][padding].any()
    assert (batch["masked_values"][batch["mask"]] == MASK_VALUE).all()
    # the two views of a cell differ; the profile rows are the whole, unthinned cell
    assert any(not torch.equal(batch["gene_ids"][i], batch["gene_ids"][i + 8]) for i in range(8))
    for row, (g, v) in enumerate(cells * 2):
        assert batch["profile_gene_ids"][row, : len(g)].tolist() == g.tolist()
        assert batch["profile_values"][row, : len(v)].tolist() == v.tolist()


def test_pca_init_puts_the_top_axis_of_the_bins_in_the_gene_embeddings(shards):
    cells = ShardDataset(shards, "train")
    cfg = ModelConfig(vocab_size=26, n_bins=51, n_layers=1, n_heads=2, d_model=8, d_ff=16)
    model = CellTransformer(cfg)
    before = model.gene_emb.weight.detach().clone()
    init_gene_embeddings_from_pca(model, cells, seed=0)
    emb = model.gene_emb.weight.detach().numpy()
    profiles = np.zeros((len(cells), 24))
    for i in range(len(cells)):
        g, v = cells.cell(i)
        profiles[i, g[1:]] = v[1:]
    from sklearn.decomposition import PCA

    axis = PCA(1).fit(profiles).components_[0]  # independent computation
    cosine = abs(emb[:24, 0] @ axis) / np.linalg.norm(emb[:24, 0])
    assert cosine > 0.999
    assert emb[:24].std() == pytest.approx(0.02, rel=1e-3)
    assert torch.equal(model.gene_emb.weight[24:].detach(), before[24:])  # <cls>, <pad> untouched


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"gepc_targets": "everything"}, "gepc_targets"),
        ({"gene_emb_init": "glove"}, "gene_emb_init"),
        ({"contrastive_view": "depth"}, "contrastive_view"),
    ],
)
def test_bad_objective_settings_are_refused(shards, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        pretrain(shards, tmp_path, TINY_MODEL, {**TRAIN, **settings})
    assert not any(tmp_path.iterdir())


def test_genes_left_out_of_a_view_are_scored_as_the_cells_not_as_unexpressed():
    from scllm.train.objectives import gepc_profile_mse

    genes = np.r_[20, np.arange(20)].astype(np.int32)  # <cls> + all 20 vocabulary genes, bin 30
    values = np.r_[0, np.full(20, 30)].astype(np.int16)
    half = contrastive_view("genes", 0.5, 51)
    batch = training_batch(
        [(genes, values)], 21, [0.5], torch.Generator().manual_seed(0), views=2, view=half
    )
    assert batch["gene_ids"].shape == (2, 11) and batch["profile_gene_ids"].shape == (2, 21)
    perfect = torch.full((2, 20), 30.0)  # the whole cell, predicted exactly
    for visible_too in (False, True):
        assert (
            gepc_profile_mse(
                perfect,
                batch["gene_ids"],
                batch["values"],
                batch["mask"],
                visible_too,
                (batch["profile_gene_ids"], batch["profile_values"]),
            ).item()
            == 0.0
        )
    # Without the whole cells, the 10 genes each view leaves out would count as unexpressed
    # (target 0).
    assert gepc_profile_mse(perfect, batch["gene_ids"], batch["values"], batch["mask"]).item() > 0


def test_pca_init_is_deterministic(shards):
    cells = ShardDataset(shards, "train")
    cfg = ModelConfig(vocab_size=26, n_bins=51, n_layers=1, n_heads=2, d_model=8, d_ff=16)
    a, b = CellTransformer(cfg), CellTransformer(cfg)
    init_gene_embeddings_from_pca(a, cells, seed=0)
    init_gene_embeddings_from_pca(b, cells, seed=0)
    assert torch.equal(a.gene_emb.weight[:24], b.gene_emb.weight[:24])  # rows 24, 25: <cls>, <pad>


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"contrastive_temperature": 0}, "contrastive_temperature"),
        ({"contrastive_view_genes": 1.5}, "contrastive_view_genes"),
        ({"ecs_weight": -1}, "ecs_weight"),
    ],
)
def test_bad_weights_are_refused_outside_snakemake_too(shards, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        pretrain(shards, tmp_path, TINY_MODEL, {**TRAIN, **settings})


def test_vc_weight_adds_the_weighted_variance_covariance_term():
    from scllm.config import TrainConfig
    from scllm.train.objectives import objective, variance_covariance_loss

    g = torch.Generator().manual_seed(0)
    gene_ids = torch.randint(0, 20, (6, 9), generator=g)
    values = torch.randint(1, 51, (6, 9), generator=g)
    mask = torch.rand(6, 9, generator=g) < 0.4
    pred = {
        "expr_pred": torch.randn(6, 9, generator=g),
        "gepc_pred": torch.randn(6, 9, generator=g),
        "cell_emb": torch.randn(6, 5, generator=g),
    }
    off = objective(pred, gene_ids, values, mask, TrainConfig())[0]
    on = objective(pred, gene_ids, values, mask, TrainConfig(vc_weight=2.5))[0]
    assert (on - off).item() == pytest.approx(
        2.5 * variance_covariance_loss(pred["cell_emb"]).item(), rel=1e-5
    )
    with pytest.raises(ValueError, match="train.vc_weight must be >= 0"):
        pretrain("unused", "unused", train_cfg={"vc_weight": -1})


def test_contrastive_head_is_what_the_contrastive_term_compares():
    from scllm.config import TrainConfig
    from scllm.train.objectives import contrastive_loss, objective

    cfg = ModelConfig(
        vocab_size=22,
        n_bins=51,
        n_layers=1,
        n_heads=2,
        d_model=8,
        d_ff=16,
        dropout=0.0,
        cell_emb_style="mean",
        contrastive_head_dim=5,
    )
    model = CellTransformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    gene_ids = torch.cat(
        [torch.full((6, 1), 20), torch.randint(0, 20, (6, 7), generator=g)], dim=1
    )
    values = torch.cat(
        [torch.zeros(6, 1, dtype=torch.long), torch.randint(1, 51, (6, 7), generator=g)], dim=1
    )
    padding = torch.zeros(6, 8, dtype=torch.bool)
    mask = torch.zeros(6, 8, dtype=torch.bool)
    with torch.no_grad():
        pred = model(gene_ids, values, padding)
        head = model.contrastive_head
        # the head, computed by hand: Linear -> ReLU -> Linear on the cell embedding
        by_hand = (
            torch.relu(pred["cell_emb"] @ head[0].weight.T + head[0].bias) @ head[2].weight.T
            + head[2].bias
        )
    assert pred["contrastive_z"].shape == (6, 5) and pred["cell_emb"].shape == (6, 8)
    assert torch.allclose(pred["contrastive_z"], by_hand, atol=1e-6)
    settings = TrainConfig(contrastive_weight=1.0)
    got = objective(pred, gene_ids, values, mask, settings, views=2)[4]
    assert got.item() == pytest.approx(
        contrastive_loss(by_hand, 2, settings.contrastive_temperature).item(), rel=1e-5
    )
    assert got.item() != pytest.approx(contrastive_loss(pred["cell_emb"], 2, 0.1).item(), rel=1e-3)
    # without a head the term compares the cell embeddings themselves, and no head weights exist
    plain = CellTransformer(ModelConfig(**{**cfg.__dict__, "contrastive_head_dim": 0}))
    assert not hasattr(plain, "contrastive_head")
    with pytest.raises(ValueError, match="contrastive_head_dim"):
        ModelConfig(vocab_size=22, contrastive_head_dim=-1)
