"""Embedding: gene mapping and coverage, binning as in training, batch invariance, the CLI and
where it may write."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scllm
from scllm.cli import main as cli_main
from scllm.errors import UnsafeOutputError
from scllm.eval.embed import EMBEDDING_KEY, embed_h5ad, embed_shards
from scllm.eval.encode import binning_settings, embed_shard_cells, tokenize_counts
from scllm.eval.genes import GeneCoverageError, map_genes, model_genes
from scllm.files import setup_logging
from scllm.model import CellTransformer, ModelConfig
from scllm.prep.binning import normalize_bin
from scllm.prep.tokenize import tokenize_shards
from scllm.shards import read_shard
from scllm.tokens import build_vocab, vocab_sha256, write_vocab
from scllm.train.checkpoint import load_model

from conftest import snapshot, start_writer

N_VOCAB = 40  # vocabulary genes
N_OTHER = 25  # genes of the data outside the vocabulary
N_CELLS = 30
VOCAB_IDS = [f"ENSG{i:011d}" for i in range(N_VOCAB)]
SYMBOLS = [f"GENE{i}" for i in range(N_VOCAB)]


def counts_matrix(n_cells=N_CELLS, seed=0) -> sp.csr_matrix:
    """Small integer counts with many ties (as real data), over vocabulary + other genes."""
    rng = np.random.default_rng(seed)
    dense = rng.negative_binomial(1, 0.5, size=(n_cells, N_VOCAB + N_OTHER)) * (
        rng.random((n_cells, N_VOCAB + N_OTHER)) < 0.6
    )
    dense[:, 0] += 1  # every cell expresses a vocabulary gene
    return sp.csr_matrix(dense.astype(np.float32))


def write_model(root: Path, binning: dict | None = None) -> Path:
    """A randomly initialised model directory in the pretrain output layout."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(VOCAB_IDS)
    write_vocab(vocab, root / "vocab.json")
    pd.DataFrame(
        {"feature_id": VOCAB_IDS, "feature_name": SYMBOLS, "token_id": range(N_VOCAB)}
    ).to_csv(root / "genes.tsv", sep="\t", index=False)
    cfg = ModelConfig(
        vocab_size=N_VOCAB + 2, n_bins=11, n_layers=2, n_heads=2, d_model=16, d_ff=32, dropout=0.1
    )
    torch.manual_seed(0)
    torch.save(CellTransformer(cfg).state_dict(), root / "best_model.pt")
    data = {"vocab_sha256": vocab_sha256(vocab), "n_genes": N_VOCAB}
    if binning:
        data["binning"] = binning
    (root / "args.json").write_text(json.dumps({"model": asdict(cfg), "data": data}))
    return root


def write_input(path: Path, X, var: pd.DataFrame, obs_names=None) -> Path:
    obs = pd.DataFrame(
        index=obs_names if obs_names is not None else [f"cell{i}" for i in range(X.shape[0])]
    )
    obs["donor"] = "d1"
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
    return path


def input_var(ids=True) -> pd.DataFrame:
    """Vocabulary genes (shuffled, with Ensembl version suffixes) and other genes."""
    names = SYMBOLS + [f"OTHER{i}" for i in range(N_OTHER)]
    gene_ids = [f"{g}.{i % 3 + 1}" for i, g in enumerate(VOCAB_IDS)] + [
        f"ENSG9{i:010d}" for i in range(N_OTHER)
    ]
    var = pd.DataFrame({"gene_ids": gene_ids}, index=names) if ids else pd.DataFrame(index=names)
    return var


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model(
        tmp_path_factory.mktemp("model"),
        binning={"n_bins": 11, "seed": 5, "target_sum": 1e4, "log1p": False},
    )


# --- gene mapping and coverage -------------------------------------------------------------------


