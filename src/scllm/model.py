"""An scGPT-style cell transformer, written nanoGPT-style: read it top to bottom.

A cell is a set of (gene id, expression bin) tokens, led by ``<cls>``. The encoder sees
gene embedding + value embedding and no positional information (a cell's genes have no order).
Two heads predict the bins of masked tokens:

- the expression head reads each token's own output;
- the GEPC head (scGPT names it MVC: its "inner product" MVCDecoder) predicts a gene's bin from
  the cell embedding alone, so the cell embedding must summarise the whole cell.

The cell embedding is read out as the ``<cls>`` output (``cell_emb_style: cls``, scGPT's
default), the mean of the gene-token outputs (``mean``), both side by side (``cls+mean``) or
their sum over the cell's genes, scaled by 1/sqrt(vocabulary size) (``sum``).
The losses that train it, and those acting on the cell embedding directly, are in
``scllm.train.objectives``; the settings (``ModelConfig``) in ``scllm.config``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from scllm.config import ModelConfig


class SelfAttention(nn.Module):
    """Multi-head self-attention over a cell's tokens (PyTorch's scaled_dot_product_attention).

    Parameters
    ----------
    cfg : ModelConfig
        Reads d_model, n_heads, attn_dropout and dropout.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens, padding keys hidden.

        Parameters
        ----------
        x : torch.Tensor
            Tokens [B, L, d_model].
        attn_mask : torch.Tensor
            [B, 1, 1, L], True where a key may be attended to (not padding).

        Returns
        -------
        torch.Tensor
            [B, L, d_model].
        """
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (
            t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v)
        )
        # attn_mask [B, 1, 1, L] hides padding keys only. Every query (pads included) still sees
        # <cls>, so no softmax row is empty (an all-masked row would give NaN).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, L, D)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """The block's MLP: Linear(d_model, d_ff) -> GELU -> Linear(d_ff, d_model) -> dropout.

    Parameters
    ----------
    cfg : ModelConfig
        Reads d_model, d_ff and dropout.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        """Apply the MLP to each token.

        Parameters
        ----------
        x : torch.Tensor
            Tokens [B, L, d_model].

        Returns
        -------
        torch.Tensor
            [B, L, d_model].
        """
        return self.dropout(self.out(F.gelu(self.fc(x))))


class ContinuousValueEncoder(nn.Module):
    """scGPT's encoder of a value as a number: Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm.

    Masked (-1) and padded (-2) values enter as those numbers, as in scGPT; values are clamped at
    n_bins.

    Parameters
    ----------
    cfg : ModelConfig
        Reads n_bins and d_model.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.max_value = float(cfg.n_bins)
        self.fc1, self.fc2 = nn.Linear(1, cfg.d_model), nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Encode each value.

        Parameters
        ----------
        values : torch.Tensor
            Token values [B, L].

        Returns
        -------
        torch.Tensor
            [B, L, d_model].
        """
        x = values.float().clamp(max=self.max_value).unsqueeze(-1)
        return self.norm(self.fc2(F.relu(self.fc1(x))))


