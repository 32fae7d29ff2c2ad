"""Embed cells with a pretrained model (its cell embedding: model.cell_emb_style) and write them.

- ``embed_shards``: the pipeline's own cells, straight from the token shards (rule embed).
- ``embed``: the cells of an AnnData in memory, scanpy style (``scllm.embed``).
- ``embed_h5ad``: any h5ad of counts (``scllm embed``): genes are mapped to the model's
  vocabulary, normalized and binned as in training, tokenized and embedded, in row chunks; it
  never writes over what it did not write (``check_embed_output``).

How cells become vectors is ``scllm.eval.encode``; matching genes, ``scllm.eval.genes``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scllm.checks import check_cells_and_genes, check_embed_options
from scllm.config import EMBEDDING_KEY, EmbedConfig, settings_of
from scllm.errors import UnsafeOutputError
from scllm.eval.encode import Embedder, embed_rows, embed_shard_cells, resolve_device
from scllm.eval.genes import checked_mapping
from scllm.files import atomic_path, lies_within, same_file, sibling_name
from scllm.h5ad import open_matrix
from scllm.shards import read_listed_shard, read_manifest
from scllm.train.checkpoint import load_model

log = logging.getLogger("scllm")

# Below this fraction of vocabulary genes found in the input, `scllm embed` refuses to run: the
# missing genes read as "not expressed", which moves cells away from where training put them.
# Measured on PBMC 3k with the demo model, dropping random vocabulary genes, a kNN fitted on the
# full cells labels the copies with accuracy 0.937 with every gene, 0.927 with 90% of them and
# 0.930 with 70% (benchmarks/transfer.py); below 70% nothing is measured, so the threshold at
# half is a precaution.
MIN_COVERAGE = EmbedConfig.min_coverage
# What scllm.embed takes as keywords (beside layer, key_added and copy).
EMBED_OPTIONS = ("gene_id_column", "min_coverage", "batch_size", "chunk_size", "device")


def _embeddings_adata(obs: pd.DataFrame, embeddings: np.ndarray, uns: dict):
    import anndata as ad

    return ad.AnnData(obs=obs, obsm={EMBEDDING_KEY: embeddings}, uns={"scllm": uns})


def _write_embeddings(path, obs: pd.DataFrame, embeddings: np.ndarray, uns: dict) -> None:
    with atomic_path(path) as tmp:
        _embeddings_adata(obs, embeddings, uns).write_h5ad(tmp)


# --- the pipeline's cells: from the token shards -----------------------------------------------


def embed_shards(
    model_dir,
    shards_dir,
    binned_h5ad,
    out_h5ad,
    *,
    cells: str = EmbedConfig.cells,
    batch_size: int = EmbedConfig.batch_size,
    device: str = EmbedConfig.device,
) -> dict:
    """Embed the cells of the token shards into an h5ad (rule embed).

    The h5ad holds ``obsm["X_scllm"]`` and obs from ``binned_h5ad`` (rows given by the shards'
    ``cell_index``) plus ``split``, cells in binned.h5ad order. One shard is in memory at a time.

    Parameters
    ----------
    model_dir : str or Path
        The model folder.
    shards_dir : str or Path
        The token shards (tokenized with the model's vocabulary).
    binned_h5ad : str or Path
        The binned cells the shards were made from (their obs).
    out_h5ad : str or Path
        The h5ad to write.
    cells : str, default EmbedConfig.cells
        "validation" or "all".
    batch_size : int, default EmbedConfig.batch_size
        Cells a forward pass.
    device : str, default EmbedConfig.device
        Where the model runs (see ``resolve_device``).

    Returns
    -------
    dict
        ``n_cells``, ``by_split`` (cells per split) and ``dim``.

    Raises
    ------
    ValueError
        An unknown ``cells``, shards of another vocabulary than the model's, no validation cells
        (with "validation"), or shards that do not fit ``binned_h5ad``.
    CorruptArtifactError
        A shard does not match its manifest.
    """
    from scllm.files import software_provenance
    from scllm.h5ad import open_backed

    if cells not in ("validation", "all"):
        raise ValueError(f"embed.cells must be 'validation' or 'all', not {cells!r}")
    t0 = time.time()
    shards_dir = Path(shards_dir)
    model, vocab, args = load_model(model_dir, resolve_device(device))
    manifest = read_manifest(shards_dir / "manifest.json")
    if manifest["vocab_sha256"] != model.vocab_sha256:
        raise ValueError(
            f"{shards_dir} was tokenized with vocabulary {manifest['vocab_sha256']} "
            f"but the model in {model_dir} uses {model.vocab_sha256}; "
            "rerun pretrain on these shards"
        )
    splits = ["validation"] if cells == "validation" else sorted(manifest["splits"])
    missing = [s for s in splits if not manifest["splits"].get(s)]
    if cells == "validation" and missing:
        raise ValueError(f"{shards_dir} has no validation cells; use embed.cells: all")
    parts, index, split_of = [], [], []
    for split in splits:
        for entry in manifest["splits"].get(split, []):
            shard = read_listed_shard(shards_dir, manifest, entry)
            parts.append(embed_shard_cells(model, shard, batch_size))
            index.append(shard.cell_index)
            split_of.append(np.full(shard.n_cells, split, dtype=object))
            log.info("embed: %s: %d cells", entry["path"], shard.n_cells)
    embeddings = np.concatenate(parts) if parts else np.zeros((0, model.cell_emb_dim), np.float32)
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    split_of = np.concatenate(split_of) if split_of else np.zeros(0, object)
    order = np.argsort(index, kind="stable")
    embeddings, index, split_of = embeddings[order], index[order], split_of[order]

    binned = open_backed(binned_h5ad)
    n_obs = binned.n_obs
    if len(index) and (index[-1] >= n_obs or np.any(np.diff(index) == 0)):
        raise ValueError(
            f"the shards' cell_index does not fit {binned_h5ad} ({n_obs} cells); "
            "the shards come from another binned.h5ad: rerun tokenize_shards"
        )
    obs = binned.obs.iloc[index].copy()
    binned.file.close()
    obs["split"] = pd.Categorical(split_of, categories=sorted(manifest["splits"]))
    counts = {s: int((split_of == s).sum()) for s in splits}
    uns = {
        "model": str(Path(model_dir)),
        "vocab_sha256": model.vocab_sha256,
        "cells": cells,
        "n_cells": counts,
        "source": "token shards",
        "software": software_provenance(),
    }
    _write_embeddings(out_h5ad, obs, embeddings, uns)
    log.info(
        "embed: %d of %d cells (%s) -> %s [%d x %d] in %.1fs",
        len(index),
        n_obs,
        ", ".join(f"{s} {n}" for s, n in counts.items()),
        out_h5ad,
        *embeddings.shape,
        time.time() - t0,
    )
    return {"n_cells": len(index), "by_split": counts, "dim": embeddings.shape[1]}


# --- any AnnData or h5ad: map genes, normalize, bin, tokenize, embed -----------------------------


def embed(
    adata,
    model_dir,
    *,
    layer: str | None = None,
    key_added: str = EMBEDDING_KEY,
    copy: bool = False,
    **options,
):
    """Embed the cells of an AnnData in memory (or backed) with a pretrained model, scanpy style.

    Adds ``adata.obsm[key_added]`` (cells x embedding dim), ``adata.obs["scllm_n_genes"]``
    (vocabulary genes each cell expresses) and ``adata.uns["scllm"]`` (model, gene matching,
    binning); obs names and everything else stay as they are. Counts come from X or ``layer``,
    sparse or dense, raw counts preferred; genes are matched to the model's vocabulary as
    ``scllm embed`` does (var_names or a var column; ``gene_id_column`` to choose). The same cell
    gets the same embedding here, in ``scllm embed`` and alone or in any batch, and the
    pipeline's own embeddings (the tie-break draws are keyed on its counts).

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes.
    model_dir : str or Path
        A pretrained model's folder.
    layer : str or None, default None
        The layer holding the counts; None for X.
    key_added : str, default "X_scllm"
        The obsm key of the embeddings.
    copy : bool, default False
        Return an annotated copy instead of annotating ``adata``.
    **options
        ``gene_id_column``, ``min_coverage``, ``batch_size``, ``chunk_size``, ``device``, as for
        ``scllm embed`` (defaults: ``scllm.config.EmbedConfig``).

    Returns
    -------
    anndata.AnnData or None
        None, or the annotated copy with ``copy=True``.

    Raises
    ------
    TypeError
        An unknown option.
    InputError
        Options out of range, or values that are not counts (or normalized values).
    GeneCoverageError
        Fewer than ``min_coverage`` of the vocabulary genes found (a ValueError).
    ValueError
        No such layer, or no counts in X.

    Examples
    --------
    >>> import scanpy as sc, scllm
    >>> scllm.embed(adata, "results/demo/model")
    >>> sc.pp.neighbors(adata, use_rep="X_scllm", transformer="sklearn")  # exact, any size
    """
    wrong = set(options) - set(EMBED_OPTIONS)
    if wrong:  # as Python words it for a keyword the function does not take
        raise TypeError(f"embed() got an unexpected keyword argument {sorted(wrong)[0]!r}")
    cfg = EmbedConfig(**options)
    check_embed_options(cfg.batch_size, cfg.chunk_size, cfg.min_coverage)
    if layer and layer not in adata.layers:
        raise ValueError(f"adata has no layer {layer!r} (layers: {list(adata.layers)})")
    if copy:
        adata = adata.copy()
    embedder = Embedder.load(model_dir, cfg.device)
    matrix = adata.layers[layer] if layer else adata.X
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    if matrix is None:
        raise ValueError(
            f"{where} is empty: give an AnnData with counts in X or in a layer (layer=...)"
        )
    mapping = checked_mapping(
        adata.var,
        embedder.genes,
        cfg.gene_id_column,
        where,
        adata.n_obs,
        model_dir,
        cfg.min_coverage,
    )
    embeddings, n_tokens = embed_rows(
        embedder, mapping, lambda a, b: matrix[a:b], adata.n_obs, where, cfg
    )
    adata.obsm[key_added] = embeddings
    adata.obs["scllm_n_genes"] = n_tokens
    adata.uns["scllm"] = embedder.provenance(mapping, "in memory", layer)
    return adata if copy else None


def embed_h5ad(
    model_dir, in_h5ad, out_h5ad, cfg: EmbedConfig | None = None, *, overwrite=False, **options
) -> dict:
    """Embed the cells of any h5ad with a pretrained model; writes obs + ``obsm["X_scllm"]``.

    As ``embed`` (the same embeddings for the same cells), from a file: X (or ``counts_layer``)
    is read in row chunks of ``chunk_size`` cells, so memory does not grow with the file. The
    output is held (its writer lock) from the first check on, so a second writer of it is
    refused before the work.

    Parameters
    ----------
    model_dir : str or Path
        A pretrained model's folder.
    in_h5ad : str or Path
        The cells.
    out_h5ad : str or Path
        The h5ad to write. It must not exist, or (with ``overwrite``) be an earlier output of this
        function: see ``check_embed_output``, which refuses it before any work.
    cfg : EmbedConfig or None, default None
        The options; None to give them as keywords.
    overwrite : bool, default False
        Replace an earlier output of this function.
    **options
        ``EmbedConfig``'s fields (``gene_id_column``, ``counts_layer``, ``min_coverage``,
        ``batch_size``, ``chunk_size``, ``device``), instead of ``cfg``.

    Returns
    -------
    dict
        ``n_cells``, ``dim``, the gene match (``coverage``, ``n_found``, ``n_vocab``,
        ``gene_match``, ``columns``, ``token_ids``), ``binning_source`` and ``n_empty`` (cells
        expressing no vocabulary gene).

    Raises
    ------
    UnsafeOutputError
        ``out_h5ad`` may not be written.
    OutputBusyError
        Another process is writing ``out_h5ad``.
    InputError
        Options out of range, no cells, or values that are not counts (or normalized values).
    GeneCoverageError
        Fewer than ``min_coverage`` of the vocabulary genes found (a ValueError).
    """
    cfg = settings_of(EmbedConfig, cfg, options, "embed")
    t0 = time.time()
    check_embed_options(cfg.batch_size, cfg.chunk_size, cfg.min_coverage)
    check_embed_output(model_dir, in_h5ad, out_h5ad, overwrite)
    # The output is held from here, so a second writer of it is refused now, not after the work.
    with atomic_path(out_h5ad) as tmp:
        check_embed_output(model_dir, in_h5ad, out_h5ad, overwrite)  # what appeared meanwhile
        obs, embeddings, uns, mapping, binning_source = _embed_file(model_dir, in_h5ad, cfg)
        _embeddings_adata(obs, embeddings, uns).write_h5ad(tmp)
    n_tokens = obs["scllm_n_genes"].to_numpy()
    log.info(
        "embed: %d cells (median %d vocabulary genes expressed) -> %s [%d x %d] in %.1fs",
        len(obs),
        int(np.median(n_tokens)) if len(obs) else 0,
        out_h5ad,
        *embeddings.shape,
        time.time() - t0,
    )
    return {
        "n_cells": len(obs),
        "dim": embeddings.shape[1],
        "coverage": mapping.coverage,
        "n_found": mapping.n_found,
        "n_vocab": mapping.n_vocab,
        "gene_match": mapping.source,
        "binning_source": binning_source,
        "n_empty": int((n_tokens == 0).sum()),
        "columns": mapping.columns,
        "token_ids": mapping.token_ids,
    }


def _embed_file(model_dir, in_h5ad, cfg: EmbedConfig):
    """(obs with scllm_n_genes, embeddings, uns, gene mapping, binning source) for the cells of
    an h5ad."""
    from scllm.h5ad import open_backed

    embedder = Embedder.load(model_dir, cfg.device)
    adata = open_backed(in_h5ad, own=False)  # your file: the pipeline cannot rewrite it
    obs, var, n_cells = adata.obs.copy(), adata.var.copy(), adata.n_obs
    adata.file.close()
    # Genes are mapped (and their duplicates handled) by map_genes, so only the cells are checked
    # here.
    obs.index = check_cells_and_genes(obs.index, None, str(in_h5ad))
    mapping = checked_mapping(
        var,
        embedder.genes,
        cfg.gene_id_column,
        str(in_h5ad),
        n_cells,
        model_dir,
        cfg.min_coverage,
    )
    with open_matrix(in_h5ad, cfg.counts_layer) as matrix:
        where = f"{matrix.name} of {in_h5ad}"
        embeddings, n_tokens = embed_rows(embedder, mapping, matrix.rows, n_cells, where, cfg)
    obs["scllm_n_genes"] = n_tokens
    uns = embedder.provenance(mapping, str(in_h5ad), cfg.counts_layer)
    return obs, embeddings, uns, mapping, embedder.binning_source


# --- where scllm embed may write -----------------------------------------------------------------


def check_embed_output(model_dir, in_h5ad, out_h5ad, overwrite: bool = False) -> None:
    """Refuse an output of ``scllm embed`` that would replace what the command did not write.

    That is the input, the model folder or anything in it, a folder, or any file but an earlier
    output of ``scllm embed``, which ``overwrite`` allows it to replace.

    Parameters
    ----------
    model_dir : str or Path
        The model folder.
    in_h5ad : str or Path
        The input h5ad.
    out_h5ad : str or Path
        The output.
    overwrite : bool, default False
        Allow replacing an earlier output of ``scllm embed``.

    Raises
    ------
    UnsafeOutputError
        The output may not be written (the message suggests another path).
    """
    out = Path(out_h5ad)
    example = sibling_name(in_h5ad, "_embedded.h5ad")
    if same_file(out, in_h5ad):
        raise UnsafeOutputError(
            f"the output {out} is the input h5ad {in_h5ad}: writing there would replace its "
            f"counts with embeddings. Nothing was written: give another output path, e.g. "
            f"{example}."
        )
    if lies_within(out, model_dir):
        where = "is" if same_file(out, model_dir) else "lies inside"
        raise UnsafeOutputError(
            f"the output {out} {where} the model folder {model_dir}: writing there would "
            "replace or mix with the trained model. Nothing was written: give an output path "
            f"outside it, e.g. {example}."
        )
    if out.is_dir():
        raise UnsafeOutputError(
            f"the output {out} is a folder; scllm embed writes one h5ad file and never replaces "
            f"a folder. Nothing was written: give a file path, e.g. {out / example.name}."
        )
    if not (out.exists() or out.is_symlink()):
        return
    earlier = _earlier_embed_output(out)
    if earlier is None:
        raise UnsafeOutputError(
            f"the output {out} exists and is not an h5ad written by scllm embed, so it is left "
            "alone (--overwrite replaces only an earlier output of scllm embed). Nothing was "
            f"written: give another output path, e.g. {example}, or move {out} away."
        )
    if not overwrite:
        raise UnsafeOutputError(
            f"the output {out} exists: embeddings scllm embed wrote earlier (model "
            f"{earlier.get('model')}, cells of {earlier.get('source')}). Nothing was written: "
            "pass --overwrite (overwrite=True in Python) to replace them, or give another "
            f"output path, e.g. {example}."
        )


def _earlier_embed_output(path: Path) -> dict | None:
    """The ``uns['scllm']`` of an h5ad that ``scllm embed`` wrote (no X, ``obsm['X_scllm']``,
    cells from a file), or None for anything else: a file of counts, the pipeline's
    embeddings.h5ad, an AnnData saved after ``scllm.embed``, a file that is not an h5ad."""
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as f:
            if "X" in f or f"obsm/{EMBEDDING_KEY}" not in f or "uns/scllm" not in f:
                return None
            uns = read_elem(f["uns/scllm"])
    except Exception:  # not HDF5, or not laid out as anndata writes it
        return None
    if not isinstance(uns, dict) or "vocab_sha256" not in uns:
        return None
    return None if uns.get("source") in (None, "token shards", "in memory") else uns
