"""A trained model's gene-token embeddings as a table: one row per vocabulary gene, keyed on its
Ensembl id, with its symbol, in token order (the special tokens ``<cls>`` and ``<pad>`` left
out). These are the input embeddings the model learned for each gene (``gene_emb`` weights),
the vectors scGPT-style gene analyses compare by cosine similarity."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scllm.eval.genes import model_genes
from scllm.train.checkpoint import load_model

# What a pretrain run leaves in its model folder and gene_embeddings reads.
MODEL_FILES = ("best_model.pt", "args.json", "vocab.json", "genes.tsv")
EXAMPLE_MODEL = "results/demo/model"


def require_model_folder(model_dir: str | Path) -> Path:
    """Refuse, naming what is missing, a path that is not a trained model's folder.

    Parameters
    ----------
    model_dir
        The folder to check.

    Returns
    -------
    pathlib.Path
        ``model_dir``, once it holds every file of ``MODEL_FILES``.
    """
    model_dir = Path(model_dir)
    fix = (
        f"give the folder a pretrain run wrote (results/<run>/model, e.g. {EXAMPLE_MODEL}), "
        f"which holds {', '.join(MODEL_FILES)}"
    )
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a folder; {fix}")
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{model_dir} is not a trained model's folder: it lacks {', '.join(missing)}; {fix}"
        )
    return model_dir


def gene_embeddings(model_dir: str | Path) -> pd.DataFrame:
    """The trained model's gene-token embeddings, one row per vocabulary gene.

    Reads ``best_model.pt``, ``args.json``, ``vocab.json`` and ``genes.tsv`` from a pretrain
    output folder (on the CPU). Only the vocabulary genes are returned, in token order; the
    special tokens ``<cls>`` and ``<pad>`` are not genes and are left out.

    Parameters
    ----------
    model_dir
        The folder a pretrain run wrote, e.g. ``results/demo/model``.

    Returns
    -------
    pandas.DataFrame
        Index ``feature_id`` (Ensembl ids, unique); column ``feature_name`` (gene symbols from
        ``genes.tsv``: not always unique, and empty where the source had none); then one
        float32 column per embedding dimension, ``emb_0`` .. ``emb_{d_model - 1}``.

    Examples
    --------
    The genes closest to CD3E by cosine similarity:

    >>> import numpy as np
    >>> import scllm
    >>> genes = scllm.gene_embeddings("results/demo/model")
    >>> vectors = genes.drop(columns="feature_name").to_numpy()
    >>> unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    >>> row = np.flatnonzero(genes["feature_name"] == "CD3E")[0]
    >>> genes[["feature_name"]].assign(cosine=unit @ unit[row]).nlargest(10, "cosine")

    A symbol may name several genes (or none of the vocabulary's); the Ensembl id is
    unambiguous: ``row = genes.index.get_loc("ENSG00000198851")``.
    """
    model_dir = require_model_folder(model_dir)
    model, vocab, _ = load_model(model_dir)
    genes = model_genes(model_dir, vocab)  # refuses a genes.tsv of another vocabulary
    weights = model.gene_emb.weight.detach().cpu().numpy()
    vectors = weights[genes["token_id"].to_numpy()]
    table = pd.DataFrame(
        vectors,
        index=pd.Index(genes["feature_id"].to_numpy(), name="feature_id"),
        columns=[f"emb_{i}" for i in range(vectors.shape[1])],
    )
    # a gene without a symbol gets "" (as the docstring says), not NaN
    table.insert(0, "feature_name", genes["feature_name"].fillna("").to_numpy())
    return table