class Block(nn.Module):
    """One transformer layer: self-attention and feed-forward, each with a residual connection.

    LayerNorm comes before each (pre-norm) with ``cfg.norm_first``, after each residual sum
    otherwise.

    Parameters
    ----------
    cfg : ModelConfig
        Reads norm_first, d_model and what SelfAttention and FeedForward read.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg)

    def forward(self, x, attn_mask):
        """Run the layer.

        Parameters
        ----------
        x : torch.Tensor
            Tokens [B, L, d_model].
        attn_mask : torch.Tensor
            [B, 1, 1, L], True where a key may be attended to.

        Returns
        -------
        torch.Tensor
            [B, L, d_model].
        """
        if self.norm_first:
            x = x + self.attn(self.ln1(x), attn_mask)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, attn_mask))
        return self.ln2(x + self.ff(x))


def _rename_legacy_gepc_keys(state_dict, prefix, *args) -> None:
    """mvc_query/mvc_W/mvc_bias (scGPT's name for the head) -> gepc_*, in place."""
    for key in [k for k in state_dict if k.startswith(prefix + "mvc_")]:
        state_dict[prefix + "gepc_" + key[len(prefix) + len("mvc_") :]] = state_dict.pop(key)


class CellTransformer(nn.Module):
    """The cell transformer: token embeddings, the encoder blocks, the cell read-out and the heads.

    Both heads (expression and GEPC) start at the mean expressed bin; an optional contrastive
    projection head (``contrastive_head_dim``) maps the cell embedding for the contrastive loss.
    Weights saved when the GEPC parameters were named ``mvc_*`` still load.

    Parameters
    ----------
    cfg : ModelConfig
        The architecture and the vocabulary's token ids and values.

    Attributes
    ----------
    cfg : ModelConfig
    vocab_sha256 : str or None
        The vocabulary the weights belong to, once known (``load_model`` sets it), so that cells
        tokenized with another vocabulary are refused.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # The vocabulary the weights belong to (its sha256), once known: load_model sets it, so
        # that cells tokenized with another vocabulary are refused.
        self.vocab_sha256: str | None = None
        d = cfg.d_model
        self.gene_emb = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)
        if cfg.value_encoder == "bins":
            # Rows 0..n_bins-1 are bins; row n_bins is <mask>, row n_bins+1 is <pad>.
            self.value_emb = nn.Embedding(cfg.n_bins + 2, d, padding_idx=cfg.n_bins + 1)
        else:
            self.value_enc = ContinuousValueEncoder(cfg)
        self.emb_norm = nn.LayerNorm(d)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        # Expression head (scGPT ExprDecoder): token output -> one value.
        self.expr_head = nn.Sequential(
            nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1)
        )
        # GEPC head (scGPT's MVCDecoder, "inner product"): value = W(query(gene)) . cell_emb.
        self.gepc_query = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())
        self.gepc_W = nn.Linear(d, self.cell_emb_dim, bias=False)
        # Both heads start at the mean expressed bin (n_bins / 2 = mean of 1..n_bins-1), not 0:
        # otherwise the first hundreds of steps only learn the output scale. (scGPT starts at 0
        # and has no GEPC bias; this is our one deviation, and it helps short runs most.)
        self.gepc_bias = nn.Parameter(torch.zeros(1))
        if cfg.contrastive_head_dim:
            self.contrastive_head = nn.Sequential(
                nn.Linear(self.cell_emb_dim, self.cell_emb_dim),
                nn.ReLU(),
                nn.Linear(self.cell_emb_dim, cfg.contrastive_head_dim),
            )
        # Weights saved when the GEPC parameters were named mvc_* still load.
        self._register_load_state_dict_pre_hook(_rename_legacy_gepc_keys)
        self.apply(self._init_weights)
        with torch.no_grad():
            self.expr_head[-1].bias.fill_(cfg.n_bins / 2)
            self.gepc_bias.fill_(cfg.n_bins / 2)

    @property
    def cell_emb_dim(self) -> int:
        """Width of the cell embedding: 2 * d_model for ``cls+mean``, else d_model."""
        return 2 * self.cfg.d_model if self.cfg.cell_emb_style == "cls+mean" else self.cfg.d_model

    @staticmethod
    def _init_weights(module):
        # nanoGPT/GPT-2 init; keeps the padding rows at zero.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def value_index(self, values: torch.Tensor) -> torch.Tensor:
        """Map stored values (bins, MASK_VALUE, PAD_VALUE) to rows of the value embedding.

        Parameters
        ----------
        values : torch.Tensor
            Token values.

        Returns
        -------
        torch.Tensor
            int64 rows: bins as themselves, ``<mask>`` n_bins, ``<pad>`` n_bins + 1.
        """
        cfg = self.cfg
        values = values.long()
        values = torch.where(values == cfg.mask_value, cfg.n_bins, values)
        return torch.where(values == cfg.pad_value, cfg.n_bins + 1, values)

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        padding_mask: torch.Tensor,
        all_genes: bool = False,
    ) -> dict:
        """Encode a batch of cells and run the heads.

        Parameters
        ----------
        gene_ids, values : torch.Tensor
            Tokens [B, L]; position 0 is ``<cls>``.
        padding_mask : torch.Tensor
            [B, L], True at padding.
        all_genes : bool, default False
            Add ``gepc_all_pred`` [B, n_genes]: the GEPC head on every vocabulary gene.

        Returns
        -------
        dict of str to torch.Tensor
            ``expr_pred`` and ``gepc_pred`` [B, L] (predicted bins per token), ``cell_emb``
            [B, cell_emb_dim], ``contrastive_z`` with a contrastive head, and ``gepc_all_pred``
            with ``all_genes``.
        """
        genes = self.gene_emb(gene_ids)
        if self.cfg.value_encoder == "bins":
            value = self.value_emb(self.value_index(values))
        else:
            value = self.value_enc(values)
        x = self.emb_dropout(self.emb_norm(genes + value))
        attn_mask = ~padding_mask[:, None, None, :]  # True = may attend
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.final_norm(x)
        cell_emb = self.read_cell(x, padding_mask)
        expr_pred = self.expr_head(x).squeeze(-1)
        query = self.gepc_query(genes)
        gepc_pred = (
            torch.bmm(self.gepc_W(query), cell_emb.unsqueeze(-1)).squeeze(-1) + self.gepc_bias
        )
        out = {"expr_pred": expr_pred, "gepc_pred": gepc_pred, "cell_emb": cell_emb}
        if self.cfg.contrastive_head_dim:
            out["contrastive_z"] = self.contrastive_head(cell_emb)
        if all_genes:
            out["gepc_all_pred"] = self.gepc_all_genes(cell_emb)
        return out

    def gepc_all_genes(self, cell_emb: torch.Tensor) -> torch.Tensor:
        """The GEPC head's prediction for every vocabulary gene, from the cell embedding alone.

        Parameters
        ----------
        cell_emb : torch.Tensor
            Cell embeddings [B, cell_emb_dim].

        Returns
        -------
        torch.Tensor
            [B, n_genes], for gene ids 0..n_genes-1 (``<cls>`` and ``<pad>``, the last two ids,
            left out).
        """
        query = self.gepc_query(self.gene_emb.weight[: self.cfg.vocab_size - 2])
        return cell_emb @ self.gepc_W(query).T + self.gepc_bias

    def read_cell(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """The cell embedding from the encoder output (see ``cell_emb_style``).

        Parameters
        ----------
        x : torch.Tensor
            Encoder output [B, L, d_model].
        padding_mask : torch.Tensor
            [B, L], True at padding.

        Returns
        -------
        torch.Tensor
            [B, cell_emb_dim]; a cell without gene tokens reads as zeros in the gene-token styles.
        """
        style = self.cfg.cell_emb_style
        if style == "cls":
            return x[:, 0]
        genes = (~padding_mask).to(x.dtype)
        genes[:, 0] = 0  # gene tokens only; a cell without any reads as zeros
        total = (x * genes.unsqueeze(-1)).sum(1)
        if style == "sum":
            # Like PCA scores (a sum over the cell's genes, not an average): dividing by each
            # cell's gene count would shrink cells with many genes towards the origin.
            return total / math.sqrt(self.cfg.vocab_size)
        mean = total / genes.sum(1, keepdim=True).clamp(min=1)
        return mean if style == "mean" else torch.cat([x[:, 0], mean], dim=1)

    def num_params(self, non_embedding: bool = True) -> int:
        """The number of parameters.

        Parameters
        ----------
        non_embedding : bool, default True
            Leave out the gene and (with the bins value encoder) value embeddings: lookups cost no
            FLOPs.

        Returns
        -------
        int
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:  # lookups cost no FLOPs
            n -= self.gene_emb.weight.numel()
            if self.cfg.value_encoder == "bins":
                n -= self.value_emb.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len):
        """Forward+backward FLOPs per token for a cell of ``seq_len`` tokens.

        nanoGPT / PaLM appendix B: 6N for the (non-embedding) weights plus 12 * layers * d_model *
        seq_len for attention.

        Parameters
        ----------
        seq_len : int or numpy.ndarray
            The cell's token count, or an array of cell lengths.

        Returns
        -------
        int or numpy.ndarray
            FLOPs per token, shaped as ``seq_len``.
        """
        cfg = self.cfg
        return 6 * self.num_params() + 12 * cfg.n_layers * cfg.d_model * seq_len


