"""An scGPT-style cell transformer, written nanoGPT-style: read it top to bottom.

A cell is a set of (gene id, expression bin) tokens, led by ``<cls>``. The encoder sees
gene embedding + value embedding and no positional information (a cell's genes have no order).
Two heads predict the bins of masked tokens:

- the expression head reads each token's own output;
- the GEPC/MVC head (scGPT's "inner product" MVCDecoder) predicts a gene's bin from the cell
  embedding alone (the ``<cls>`` output), so the cell embedding must summarise the whole cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int  # genes + <cls> + <pad>
    n_bins: int = 51  # bins 0..n_bins-1 (0 = not expressed, also the <cls> value)
    n_layers: int = 12
    n_heads: int = 8
    d_model: int = 512
    d_ff: int = 512
    dropout: float = 0.2
    pad_id: int | None = None  # defaults to the last vocabulary entry (<pad>)
    mask_value: int = -1
    pad_value: int = -2
    norm_first: bool = True  # pre-norm (nanoGPT, more stable); False = post-norm as in scGPT
    # Dropout on attention weights; None = ``dropout`` (as scGPT). On CPU any value > 0 makes
    # SDPA fall back to its unfused kernel (about 8x slower at 800 tokens): use 0 for CPU demos.
    attn_dropout: float | None = None

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = self.vocab_size - 1
        if self.attn_dropout is None:
            self.attn_dropout = self.dropout
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} is outside the vocabulary (size {self.vocab_size})")


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # attn_mask [B, 1, 1, L] hides padding keys only. Every query (pads included) still sees
        # <cls>, so no softmax row is empty (an all-masked row would give NaN).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, L, D)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.out(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg)

    def forward(self, x, attn_mask):
        if self.norm_first:
            x = x + self.attn(self.ln1(x), attn_mask)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, attn_mask))
        return self.ln2(x + self.ff(x))


class CellTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.gene_emb = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)
        # Rows 0..n_bins-1 are bins; row n_bins is <mask>, row n_bins+1 is <pad>.
        self.value_emb = nn.Embedding(cfg.n_bins + 2, d, padding_idx=cfg.n_bins + 1)
        self.emb_norm = nn.LayerNorm(d)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d) if cfg.norm_first else nn.Identity()
        # Expression head (scGPT ExprDecoder): token output -> one value.
        self.expr_head = nn.Sequential(
            nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1)
        )
        # GEPC/MVC head (scGPT MVCDecoder, "inner product"): value = W(query(gene)) . cell_emb.
        self.mvc_query = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())
        self.mvc_W = nn.Linear(d, d, bias=False)
        # Both heads start at the mean expressed bin (n_bins / 2 = mean of 1..n_bins-1), not 0:
        # otherwise the first hundreds of steps only learn the output scale. (scGPT starts at 0
        # and has no GEPC bias; this is our one deviation, and it helps short runs most.)
        self.mvc_bias = nn.Parameter(torch.zeros(1))
        self.apply(self._init_weights)
        with torch.no_grad():
            self.expr_head[-1].bias.fill_(cfg.n_bins / 2)
            self.mvc_bias.fill_(cfg.n_bins / 2)

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
        """Map stored values (bins, MASK_VALUE, PAD_VALUE) to rows of the value embedding."""
        cfg = self.cfg
        values = values.long()
        values = torch.where(values == cfg.mask_value, cfg.n_bins, values)
        return torch.where(values == cfg.pad_value, cfg.n_bins + 1, values)

    def forward(self, gene_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> dict:
        """gene_ids, values [B, L] (position 0 is <cls>); padding_mask [B, L], True at padding."""
        genes = self.gene_emb(gene_ids)
        x = self.emb_norm(genes + self.value_emb(self.value_index(values)))
        x = self.emb_dropout(x)
        attn_mask = ~padding_mask[:, None, None, :]  # True = may attend
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.final_norm(x)
        cell_emb = x[:, 0]
        expr_pred = self.expr_head(x).squeeze(-1)
        query = self.mvc_query(genes)
        mvc_pred = torch.bmm(self.mvc_W(query), cell_emb.unsqueeze(-1)).squeeze(-1) + self.mvc_bias
        return {"expr_pred": expr_pred, "mvc_pred": mvc_pred, "cell_emb": cell_emb}

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:  # lookups cost no FLOPs
            n -= self.gene_emb.weight.numel() + self.value_emb.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len):
        """Forward+backward FLOPs per token for a cell of ``seq_len`` tokens (nanoGPT / PaLM
        appendix B: 6N for the weights plus 12 * layers * d_model * seq_len for attention).
        ``seq_len`` may be a numpy array of cell lengths."""
        cfg = self.cfg
        return 6 * self.num_params() + 12 * cfg.n_layers * cfg.d_model * seq_len


# Dense bf16 peak FLOP/s per GPU, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return flops
    return None


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the positions where ``mask`` is True (0 if there are none).

    Written with ``where`` rather than boolean indexing: indexing has a data-dependent size, so
    on a GPU it makes the CPU wait for the device twice per step and stops it queueing work ahead.
    """
    squared = torch.where(mask, (pred.float() - target.float()).square(), 0.0)
    return squared.sum() / mask.sum().clamp(min=1)


def count_params_text(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


__all__ = ["ModelConfig", "CellTransformer", "masked_mse", "peak_flops", "count_params_text"]
