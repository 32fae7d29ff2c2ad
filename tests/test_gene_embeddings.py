"""scllm.gene_embeddings: the vocabulary genes' rows of the trained gene-embedding weights, read
back from the saved files on their own, in token order and keyed on Ensembl ids; folders that
are not a model's are refused with the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch

import scllm
from scllm.model import CellTransformer, ModelConfig
from scllm.tokens import build_vocab, vocab_sha256, write_vocab

from conftest import REPO, child_env, tensors

N_GENES = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    """A model folder as pretrain leaves it, its vocabulary in an order unlike the ids' (so
    token order is not mistaken for sorted ids), with a symbol shared by two genes."""
    root = tmp_path_factory.mktemp("model")
    ids = [f"ENSG{i:011d}" for i in np.random.default_rng(0).permutation(N_GENES)]
    symbols = [f"SYM{int(i[4:])}" for i in ids]
    symbols[5] = symbols[6]  # feature_name is not unique in the Census either
    vocab = build_vocab(ids)
    write_vocab(vocab, root / "vocab.json")
    pd.DataFrame({"feature_id": ids, "feature_name": symbols, "token_id": range(N_GENES)}).to_csv(
        root / "genes.tsv", sep="\t", index=False
    )
    cfg = ModelConfig(vocab_size=len(vocab), n_bins=11, **tiny_model)
    torch.manual_seed(1)
    torch.save(CellTransformer(cfg).state_dict(), root / "best_model.pt")
    args = {"model": asdict(cfg), "data": {"vocab_sha256": vocab_sha256(vocab)}}
    (root / "args.json").write_text(json.dumps(args))
    return root


def test_the_table_holds_the_vocabulary_genes_rows_of_the_weights(model_dir, tiny_model):
    table = scllm.gene_embeddings(model_dir)

    # independent reads: the weights file, vocab.json and genes.tsv as written
    weights = tensors(model_dir / "best_model.pt")["gene_emb.weight"].numpy()
    vocab = json.loads((model_dir / "vocab.json").read_text())
    listed = pd.read_csv(model_dir / "genes.tsv", sep="\t")
    in_token_order = sorted((token, gene) for gene, token in vocab.items() if gene.startswith("E"))

    assert table.index.name == "feature_id"
    assert list(table.index) == [gene for _, gene in in_token_order] == list(listed.feature_id)
    assert "<cls>" not in table.index and "<pad>" not in table.index
    d_model = tiny_model["d_model"]
    assert list(table.columns) == ["feature_name"] + [f"emb_{i}" for i in range(d_model)]
    assert list(table["feature_name"]) == list(listed.feature_name)
    vectors = table.drop(columns="feature_name")
    assert (vectors.dtypes == np.float32).all()
    np.testing.assert_array_equal(vectors.to_numpy(), weights[[t for t, _ in in_token_order]])
    # each row is its own gene's vector, whatever the order
    for gene in ("ENSG00000000000", "ENSG00000000011"):
        np.testing.assert_array_equal(vectors.loc[gene].to_numpy(), weights[vocab[gene]])


def test_the_documented_cosine_lookup(model_dir):
    """The docstring's recipe finds a gene itself first, with cosine 1."""
    genes = scllm.gene_embeddings(model_dir)
    vectors = genes.drop(columns="feature_name").to_numpy()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    row = np.flatnonzero(genes["feature_name"] == "SYM3")[0]
    top = genes[["feature_name"]].assign(cosine=unit @ unit[row]).nlargest(3, "cosine")
    assert top.index[0] == "ENSG00000000003" and top["cosine"].iloc[0] == pytest.approx(1.0)
    other = (row + 1) % N_GENES
    a, b = vectors[row], vectors[other]
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert (unit @ unit[row])[other] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("remove", ["genes.tsv", "best_model.pt", "folder"])
def test_a_folder_that_is_not_a_model_is_refused(model_dir, tmp_path, remove):
    folder = tmp_path / "model"
    if remove != "folder":
        folder.mkdir()
        for name in ("best_model.pt", "args.json", "vocab.json", "genes.tsv"):
            if name != remove:
                (folder / name).write_bytes((model_dir / name).read_bytes())
    lacks = "is not a folder" if remove == "folder" else f"lacks {remove}"
    with pytest.raises(FileNotFoundError, match=rf"{lacks}; give the folder a pretrain run wrote"):
        scllm.gene_embeddings(folder)
    with pytest.raises(FileNotFoundError, match=r"e\.g\. results/demo/model"):
        scllm.gene_embeddings(folder)


def test_genes_of_another_vocabulary_are_refused(model_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("best_model.pt", "args.json", "vocab.json"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    listed = pd.read_csv(model_dir / "genes.tsv", sep="\t")
    listed.iloc[::-1].to_csv(folder / "genes.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"does not list the genes of .*vocab\.json in order"):
        scllm.gene_embeddings(folder)


def test_importing_scllm_stays_light():
    """The package exports gene_embeddings without importing torch until it is used."""
    code = (
        "import sys, scllm\n"
        "assert 'gene_embeddings' in scllm.__all__ and 'torch' not in sys.modules\n"
        "assert scllm.gene_embeddings.__module__ == 'scllm.eval.gene_embeddings'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=child_env())