# Dense bf16 peak FLOP/s per GPU, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU, for MFU (PEAK_BF16_FLOPS, matched on the device name).

    Parameters
    ----------
    device : torch.device
        The device.

    Returns
    -------
    float or None
        None for a CPU or an unknown GPU (no MFU is reported).
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return flops
    return None


FUSED_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)


def attention_kernels(model: nn.Module, gene_ids, values, padding_mask, autocast=None) -> str:
    """Which SDPA implementation a forward pass of ``model`` runs on these inputs.

    The fused aten ops the dispatcher chose (flash, memory-efficient, cuDNN, or the CPU flash
    kernel), or "math" (the unfused fallback, which shows only as its matmuls and softmax). The
    model's mode (train/eval) is the caller's: dropout can change the dispatcher's choice. The
    pass runs with gradients, as in training.

    Parameters
    ----------
    model : torch.nn.Module
        The model (a CellTransformer).
    gene_ids, values, padding_mask : torch.Tensor
        A batch, as for ``CellTransformer.forward``.
    autocast : context manager or None, default None
        The autocast context to run it in (e.g. bf16); None for none.

    Returns
    -------
    str
        The fused ops, comma separated, or "math".
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with autocast or nullcontext(), Recorder() as recorder:  # with gradients: as in training
        model(gene_ids, values, padding_mask)
    return ",".join(sorted(recorder.ops & set(FUSED_ATTENTION_OPS))) or "math"


def count_params_text(model: nn.Module) -> str:
    """A model's parameter count for a log line, e.g. "1.23M" or "45.6k".

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    str
    """
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


__all__ = [
    "ModelConfig",
    "CellTransformer",
    "peak_flops",
    "count_params_text",
]