def test_map_genes_by_ensembl_column_symbols_or_var_names(model_dir):
    model, vocab, _ = load_model(model_dir)
    genes = model_genes(model_dir, vocab)
    perm = np.random.default_rng(1).permutation(N_VOCAB + N_OTHER)
    var = input_var().iloc[perm]
    by_id = map_genes(var, genes)
    assert by_id.source == "Ensembl ids in var['gene_ids']" and by_id.coverage == 1.0
    # token t is fed by the input column holding gene t
    assert all(
        var["gene_ids"].iloc[c].split(".")[0] == VOCAB_IDS[t]
        for t, c in zip(by_id.token_ids, by_id.columns)
    )
    by_symbol = map_genes(input_var(ids=False).iloc[perm], genes)
    assert by_symbol.source == "gene symbols in var_names" and by_symbol.n_found == N_VOCAB
    np.testing.assert_array_equal(by_symbol.columns, by_id.columns)
    forced = map_genes(var, genes, gene_id_column="index")
    assert forced.source == "gene symbols in var_names"
    with pytest.raises(ValueError, match="no column 'nope'"):
        map_genes(var, genes, gene_id_column="nope")


def test_duplicate_and_ambiguous_genes(model_dir):
    _, vocab, _ = load_model(model_dir)
    genes = model_genes(model_dir, vocab)
    genes.loc[[3, 4], "feature_name"] = "SHARED"  # one symbol for two vocabulary genes: skipped
    var = pd.DataFrame(index=["GENE0", "GENE0", "SHARED", "GENE1"])
    mapping = map_genes(var, genes)
    assert mapping.n_found == 2  # GENE0 (first column), GENE1
    np.testing.assert_array_equal(mapping.token_ids, [0, 1])
    np.testing.assert_array_equal(mapping.columns, [0, 3])


def test_poor_gene_overlap_is_a_clear_error_with_the_coverage_figure(model_dir, tmp_path, capsys):
    keep = list(range(12)) + list(
        range(N_VOCAB, N_VOCAB + N_OTHER)
    )  # 12 of 40 vocabulary genes: 30%
    path = write_input(tmp_path / "poor.h5ad", counts_matrix()[:, keep], input_var().iloc[keep])
    with pytest.raises(GeneCoverageError) as err:
        embed_h5ad(model_dir, path, tmp_path / "out.h5ad")
    message = str(err.value)
    assert (
        "coverage 30.0%" in message
        and "12 of 40 vocabulary genes" in message
        and "minimum 50%" in message
    )
    assert "--gene-id-column" in message and "genes.tsv" in message and "do not subset" in message
    assert not (tmp_path / "out.h5ad").exists()
    # the command line prints the same message and fails; a lower threshold lets it through
    assert cli_main(["embed", str(model_dir), str(path), str(tmp_path / "out.h5ad")]) == 1
    assert "coverage 30.0%" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "embed",
                str(model_dir),
                str(path),
                str(tmp_path / "out.h5ad"),
                "--min-coverage",
                "0.25",
            ]
        )
        == 0
    )
    assert ad.read_h5ad(tmp_path / "out.h5ad").uns["scllm"]["coverage"] == pytest.approx(0.3)


# --- binning as in training ----------------------------------------------------------------------


