"""Load a pretrained model and embed cells with it (the <cls> output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from scllm.data import RaggedCells, collate
from scllm.model import CellTransformer, ModelConfig
from scllm.tokens import Shard, read_shard, read_vocab, vocab_sha256


def load_model(model_dir, device="cpu") -> tuple[CellTransformer, dict[str, int], dict]:
    """(model in eval mode, vocabulary, args) from a pretrain output directory."""
    model_dir = Path(model_dir)
    missing = [n for n in ("best_model.pt", "args.json", "vocab.json") if not (model_dir / n).exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}; is it a finished pretrain output directory?")
    args = json.loads((model_dir / "args.json").read_text())
    vocab = read_vocab(model_dir / "vocab.json")
    expected = args.get("data", {}).get("vocab_sha256")
    if expected and vocab_sha256(vocab) != expected:
        raise ValueError(f"{model_dir}/vocab.json has sha256 {vocab_sha256(vocab)} but args.json records {expected}; "
                         "the directory mixes files of different runs")
    model = CellTransformer(ModelConfig(**args["model"]))
    model.load_state_dict(torch.load(model_dir / "best_model.pt", map_location="cpu", weights_only=True))
    model.vocab_sha256 = vocab_sha256(vocab)  # lets embed_shard_cells refuse shards of another vocabulary
    return model.to(device).eval(), vocab, args


def _as_cells(cells) -> RaggedCells:
    if isinstance(cells, (str, Path)):
        cells = read_shard(cells)
    if isinstance(cells, RaggedCells):
        return cells
    if isinstance(cells, Shard):
        return RaggedCells(cells.offsets, cells.gene_ids, cells.values)
    offsets, gene_ids, values = cells
    return RaggedCells(offsets, gene_ids, values)


@torch.no_grad()
def embed_shard_cells(model: CellTransformer, cells, batch_size: int = 64) -> np.ndarray:
    """<cls> embeddings [n_cells, d_model] (float32, input order) for a shard path, a Shard,
    a RaggedCells/ShardDataset, or an (offsets, gene_ids, values) tuple of token arrays.

    Cells are batched in length order so each batch pads little; the model runs in eval mode.
    """
    if isinstance(cells, (str, Path)):
        shard = read_shard(cells)
        expected = getattr(model, "vocab_sha256", None)
        if expected and shard.attrs.get("vocab_sha256", expected) != expected:
            raise ValueError(f"{cells} was tokenized with vocabulary {shard.attrs['vocab_sha256']} but the model "
                             f"uses {expected}; tokenize the cells with the model's vocab.json")
        cells = shard
    cells = _as_cells(cells)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(cells), model.cfg.d_model), dtype=np.float32)
    order = np.argsort(-cells.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate(cells.cells(idx), model.cfg.pad_id)
        pred = model(*(batch[k].to(device) for k in ("gene_ids", "values", "padding_mask")))
        out[idx] = pred["cell_emb"].float().cpu().numpy()
    model.train(was_training)
    return out
