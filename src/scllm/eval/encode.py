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
    """Cell embeddings for token sequences: a shard path, a Shard, a RaggedCells or token arrays.

    Cells are batched in length order so each batch pads little; the model runs in eval mode (its
    mode is restored afterwards).

    Parameters
    ----------
    model : CellTransformer
        The model (on its device).
    cells : str or Path or Shard or RaggedCells or tuple
        The cells; a tuple is (offsets, gene_ids, values).
    batch_size : int, default EmbedConfig.batch_size
        Cells a forward pass.

    Returns
    -------
    numpy.ndarray
        float32 [n_cells, cell_emb_dim], in input order.

    Raises
    ------
    ValueError
        A shard tokenized with another vocabulary than the model's.
    TypeError
        ``cells`` is none of the kinds above.
    InputError
        Token ids outside the vocabulary, or values outside the bins.
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
    """The torch device a device setting names.

    Parameters
    ----------
    device : str, default "auto"
        "auto" (a GPU when one is visible), "cuda", "cpu" or any torch device string.

    Returns
    -------
    torch.device

    Raises
    ------
    RuntimeError
        "cuda" asked for but no CUDA device is visible.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible")
    return torch.device(device)


def binning_settings(args: dict, model_dir=None) -> tuple[dict, str]:
    """The model's binning settings and where they come from.

    In order: args.json (``data.binning``), the shard manifest it names, or the pipeline defaults;
    n_bins always from the model.

    Parameters
    ----------
    args : dict
        The model's args.json.
    model_dir : str or Path or None, default None
        The model folder, against which a relative manifest path is resolved.

    Returns
    -------
    binning : dict
        ``n_bins``, ``seed``, ``target_sum`` and ``log1p``.
    source : str
        "args.json", the manifest's path or "defaults".

    Raises
    ------
    ValueError
        A recorded n_bins other than the model's.
    """
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
    """Token arrays for a block of cells x input genes, as training made them.

    normalize_total with totals over all input genes, the vocabulary genes in token order,
    per-cell quantile bins with the model's seed, ``<cls>`` first. Tied values are spread over
    their bins by draws keyed on (seed, the cell's content key, gene), as in normalize_bin, so a
    cell gets the training tokens wherever it sits (alone or in a batch).

    Parameters
    ----------
    counts : scipy.sparse.csr_matrix
        Counts, cells x input genes.
    mapping : GeneMapping
        Which input column is which vocabulary gene.
    n_genes : int
        The vocabulary's genes (also the ``<cls>`` id).
    binning : dict
        ``binning_settings``'s settings.

    Returns
    -------
    tuple of numpy.ndarray
        (offsets, gene_ids, values), as ``sequences_from_binned``.
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
    """A pretrained model with what embedding new cells needs.

    Made by ``Embedder.load``.

    Attributes
    ----------
    model_dir : Path
        The model folder.
    model : CellTransformer
        The model, in eval mode.
    genes : pandas.DataFrame
        The vocabulary genes (``model_genes``).
    n_genes : int
        Their number: also the ``<cls>`` id.
    binning : dict
        The binning settings (``binning_settings``).
    binning_source : str
        Where they came from.
    """

    model_dir: Path
    model: CellTransformer
    genes: pd.DataFrame
    n_genes: int
    binning: dict
    binning_source: str

    @classmethod
    def load(cls, model_dir, device: str) -> Embedder:
        """Load a model and what embedding needs (a warning if the binning settings are defaults).

        Parameters
        ----------
        model_dir : str or Path
            The model folder.
        device : str
            Where the model runs (see ``resolve_device``).

        Returns
        -------
        Embedder

        Raises
        ------
        FileNotFoundError
            A model file is missing.
        CorruptArtifactError
            A model file is damaged.
        """
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
        """uns["scllm"] of the embedded cells.

        Parameters
        ----------
        mapping : GeneMapping
            How the input's genes matched the vocabulary.
        source : str
            What was embedded (e.g. the input file).
        layer : str or None
            The layer the counts came from; None for X.

        Returns
        -------
        dict
        """
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
    """Embeddings and vocabulary genes expressed per cell, a chunk of cells at a time.

    Parameters
    ----------
    embedder : Embedder
        The model and its settings.
    mapping : GeneMapping
        Which input column is which vocabulary gene.
    read_rows : callable
        ``read_rows(start, stop)`` returns those cells' counts, sparse or dense.
    n_cells : int
        The cells.
    where : str
        The input, for the messages.
    cfg : EmbedConfig
        ``chunk_size`` and ``batch_size``.

    Returns
    -------
    embeddings : numpy.ndarray
        float32 [n_cells, cell_emb_dim].
    n_genes : numpy.ndarray
        int64, the vocabulary genes each cell expresses (0: its embedding says nothing).

    Raises
    ------
    InputError
        Values that are neither counts nor normalized values (negative, NaN or infinite).
    """
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