def test_tokens_equal_the_pipelines_for_the_same_cells(tmp_path):
    """normalize_bin + tokenize_shards on a counts file == tokenize_counts on it, in any chunks and
    in any row order: both key the tie-break draws on the cell's counts."""
    counts = counts_matrix(n_cells=23, seed=4)
    var = pd.DataFrame(
        {
            "feature_id": input_var()["gene_ids"].str.split(".").str[0].to_numpy(),
            "feature_name": input_var().index.to_numpy(),
        }
    )
    var.index = var["feature_id"].to_numpy()
    obs = pd.DataFrame(
        {"sample": ["s"] * counts.shape[0]}, index=[f"c{i}" for i in range(counts.shape[0])]
    )
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(tmp_path / "filtered.h5ad")
    order = np.random.default_rng(2).permutation(N_VOCAB)  # HVG rank order != column order
    pd.DataFrame(
        {
            "feature_id": np.array(VOCAB_IDS)[order],
            "feature_name": np.array(SYMBOLS)[order],
            "rank": np.arange(1, N_VOCAB + 1),
        }
    ).to_csv(tmp_path / "hvg.tsv", sep="\t", index=False)
    normalize_bin(
        tmp_path / "filtered.h5ad",
        tmp_path / "hvg.tsv",
        tmp_path / "binned.h5ad",
        n_bins=11,
        seed=5,
        chunk_size=7,
    )
    pd.DataFrame({"cell": obs.index, "split": ["train"] * 23}).to_csv(
        tmp_path / "split.tsv", sep="\t", index=False
    )
    tokenize_shards(tmp_path / "binned.h5ad", tmp_path / "split.tsv", tmp_path / "shards")
    shard = read_shard(tmp_path / "shards/train/shard_00000.h5")

    vocab = build_vocab(list(np.array(VOCAB_IDS)[order]))
    genes = pd.DataFrame(
        {
            "feature_id": np.array(VOCAB_IDS)[order],
            "feature_name": np.array(SYMBOLS)[order],
            "token_id": np.arange(N_VOCAB),
        }
    )
    mapping = map_genes(var, genes)
    assert mapping.source == "Ensembl ids in var_names" and mapping.coverage == 1
    binning = {"n_bins": 11, "seed": 5, "target_sum": 1e4, "log1p": False}
    for chunk in (23, 5):
        parts = [
            tokenize_counts(counts[a : a + chunk], mapping, vocab["<cls>"], binning)
            for a in range(0, 23, chunk)
        ]
        gene_ids = np.concatenate([p[1] for p in parts])
        values = np.concatenate([p[2] for p in parts])
        np.testing.assert_array_equal(gene_ids, shard.gene_ids)
        np.testing.assert_array_equal(values, shard.values)
    reversed_offsets, _, reversed_values = tokenize_counts(
        counts[::-1], mapping, vocab["<cls>"], binning
    )
    last = shard.offsets[-2:]
    np.testing.assert_array_equal(
        reversed_values[: reversed_offsets[1]], shard.values[last[0] : last[1]]
    )
    # ties exist, so the draws matter: another seed gives other tokens
    other = tokenize_counts(counts, mapping, vocab["<cls>"], {**binning, "seed": 6})
    assert not np.array_equal(other[2], shard.values)


def test_binning_settings_come_from_args_or_defaults(model_dir, tmp_path):
    args = json.loads((model_dir / "args.json").read_text())
    assert binning_settings(args) == (
        {"n_bins": 11, "seed": 5, "target_sum": 1e4, "log1p": False},
        "args.json",
    )
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps({"binning": {"n_bins": 11, "seed": 9, "target_sum": 100.0, "log1p": True}})
    )
    from_manifest = {"model": args["model"], "data": {"manifest": str(manifest)}}
    assert binning_settings(from_manifest)[0]["seed"] == 9 and binning_settings(from_manifest)[
        1
    ] == str(manifest)
    bare = {"model": args["model"], "data": {"manifest": str(tmp_path / "gone.json")}}
    assert binning_settings(bare) == (
        {"n_bins": 11, "seed": 0, "target_sum": 1e4, "log1p": False},
        "defaults",
    )
    manifest.write_text(json.dumps({"binning": {"n_bins": 51, "seed": 0}}))
    with pytest.raises(ValueError, match="n_bins=51 but the model has n_bins=11"):
        binning_settings(from_manifest)


# --- embeddings ----------------------------------------------------------------------------------


