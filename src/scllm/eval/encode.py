"""From cells to embedding vectors with a loaded model: token sequences (a shard, or ragged
arrays) straight through the model, and counts of any h5ad or AnnData first normalized, binned
and tokenized as training made them (``tokenize_counts``), in row chunks (``embed_rows``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scllm.checks import check_counts
from scllm.config import EmbedConfig
from scllm.errors import InputError
from scllm.eval.genes import GeneMapping, model_genes
from scllm.model import CellTransformer
from scllm.shards import Shard, read_manifest, read_shard
from scllm.tokens import CLS_TOKEN, RaggedCells, collate, sequences_from_binned
from scllm.train.checkpoint import load_model

log = logging.getLogger("scllm")

# The pipeline's normalize_bin defaults, used when a model records no binning settings.
DEFAULT_BINNING = {"seed": 0, "target_sum": 1e4, "log1p": False}


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
        expected = model.vocab_sha256
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
    from scllm.prep.binning import bin_csr, content_keys, normalize_total

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


@dataclass(frozen=True)
class Embedder:
    """A pretrained model with what embedding new cells needs: its vocabulary genes (and the
    number of them: also the <cls> id) and its binning settings, with where they came from."""

    model_dir: Path
    model: CellTransformer
    genes: pd.DataFrame
    n_genes: int
    binning: dict
    binning_source: str

    @classmethod
    def load(cls, model_dir, device: str) -> Embedder:
        model, vocab, args = load_model(model_dir, resolve_device(device))
        binning, binning_source = binning_settings(args, model_dir)
        if binning_source == "defaults":
            log.warning(
                "%s/args.json records no binning settings; binning with n_bins=%d (the model's) "
                "and the pipeline defaults seed=%d, target_sum=%g, log1p=%s (seed only decides "
                "ties; target_sum and log1p do not change the bins)",
                model_dir,
                binning["n_bins"],
                binning["seed"],
                binning["target_sum"],
                binning["log1p"],
            )
        genes = model_genes(model_dir, vocab)
        return cls(Path(model_dir), model, genes, vocab[CLS_TOKEN], binning, binning_source)

    def provenance(self, mapping: GeneMapping, source: str, layer: str | None) -> dict:
        """uns["scllm"] of the embedded cells."""
        from scllm.files import software_provenance

        return {
            "model": str(self.model_dir),
            "vocab_sha256": self.model.vocab_sha256,
            "source": source,
            "layer": layer or "X",
            "gene_match": mapping.source,
            "n_vocab_genes": mapping.n_vocab,
            "n_vocab_genes_found": mapping.n_found,
            "coverage": mapping.coverage,
            "binning": {**self.binning, "source": self.binning_source},
            "software": software_provenance(),
        }


def embed_rows(
    embedder: Embedder, mapping: GeneMapping, read_rows, n_cells: int, where: str, cfg
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, vocabulary genes expressed per cell) of the cells that
    ``read_rows(start, stop)`` returns as sparse or dense count blocks, ``cfg.chunk_size`` cells
    at a time."""
    from scllm.files import Progress
    from scllm.h5ad import row_chunks

    model = embedder.model
    embeddings = np.zeros((n_cells, model.cell_emb_dim), dtype=np.float32)
    n_tokens = np.zeros(n_cells, dtype=np.int64)
    non_integer = False
    progress = Progress(0, n_cells)
    for start, stop in row_chunks(n_cells, cfg.chunk_size):
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
        tokens = tokenize_counts(counts, mapping, embedder.n_genes, embedder.binning)
        n_tokens[start:stop] = np.diff(tokens[0]) - 1
        embeddings[start:stop] = embed_shard_cells(model, tokens, cfg.batch_size)
        log.info("embed: %d/%d cells; %s", stop, n_cells, progress.text(stop))
    empty = int((n_tokens == 0).sum())
    if empty:
        log.warning(
            "embed: %d cells express none of the vocabulary genes (their embedding says nothing "
            "of the cell; obs scllm_n_genes == 0)",
            empty,
        )
    return embeddings, n_tokens
