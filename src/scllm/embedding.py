"""Load a pretrained model and embed cells with it (its cell embedding: model.cell_emb_style).

- ``embed_shard_cells``: token sequences (a shard, or ragged arrays) -> embeddings.
- ``embed_shards``: the pipeline's own cells, straight from the token shards (rule embed).
- ``embed_h5ad``: any h5ad of counts (``scllm embed``): genes are mapped to the model's
  vocabulary, normalized and binned as in training, tokenized and embedded, in row chunks.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scllm.checks import (
    check_cells_and_genes,
    check_counts,
    check_embed_options,
    load_torch_file,
)
from scllm.config import EmbedConfig
from scllm.data import RaggedCells, collate
from scllm.errors import CorruptArtifactError, InputError, UnsafeOutputError
from scllm.io import atomic_path, lies_within, same_file, sibling_name
from scllm.model import CellTransformer, ModelConfig
from scllm.tokens import (
    CLS_TOKEN,
    Shard,
    read_json,
    read_listed_shard,
    read_manifest,
    read_shard,
    read_vocab,
    sequences_from_binned,
    vocab_sha256,
)

log = logging.getLogger("scllm")

EMBEDDING_KEY = "X_scllm"
# Below this fraction of vocabulary genes found in the input, `scllm embed` refuses to run: the
# missing genes read as "not expressed", which moves cells away from where training put them.
# Measured on PBMC 3k with the demo model, dropping random vocabulary genes: kNN cell-type accuracy
# with all genes 0.76; with 75% of them 0.76, 60% 0.73, 50% 0.73, 40% 0.69, 30% 0.64, 10% 0.51 (the
# centred cosine similarity to the all-genes embeddings: 0.94, 0.89, 0.86, 0.79, 0.49, 0.24).
MIN_COVERAGE = EmbedConfig.min_coverage
# The pipeline's normalize_bin defaults, used when a model records no binning settings.
DEFAULT_BINNING = {"seed": 0, "target_sum": 1e4, "log1p": False}
# How to get a good best_model.pt back (load_model's refusals).
MODEL_FIX = (
    "If the directory is this pipeline's pretrain output, delete best_model.pt and rerun "
    "snakemake: pretrain rewrites it from last_checkpoint.pt. Otherwise get the model directory "
    "again from a source you trust."
)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def load_model(model_dir, device="cpu") -> tuple[CellTransformer, dict[str, int], dict]:
    """(model in eval mode, vocabulary, args) from a pretrain output directory."""
    model_dir = Path(model_dir)
    missing = [
        n for n in ("best_model.pt", "args.json", "vocab.json") if not (model_dir / n).exists()
    ]
    if missing:
        raise FileNotFoundError(
            f"{model_dir} lacks {', '.join(missing)}; is it a finished pretrain output directory?"
        )
    args = read_json(model_dir / "args.json")
    vocab = read_vocab(model_dir / "vocab.json")
    expected = args.get("data", {}).get("vocab_sha256")
    if expected and vocab_sha256(vocab) != expected:
        raise ValueError(
            f"{model_dir}/vocab.json has sha256 {vocab_sha256(vocab)} but args.json records "
            f"{expected}; "
            "the directory mixes files of different runs"
        )
    model = CellTransformer(ModelConfig(**args["model"]))
    weights = load_torch_file(model_dir / "best_model.pt", MODEL_FIX)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:  # tensors, but not this model's
        raise CorruptArtifactError(
            f"{model_dir / 'best_model.pt'} does not hold the weights of the model "
            f"{model_dir / 'args.json'} describes ({str(err).splitlines()[0][:200]}). " + MODEL_FIX
        ) from None
    model.vocab_sha256 = vocab_sha256(
        vocab
    )  # lets embed_shard_cells refuse shards of another vocabulary
    return model.to(device).eval(), vocab, args


def _as_cells(cells) -> RaggedCells:
    if isinstance(cells, (str, Path)):
        cells = read_shard(cells)
    if isinstance(cells, RaggedCells):
        return cells
    if isinstance(cells, Shard):
        return RaggedCells(cells.offsets, cells.gene_ids, cells.values)
    if not isinstance(cells, (tuple, list)) or len(cells) != 3:
        raise TypeError(
            f"cannot embed a {type(cells).__name__}: pass a shard path, a Shard, a RaggedCells "
            "or an (offsets, gene_ids, values) tuple (a ShardDataset reads its shards lazily: "
            "pass their paths)"
        )
    offsets, gene_ids, values = cells
    return RaggedCells(offsets, gene_ids, values)


@torch.no_grad()
def embed_shard_cells(
    model: CellTransformer, cells, batch_size: int = EmbedConfig.batch_size
) -> np.ndarray:
    """Cell embeddings [n_cells, cell_emb_dim] (float32, input order) for a shard path, a Shard,
    a RaggedCells, or an (offsets, gene_ids, values) tuple of token arrays.

    Cells are batched in length order so each batch pads little; the model runs in eval mode.
    """
    if isinstance(cells, (str, Path)):
        shard = read_shard(cells)
        expected = getattr(model, "vocab_sha256", None)
        if expected and shard.attrs.get("vocab_sha256", expected) != expected:
            raise ValueError(
                f"{cells} was tokenized with vocabulary {shard.attrs['vocab_sha256']} "
                f"but the model uses {expected}; tokenize the cells with the model's vocab.json"
            )
        cells = shard
    cells = _as_cells(cells)
    _check_tokens(cells, model.cfg)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(cells), model.cell_emb_dim), dtype=np.float32)
    order = np.argsort(-cells.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate(cells.cells(idx), model.cfg.pad_id)
        pred = model(*(batch[k].to(device) for k in ("gene_ids", "values", "padding_mask")))
        out[idx] = pred["cell_emb"].float().cpu().numpy()
    model.train(was_training)
    return out


def _check_tokens(cells: RaggedCells, cfg) -> None:
    """Token ids and values the model can embed: an id outside the vocabulary would fail deep in
    torch (IndexError) and a value outside the bins would read as another bin."""
    if not len(cells.gene_ids):
        return
    ids, values = cells.gene_ids, cells.values
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise InputError(
            f"token gene ids lie outside the model's vocabulary 0..{cfg.vocab_size - 1} (found "
            f"{int(ids.min())}..{int(ids.max())}); tokenize the cells with the model's vocab.json"
        )
    if values.min() < min(cfg.mask_value, 0) or values.max() > cfg.n_bins - 1:
        raise InputError(
            f"token values lie outside the model's bins 0..{cfg.n_bins - 1} and mask "
            f"{cfg.mask_value} (found {int(values.min())}..{int(values.max())}); "
            "bin the cells with the model's n_bins"
        )


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible")
    return torch.device(device)


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
    """Embed the cells of the token shards (``cells``: ``validation`` or ``all``) into an h5ad:
    ``obsm["X_scllm"]``, obs from ``binned_h5ad`` (rows given by the shards' ``cell_index``) plus
    ``split``, cells in binned.h5ad order. One shard is in memory at a time.
    """
    from scllm.io import open_backed, software_provenance

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


# --- any h5ad: map genes, normalize, bin, tokenize, embed ----------------------------------------


class GeneCoverageError(ValueError):
    """Too few of the model's vocabulary genes were found in the input."""


@dataclass
class GeneMapping:
    """Which input column feeds each vocabulary gene found."""

    token_ids: np.ndarray  # vocabulary token ids found, ascending
    columns: np.ndarray  # input column of each, same order
    n_vocab: int
    source: str  # e.g. "Ensembl ids in var['gene_ids']"
    missing_examples: list[str]
    n_duplicated: int = (
        0  # vocabulary genes found in more than one input column (the first is used)
    )

    @property
    def n_found(self) -> int:
        return len(self.token_ids)

    @property
    def coverage(self) -> float:
        return self.n_found / max(self.n_vocab, 1)

    def describe(self) -> str:
        return (
            f"{self.n_found} of {self.n_vocab} vocabulary genes ({self.coverage:.1%}), "
            f"matched by {self.source}"
        )


def model_genes(model_dir, vocab: dict[str, int]) -> pd.DataFrame:
    """The vocabulary genes (feature_id, feature_name, token_id) in token order."""
    path = Path(model_dir) / "genes.tsv"
    ids = [g for g, i in sorted(vocab.items(), key=lambda kv: kv[1]) if not g.startswith("<")]
    if path.exists():
        genes = pd.read_csv(path, sep="\t", dtype={"feature_id": str, "feature_name": str})
        if genes["feature_id"].tolist() != ids:
            raise ValueError(
                f"{path} does not list the genes of {Path(model_dir) / 'vocab.json'} in order; "
                "the model directory mixes files of different runs"
            )
    else:  # symbols unknown: Ensembl ids only
        genes = pd.DataFrame({"feature_id": ids, "feature_name": pd.NA})
    genes["token_id"] = [vocab[g] for g in genes["feature_id"]]
    return genes.reset_index(drop=True)


def _strip_version(values: np.ndarray) -> np.ndarray:
    return np.array([v.split(".")[0] if _ENSEMBL.match(v) else v for v in values], dtype=object)


def _first_positions(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Position of each key's first occurrence in ``values`` (-1 where absent)."""
    values = pd.Index(values)
    first = ~values.duplicated(keep="first")
    positions = np.flatnonzero(first)
    where = values[first].get_indexer(keys)
    return np.where(where >= 0, positions[np.maximum(where, 0)], -1)


def map_genes(
    var: pd.DataFrame, genes: pd.DataFrame, gene_id_column: str | None = None
) -> GeneMapping:
    """Map the input's genes (``var`` with its index as var_names) to the vocabulary.

    Looks at var_names and every text column of var (or only ``gene_id_column``; ``index`` means
    var_names), matching Ensembl ids (version suffixes dropped) against ``feature_id`` and other
    values against ``feature_name`` (symbols shared by several vocabulary genes are skipped),
    and keeps the candidate that finds the most vocabulary genes. Duplicate input genes: the
    first column counts.
    """
    if (
        gene_id_column is not None
        and gene_id_column not in ("index", "var_names")
        and gene_id_column not in var
    ):
        raise ValueError(
            f"var has no column {gene_id_column!r} (gene id column); available: "
            f"{['index'] + list(var.columns)}"
        )
    if gene_id_column in (None, "index", "var_names"):
        candidates = [("var_names", var.index)]
    else:
        candidates = []
    if gene_id_column is None:
        candidates += [
            (f"var[{c!r}]", var[c])
            for c in var.columns
            if var[c].dtype == object
            or isinstance(var[c].dtype, (pd.CategoricalDtype, pd.StringDtype))
        ]
    elif gene_id_column not in ("index", "var_names"):
        candidates = [(f"var[{gene_id_column!r}]", var[gene_id_column])]

    feature_ids = genes["feature_id"].to_numpy(dtype=object)
    names = genes["feature_name"]
    unique_name = names.notna() & ~names.duplicated(keep=False)
    best = None
    for label, values in candidates:
        values = np.asarray(values).astype(str)
        ids = _strip_version(values)
        for kind, keys, usable in (
            ("Ensembl ids", feature_ids, np.ones(len(genes), bool)),
            ("gene symbols", names.astype(str).to_numpy(dtype=object), unique_name.to_numpy()),
        ):
            positions = np.where(
                usable, _first_positions(ids if kind == "Ensembl ids" else values, keys), -1
            )
            score = (
                int((positions >= 0).sum()),
                kind == "Ensembl ids",
            )  # ties: ids, they are unambiguous
            if best is None or score > best[0]:
                matched = pd.Index(ids if kind == "Ensembl ids" else values)
                n_dup = int(
                    pd.Index(keys[positions >= 0]).isin(matched[matched.duplicated()]).sum()
                )
                best = (score, f"{kind} in {label}", positions, n_dup)
    if best is None:
        raise ValueError("var has no text column and no var_names to match genes on")
    _, source, positions, n_duplicated = best
    hit = positions >= 0
    missing = genes.loc[~hit, "feature_id"].head(3).tolist()
    return GeneMapping(
        token_ids=genes["token_id"].to_numpy()[hit].astype(np.int64),
        columns=positions[hit].astype(np.int64),
        n_vocab=len(genes),
        source=source,
        missing_examples=missing,
        n_duplicated=n_duplicated,
    )


def binning_settings(args: dict, model_dir=None) -> tuple[dict, str]:
    """The model's binning settings and where they come from: args.json (``data.binning``), the
    shard manifest it names (a relative path is relative to ``model_dir``), or the pipeline
    defaults (n_bins always from the model)."""
    n_bins = int(args["model"]["n_bins"])
    data = args.get("data", {})
    sources = [("args.json", data.get("binning"))]
    manifest = data.get("manifest")
    if manifest and model_dir is not None and not Path(manifest).is_absolute():
        manifest = str(Path(model_dir) / manifest)
    if manifest and Path(manifest).exists():
        sources.append((manifest, read_manifest(manifest).get("binning")))
    for where, binning in sources:
        if binning:
            binning = {**DEFAULT_BINNING, **binning}
            if int(binning.get("n_bins", n_bins)) != n_bins:
                raise ValueError(
                    f"{where} records n_bins={binning['n_bins']} but the model has n_bins={n_bins}"
                )
            return {**binning, "n_bins": n_bins}, where
    return {**DEFAULT_BINNING, "n_bins": n_bins}, "defaults"


def tokenize_counts(counts: sp.csr_matrix, mapping: GeneMapping, n_genes: int, binning: dict):
    """Token arrays (offsets, gene_ids, values) for a block of cells x input genes, as training
    made them: normalize_total with totals over all input genes, the vocabulary genes in token
    order, per-cell quantile bins with the model's seed, ``<cls>`` first.

    Tied values are spread over their bins by draws keyed on (seed, the cell's content key, gene),
    as in normalize_bin, so a cell gets the training tokens wherever it sits (alone or in a batch).
    """
    from scllm.binning import bin_csr, content_keys, normalize_total

    counts = sp.csr_matrix(counts)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    picked = counts[:, mapping.columns].tocoo()
    in_vocab = sp.csr_matrix(
        (picked.data, (picked.row, mapping.token_ids[picked.col])),
        shape=(counts.shape[0], n_genes),
        dtype=np.float32,
    )
    in_vocab.sum_duplicates()
    in_vocab.eliminate_zeros()
    normalized = normalize_total(
        in_vocab, totals, float(binning["target_sum"]), bool(binning["log1p"])
    )
    binned = bin_csr(
        normalized, int(binning["n_bins"]), int(binning["seed"]), row_ids=content_keys(in_vocab)
    )
    return sequences_from_binned(binned, cls_id=n_genes)


class _Rows:
    """Row blocks of X or a layer of an h5ad on disk (sparse or dense), without loading it."""

    def __init__(self, path, layer: str | None):
        import h5py
        from anndata.io import sparse_dataset

        self.file = h5py.File(path, "r")
        key = f"layers/{layer}" if layer else "X"
        if key not in self.file:
            layers = list(self.file["layers"].keys()) if "layers" in self.file else []
            self.file.close()
            raise ValueError(f"{path} has no {key} (layers: {layers})")
        elem = self.file[key]
        self.where = f"layers[{layer!r}]" if layer else "X"
        self.elem = sparse_dataset(elem) if hasattr(elem, "keys") else elem
        if (
            self.elem.shape[0]
            and hasattr(elem, "keys")
            and elem.attrs.get("encoding-type") == "csc_matrix"
        ):
            log.warning(
                "%s of %s is stored column-wise (CSC): reading rows is slow; store it as CSR",
                self.where,
                path,
            )

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        return sp.csr_matrix(self.elem[rows], dtype=np.float32)

    def close(self):
        self.file.close()


def _model_for_embedding(model_dir, device: str):
    """(model, genes table, n_genes, binning settings, their source) for embedding cells."""
    model, vocab, args = load_model(model_dir, resolve_device(device))
    binning, binning_source = binning_settings(args, model_dir)
    if binning_source == "defaults":
        log.warning(
            "%s/args.json records no binning settings; binning with n_bins=%d (the model's) and "
            "the pipeline defaults seed=%d, target_sum=%g, log1p=%s (seed only decides ties; "
            "target_sum and log1p do not change the bins)",
            model_dir,
            binning["n_bins"],
            binning["seed"],
            binning["target_sum"],
            binning["log1p"],
        )
    return model, model_genes(model_dir, vocab), vocab[CLS_TOKEN], binning, binning_source


def _checked_mapping(
    var: pd.DataFrame,
    genes: pd.DataFrame,
    gene_id_column,
    where: str,
    n_cells: int,
    model_dir,
    min_coverage: float,
) -> GeneMapping:
    """``map_genes``, refused (GeneCoverageError) below ``min_coverage`` with what to do about
    it."""
    mapping = map_genes(var, genes, gene_id_column)
    if mapping.n_duplicated:
        log.warning(
            "embed: %d vocabulary genes match more than one column of %s (%s); the first column "
            "of each is used",
            mapping.n_duplicated,
            where,
            mapping.source,
        )
    log.info(
        "embed: %s: %d cells x %d genes; vocabulary coverage: %s",
        where,
        n_cells,
        len(var),
        mapping.describe(),
    )
    if mapping.coverage < min_coverage:
        raise GeneCoverageError(
            f"{where}: vocabulary coverage {mapping.coverage:.1%} is below the minimum "
            f"{min_coverage:.0%}: only {mapping.describe()} (best of var_names and the text "
            f"columns of var; missing e.g. {', '.join(mapping.missing_examples)}). Missing genes "
            "look unexpressed to the model, so these embeddings would not be comparable to those "
            "of the training cells. To fix: keep all genes of your data (do not subset to your "
            "own highly variable genes before embedding) and identify them the way the model "
            "does: Ensembl ids (e.g. ENSG00000163736) in var_names or a var column "
            "(--gene-id-column COLUMN), or symbols as in the feature_name column of "
            f"{Path(model_dir) / 'genes.tsv'}. --min-coverage lowers the threshold at your own "
            "risk."
        )
    if mapping.coverage < 0.9:
        log.warning(
            "embed: %d vocabulary genes are missing from %s and will read as not expressed",
            mapping.n_vocab - mapping.n_found,
            where,
        )
    return mapping


def _embed_rows(
    model,
    mapping: GeneMapping,
    n_genes: int,
    binning: dict,
    read_rows,
    n_cells: int,
    where: str,
    *,
    batch_size: int,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, vocabulary genes expressed per cell) of the cells that
    ``read_rows(start, stop)`` returns as sparse or dense count blocks, ``chunk_size`` cells at a
    time."""
    from scllm.io import Progress, row_chunks

    embeddings = np.zeros((n_cells, model.cell_emb_dim), dtype=np.float32)
    n_tokens = np.zeros(n_cells, dtype=np.int64)
    non_integer = False
    progress = Progress(0, n_cells)
    for start, stop in row_chunks(n_cells, chunk_size):
        counts = sp.csr_matrix(read_rows(start, stop), dtype=np.float32)
        check_counts(
            counts.data,
            where,
            ": give raw counts (or normalized, log-transformed values), e.g. with "
            "--counts-layer counts (layer= in scllm.embed)",
            integer=False,
        )
        if not non_integer and counts.nnz and not np.all(np.mod(counts.data, 1) == 0):
            non_integer = True
            log.info(
                "embed: %s holds non-integer values (normalized?); per-cell scaling and log1p "
                "keep each value's quantile bin, but tied values may be spread over their bins "
                "differently than from raw counts",
                where,
            )
        offsets, gene_ids, values = tokenize_counts(counts, mapping, n_genes, binning)
        n_tokens[start:stop] = np.diff(offsets) - 1
        embeddings[start:stop] = embed_shard_cells(model, (offsets, gene_ids, values), batch_size)
        log.info("embed: %d/%d cells; %s", stop, n_cells, progress.text(stop))
    empty = int((n_tokens == 0).sum())
    if empty:
        log.warning(
            "embed: %d cells express none of the vocabulary genes (their embedding says nothing "
            "of the cell; obs scllm_n_genes == 0)",
            empty,
        )
    return embeddings, n_tokens


def _provenance(
    model_dir,
    model,
    mapping: GeneMapping,
    binning: dict,
    binning_source: str,
    source: str,
    layer: str | None,
) -> dict:
    from scllm.io import software_provenance

    return {
        "model": str(Path(model_dir)),
        "vocab_sha256": model.vocab_sha256,
        "source": source,
        "layer": layer or "X",
        "gene_match": mapping.source,
        "n_vocab_genes": mapping.n_vocab,
        "n_vocab_genes_found": mapping.n_found,
        "coverage": mapping.coverage,
        "binning": {**binning, "source": binning_source},
        "software": software_provenance(),
    }


def embed(
    adata,
    model_dir,
    *,
    layer: str | None = None,
    gene_id_column: str | None = None,
    key_added: str = EMBEDDING_KEY,
    min_coverage: float = MIN_COVERAGE,
    batch_size: int = EmbedConfig.batch_size,
    chunk_size: int = EmbedConfig.chunk_size,
    device: str = EmbedConfig.device,
    copy: bool = False,
):
    """Embed the cells of an AnnData in memory (or backed) with a pretrained model, scanpy style.

    Adds ``adata.obsm[key_added]`` (cells x embedding dim), ``adata.obs["scllm_n_genes"]``
    (vocabulary genes each cell expresses) and ``adata.uns["scllm"]`` (model, gene matching,
    binning); obs names and everything else stay as they are. Counts come from X or ``layer``,
    sparse or dense, raw counts preferred; genes are matched to the model's vocabulary as
    ``scllm embed`` does (var_names or a var column; ``gene_id_column`` to choose). Returns None,
    or the annotated copy with ``copy=True``. The same cell gets the same embedding here, in
    ``scllm embed`` and alone or in any batch, and the pipeline's own embeddings (the tie-break
    draws are keyed on its counts).

        import scanpy as sc, scllm
        scllm.embed(adata, "results/demo/model")
        sc.pp.neighbors(adata, use_rep="X_scllm", transformer="sklearn")  # exact, any size
    """
    check_embed_options(batch_size, chunk_size, min_coverage)
    if layer and layer not in adata.layers:
        raise ValueError(f"adata has no layer {layer!r} (layers: {list(adata.layers)})")
    if copy:
        adata = adata.copy()
    model, genes, n_genes, binning, binning_source = _model_for_embedding(model_dir, device)
    matrix = adata.layers[layer] if layer else adata.X
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    if matrix is None:
        raise ValueError(
            f"{where} is empty: give an AnnData with counts in X or in a layer (layer=...)"
        )
    mapping = _checked_mapping(
        adata.var, genes, gene_id_column, where, adata.n_obs, model_dir, min_coverage
    )
    embeddings, n_tokens = _embed_rows(
        model,
        mapping,
        n_genes,
        binning,
        lambda a, b: matrix[a:b],
        adata.n_obs,
        where,
        batch_size=batch_size,
        chunk_size=chunk_size,
    )
    adata.obsm[key_added] = embeddings
    adata.obs["scllm_n_genes"] = n_tokens
    adata.uns["scllm"] = _provenance(
        model_dir, model, mapping, binning, binning_source, "in memory", layer
    )
    return adata if copy else None


def embed_h5ad(
    model_dir,
    in_h5ad,
    out_h5ad,
    *,
    gene_id_column: str | None = None,
    counts_layer: str | None = None,
    min_coverage: float = MIN_COVERAGE,
    batch_size: int = EmbedConfig.batch_size,
    chunk_size: int = EmbedConfig.chunk_size,
    device: str = EmbedConfig.device,
    overwrite: bool = False,
) -> dict:
    """Embed the cells of any h5ad with a pretrained model; writes obs + ``obsm["X_scllm"]``.

    As ``embed`` (the same embeddings for the same cells), from a file: X (or ``counts_layer``)
    is read in row chunks of ``chunk_size`` cells, so memory does not grow with the file.
    ``out_h5ad`` must not exist, or (with ``overwrite``) be an earlier output of this function:
    see ``check_embed_output``, which refuses it before any work.
    """
    t0 = time.time()
    check_embed_options(batch_size, chunk_size, min_coverage)
    check_embed_output(model_dir, in_h5ad, out_h5ad, overwrite)
    # The output is held from here, so a second writer of it is refused now, not after the work.
    with atomic_path(out_h5ad) as tmp:
        check_embed_output(model_dir, in_h5ad, out_h5ad, overwrite)  # what appeared meanwhile
        obs, embeddings, uns, mapping, binning_source = _embed_file(
            model_dir,
            in_h5ad,
            gene_id_column=gene_id_column,
            counts_layer=counts_layer,
            min_coverage=min_coverage,
            batch_size=batch_size,
            chunk_size=chunk_size,
            device=device,
        )
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


def _embed_file(
    model_dir,
    in_h5ad,
    *,
    gene_id_column,
    counts_layer,
    min_coverage,
    batch_size,
    chunk_size,
    device,
):
    """(obs with scllm_n_genes, embeddings, uns, gene mapping, binning source) for the cells of
    an h5ad."""
    from scllm.io import open_backed

    model, genes, n_genes, binning, binning_source = _model_for_embedding(model_dir, device)
    adata = open_backed(in_h5ad)
    obs, var, n_cells = adata.obs.copy(), adata.var.copy(), adata.n_obs
    adata.file.close()
    # Genes are mapped (and their duplicates handled) by map_genes, so only the cells are checked
    # here.
    obs.index = check_cells_and_genes(obs.index, None, str(in_h5ad))
    mapping = _checked_mapping(
        var, genes, gene_id_column, str(in_h5ad), n_cells, model_dir, min_coverage
    )
    rows = _Rows(in_h5ad, counts_layer)
    try:
        embeddings, n_tokens = _embed_rows(
            model,
            mapping,
            n_genes,
            binning,
            lambda a, b: rows[a:b],
            n_cells,
            f"{rows.where} of {in_h5ad}",
            batch_size=batch_size,
            chunk_size=chunk_size,
        )
    finally:
        rows.close()
    obs["scllm_n_genes"] = n_tokens
    uns = _provenance(
        model_dir, model, mapping, binning, binning_source, str(in_h5ad), counts_layer
    )
    return obs, embeddings, uns, mapping, binning_source


# --- where scllm embed may write -----------------------------------------------------------------


def check_embed_output(model_dir, in_h5ad, out_h5ad, overwrite: bool = False) -> None:
    """Refuse (UnsafeOutputError) an output of ``scllm embed`` that would replace what the
    command did not write: the input, the model folder or anything in it, a folder, or any file
    but an earlier output of ``scllm embed``, which ``overwrite`` allows it to replace."""
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