def test_a_cell_gets_the_same_embedding_alone_and_in_a_batch(model_dir, tmp_path):
    counts = counts_matrix()
    var = input_var()
    full = write_input(tmp_path / "full.h5ad", counts, var)
    embed_h5ad(model_dir, full, tmp_path / "full_out.h5ad", batch_size=4, chunk_size=7)
    out = ad.read_h5ad(tmp_path / "full_out.h5ad")
    emb = out.obsm[EMBEDDING_KEY]
    assert emb.shape == (N_CELLS, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert list(out.obs_names) == [f"cell{i}" for i in range(N_CELLS)] and "donor" in out.obs
    assert (out.obs["scllm_n_genes"] > 0).all() and out.uns["scllm"][
        "gene_match"
    ] == "Ensembl ids in var['gene_ids']"
    assert len({tuple(np.round(e, 4)) for e in emb}) == N_CELLS  # cells differ

    for i in (
        0,
        17,
        N_CELLS - 1,
    ):  # alone, in a file of its own (as row 0), with another batch size
        alone = write_input(tmp_path / f"alone{i}.h5ad", counts[i], var, obs_names=[f"x{i}"])
        embed_h5ad(model_dir, alone, tmp_path / f"alone{i}_out.h5ad", batch_size=1)
        np.testing.assert_allclose(
            ad.read_h5ad(tmp_path / f"alone{i}_out.h5ad").obsm[EMBEDDING_KEY][0],
            emb[i],
            rtol=1e-5,
            atol=1e-5,
        )
    # a dense X, the counts in a layer, and shuffled rows give the same vectors
    X_other = np.zeros(counts.shape, dtype=np.float32)
    perm = np.random.default_rng(0).permutation(N_CELLS)
    adata = ad.AnnData(
        X=X_other,
        obs=pd.DataFrame(index=[f"cell{i}" for i in perm]),
        var=var,
        layers={"counts": counts[perm].toarray()},
    )
    adata.write_h5ad(tmp_path / "layer.h5ad")
    embed_h5ad(
        model_dir,
        tmp_path / "layer.h5ad",
        tmp_path / "layer_out.h5ad",
        counts_layer="counts",
        chunk_size=4,
    )
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "layer_out.h5ad").obsm[EMBEDDING_KEY],
        emb[perm],
        rtol=1e-5,
        atol=1e-5,
    )


def test_in_memory_api_matches_the_cli_and_keeps_the_users_cells(model_dir, tmp_path):
    import scllm

    counts = counts_matrix()
    var = input_var()
    path = write_input(
        tmp_path / "cells.h5ad", counts, var, obs_names=[f"AAAC{i}-1" for i in range(N_CELLS)]
    )
    cli_main(["embed", str(model_dir), str(path), str(tmp_path / "cli.h5ad"), "--device", "cpu"])
    from_cli = ad.read_h5ad(tmp_path / "cli.h5ad")

    adata = ad.read_h5ad(path)
    adata.obs["cell_type"] = "T"
    before_X = adata.X.copy()
    assert (
        scllm.embed(adata, model_dir, device="cpu", chunk_size=7) is None
    )  # in place, as scanpy's functions
    np.testing.assert_allclose(
        adata.obsm["X_scllm"], from_cli.obsm[EMBEDDING_KEY], rtol=1e-5, atol=1e-6
    )
    assert (
        list(adata.obs_names) == [f"AAAC{i}-1" for i in range(N_CELLS)] == list(from_cli.obs_names)
    )
    assert (
        adata.obs["cell_type"].eq("T").all() and (adata.X != before_X).nnz == 0
    )  # nothing else touched
    np.testing.assert_array_equal(adata.obs["scllm_n_genes"], from_cli.obs["scllm_n_genes"])
    assert adata.uns["scllm"]["layer"] == "X"
    assert adata.uns["scllm"]["software"]["packages"]["torch"] == torch.__version__

    # copy=True leaves the input alone; a dense layer and a view of some cells give the same
    # vectors
    dense = ad.AnnData(
        X=np.zeros(counts.shape, np.float32),
        obs=adata.obs[[]].copy(),
        var=var,
        layers={"counts": counts.toarray()},
    )
    out = scllm.embed(
        dense, model_dir, layer="counts", key_added="X_model", copy=True, device="cpu"
    )
    assert "X_model" not in dense.obsm and "scllm" not in dense.uns
    np.testing.assert_allclose(out.obsm["X_model"], adata.obsm["X_scllm"], rtol=1e-5, atol=1e-6)
    some = adata[[3, 11, 20]].copy()
    scllm.embed(some, model_dir, device="cpu")
    np.testing.assert_allclose(
        some.obsm["X_scllm"], adata.obsm["X_scllm"][[3, 11, 20]], rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="no layer 'raw'"):
        scllm.embed(adata, model_dir, layer="raw", device="cpu")


def test_negative_values_are_rejected(model_dir, tmp_path):
    X = counts_matrix().toarray()
    X[3, 2] = -0.5
    path = write_input(tmp_path / "scaled.h5ad", X, input_var())
    with pytest.raises(ValueError, match="negative values"):
        embed_h5ad(model_dir, path, tmp_path / "out.h5ad")


def test_embed_shards_keeps_binned_obs_in_order(model_dir, tmp_path):
    """The embed rule's library call: validation or all cells, obs rows from binned.h5ad."""
    rng = np.random.default_rng(0)
    n = 26
    binned = sp.csr_matrix(
        (rng.integers(1, 11, (n, N_VOCAB)) * (rng.random((n, N_VOCAB)) < 0.4)).astype(np.uint8)
    )
    var = pd.DataFrame({"feature_id": VOCAB_IDS, "feature_name": SYMBOLS}, index=VOCAB_IDS)
    obs = pd.DataFrame(
        {"cell_type": rng.choice(["a", "b"], n), "sample": "s1"}, index=[f"c{i}" for i in range(n)]
    )
    ad.AnnData(X=binned, obs=obs, var=var, uns={"binning": {"n_bins": 11}}).write_h5ad(
        tmp_path / "binned.h5ad"
    )
    split = np.where(rng.random(n) < 0.3, "validation", "train")
    pd.DataFrame({"cell": obs.index, "split": split}).to_csv(
        tmp_path / "split.tsv", sep="\t", index=False
    )
    tokenize_shards(
        tmp_path / "binned.h5ad", tmp_path / "split.tsv", tmp_path / "shards", cells_per_shard=5
    )

    embed_shards(
        model_dir,
        tmp_path / "shards",
        tmp_path / "binned.h5ad",
        tmp_path / "val.h5ad",
        cells="validation",
    )
    embed_shards(
        model_dir,
        tmp_path / "shards",
        tmp_path / "binned.h5ad",
        tmp_path / "all.h5ad",
        cells="all",
        batch_size=3,
    )
    val, every = ad.read_h5ad(tmp_path / "val.h5ad"), ad.read_h5ad(tmp_path / "all.h5ad")
    assert list(every.obs_names) == list(obs.index) and list(every.obs["cell_type"]) == list(
        obs["cell_type"]
    )
    assert list(every.obs["split"]) == list(split)
    assert (
        list(val.obs_names) == list(obs.index[split == "validation"])
        and (val.obs["split"] == "validation").all()
    )
    np.testing.assert_allclose(
        every[val.obs_names].obsm[EMBEDDING_KEY], val.obsm[EMBEDDING_KEY], rtol=1e-5, atol=1e-5
    )
    # the same as embedding the binned rows directly
    model, _, _ = load_model(model_dir)
    from scllm.tokens import sequences_from_binned

    direct = embed_shard_cells(model, sequences_from_binned(binned, N_VOCAB), batch_size=26)
    np.testing.assert_allclose(every.obsm[EMBEDDING_KEY], direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'validation' or 'all'"):
        embed_shards(
            model_dir,
            tmp_path / "shards",
            tmp_path / "binned.h5ad",
            tmp_path / "x.h5ad",
            cells="train",
        )


@pytest.mark.parametrize(
    "option, flag, bad",
    [("batch_size", "--batch-size", -3), ("batch_size", "--batch-size", 0),
     ("chunk_size", "--chunk-size", -5), ("chunk_size", "--chunk-size", 0),
     ("min_coverage", "--min-coverage", 1.5)],
)  # fmt: skip
def test_embed_numbers_are_checked_naming_the_option(
    model_dir, tmp_path, capsys, option, flag, bad
):
    import scllm

    path = write_input(tmp_path / "cells.h5ad", counts_matrix(), input_var())
    out = tmp_path / "out.h5ad"
    with pytest.raises(SystemExit) as exit_:  # argparse: usage and the option, rc 2
        cli_main(["embed", str(model_dir), str(path), str(out), flag, str(bad)])
    assert exit_.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err
    for call in (
        lambda: embed_h5ad(model_dir, path, out, **{option: bad}),
        lambda: scllm.embed(ad.read_h5ad(path), model_dir, **{option: bad}),
    ):
        with pytest.raises(ValueError, match=rf"^{option} \({flag}\) .*\(got {bad}\)") as err:
            call()
    assert not out.exists()
    # the example the message gives works, and no embedding row is left all zeros
    example = re.search(rf"e\.g\. {flag} (\S+)\.$", str(err.value)).group(1)
    assert cli_main(["embed", str(model_dir), str(path), str(out), flag, example]) == 0
    assert np.abs(ad.read_h5ad(out).obsm[EMBEDDING_KEY]).sum(axis=1).min() > 0


# --- where it writes: nothing it did not write is replaced ---------------------------------------


def run_embed(capsys, model_dir, h5ad, out, *options) -> tuple[int, str]:
    argv = ["embed", str(model_dir), str(h5ad), str(out), "--device", "cpu", *options]
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def cells(tmp_path) -> Path:
    return write_input(tmp_path / "cells.h5ad", counts_matrix(), input_var())


def test_a_folder_at_the_output_is_kept_and_the_file_goes_inside_it(
    model_dir, cells, tmp_path, capsys
):
    outdir = tmp_path / "outdir"
    (outdir / "sub").mkdir(parents=True)
    (outdir / "notes.txt").write_text("the user's notes")
    (outdir / "sub" / "table.tsv").write_text("a\tb\n")
    before = snapshot(outdir)
    code, err = run_embed(capsys, model_dir, cells, outdir)
    advice = outdir / "cells_embedded.h5ad"
    assert code == 1 and f"the output {outdir} is a folder" in err
    assert f"give a file path, e.g. {advice}" in err
    assert snapshot(outdir) == before
    assert run_embed(capsys, model_dir, cells, advice)[0] == 0  # the advice works
    assert ad.read_h5ad(advice).n_obs == N_CELLS
    assert {k: v for k, v in snapshot(outdir).items() if k != advice.name} == before


def test_the_model_folder_and_its_files_are_never_an_output(model_dir, cells, tmp_path, capsys):
    before = snapshot(model_dir)
    for out, where in ((model_dir, "is"), (model_dir / "emb.h5ad", "lies inside")):
        for options in ((), ("--overwrite",)):
            code, err = run_embed(capsys, model_dir, cells, out, *options)
            assert code == 1 and f"the output {out} {where} the model folder {model_dir}" in err
            assert (
                f"give an output path outside it, e.g. {tmp_path / 'cells_embedded.h5ad'}" in err
            )
            assert snapshot(model_dir) == before
    with pytest.raises(UnsafeOutputError, match="the model folder"):  # Python callers too
        embed_h5ad(model_dir, cells, model_dir / "best_model.pt", overwrite=True)
    assert snapshot(model_dir) == before
    assert run_embed(capsys, model_dir, cells, tmp_path / "cells_embedded.h5ad")[0] == 0
    assert snapshot(model_dir) == before


def test_the_input_is_never_the_output(model_dir, cells, tmp_path, capsys):
    link = tmp_path / "link.h5ad"
    link.symlink_to(cells)
    before = snapshot(cells)
    for out in (cells, link):
        code, err = run_embed(capsys, model_dir, cells, out, "--overwrite")
        assert code == 1 and f"the output {out} is the input h5ad {cells}" in err
        assert f"give another output path, e.g. {tmp_path / 'cells_embedded.h5ad'}" in err
    with pytest.raises(UnsafeOutputError, match="is the input h5ad"):
        embed_h5ad(model_dir, link, cells)
    assert snapshot(cells) == before and link.resolve() == cells
    assert run_embed(capsys, model_dir, cells, tmp_path / "cells_embedded.h5ad")[0] == 0
    assert snapshot(cells) == before


def test_a_file_it_did_not_write_is_kept_even_with_overwrite(model_dir, cells, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    counts = write_input(tmp_path / "counts.h5ad", counts_matrix(seed=1), input_var())
    annotated = ad.read_h5ad(cells)  # embedded in memory and saved: X and uns['scllm'] both
    setup_logging()  # to this test's stderr (an earlier run_embed left it on a closed one)
    scllm.embed(annotated, model_dir, device="cpu")
    annotated.write_h5ad(tmp_path / "annotated.h5ad")
    for out in (notes, counts, tmp_path / "annotated.h5ad"):
        before = snapshot(out)
        for options in ((), ("--overwrite",)):
            code, err = run_embed(capsys, model_dir, cells, out, *options)
            assert code == 1
            assert f"the output {out} exists and is not an h5ad written by scllm embed" in err
            assert f"give another output path, e.g. {tmp_path / 'cells_embedded.h5ad'}" in err
            assert snapshot(out) == before
    assert run_embed(capsys, model_dir, cells, tmp_path / "cells_embedded.h5ad")[0] == 0


def test_its_own_earlier_output_is_replaced_only_with_overwrite(
    model_dir, cells, tmp_path, capsys
):
    out = tmp_path / "emb.h5ad"
    assert run_embed(capsys, model_dir, cells, out)[0] == 0
    before = snapshot(out)
    other = write_input(tmp_path / "other.h5ad", counts_matrix(seed=2)[:7], input_var())
    code, err = run_embed(capsys, model_dir, other, out)
    assert code == 1 and f"the output {out} exists: embeddings scllm embed wrote earlier" in err
    assert f"(model {model_dir}, cells of {cells})" in err
    assert "pass --overwrite (overwrite=True in Python) to replace them" in err
    with pytest.raises(UnsafeOutputError, match="pass --overwrite"):
        embed_h5ad(model_dir, other, out)
    assert snapshot(out) == before
    assert run_embed(capsys, model_dir, other, out, "--overwrite")[0] == 0  # the advice works
    replaced = ad.read_h5ad(out)
    assert replaced.n_obs == 7 and replaced.uns["scllm"]["source"] == str(other)
    assert embed_h5ad(model_dir, cells, out, overwrite=True)["n_cells"] == N_CELLS


def test_a_second_embed_of_one_output_is_refused_while_the_first_writes(
    model_dir, cells, tmp_path, capsys
):
    out = tmp_path / "emb.h5ad"
    proc, go = start_writer(out, tmp_path / "signals")  # another process writing out now
    code, err = run_embed(capsys, model_dir, cells, out)
    assert code == 1
    assert f"another process is writing {out} now; wait for it or choose another output" in err
    assert run_embed(capsys, model_dir, cells, tmp_path / "emb2.h5ad")[0] == 0  # another output
    go.touch()
    assert proc.wait(timeout=60) == 0
    assert out.read_bytes() == b"first half, second half"  # the first writer's file, complete


# --- what it reads: a wrong path is named with the fix -------------------------------------------


def test_a_missing_or_damaged_input_is_named_with_its_fix(model_dir, cells, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    missing = tmp_path / "emb" / "missing.h5ad"
    code, err = run_embed(capsys, model_dir, missing, out)
    assert code == 1 and f"scllm embed: error: {missing} does not exist; check the path\n" in err
    # the user's file, not one a pipeline stage rewrites
    damaged = tmp_path / "damaged.h5ad"
    damaged.write_bytes(cells.read_bytes()[:2000])
    code, err = run_embed(capsys, model_dir, damaged, out)
    assert code == 1 and f"scllm embed: error: cannot open {damaged} as h5ad (" in err
    assert "not an h5ad: copy or export it again (AnnData.write_h5ad) and rerun.\n" in err
    assert "rerun the stage" not in err and not out.exists()


def test_a_folder_that_is_not_a_model_is_named_with_the_folder_meant(
    model_dir, cells, tmp_path, capsys
):
    out = tmp_path / "out.h5ad"
    run = tmp_path / "results" / "demo"
    shutil.copytree(model_dir, run / "model")
    nowhere = tmp_path / "nowhere"
    expected = {
        nowhere: f"{nowhere} does not exist; give the model folder of a finished pretrain run "
        "(results/<run>/model)",
        run: f"{run} lacks best_model.pt, args.json, vocab.json; did you mean {run / 'model'}?",
        run.parent: f"{run.parent} lacks best_model.pt, args.json, vocab.json; is it a finished "
        "pretrain output directory?",
        run / "model" / "best_model.pt": f"{run / 'model' / 'best_model.pt'} is a file; give the "
        f"folder that holds the model, {run / 'model'}",
    }
    for folder, message in expected.items():
        code, err = run_embed(capsys, folder, cells, out)
        assert code == 1 and f"scllm embed: error: {message}\n" in err
    assert not out.exists()
    assert run_embed(capsys, run / "model", cells, out)[0] == 0  # the folder meant works
