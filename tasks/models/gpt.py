"""A GPT-style causal transformer in plain torch (after nanoGPT), used for the arithmetic task.

The model knows nothing about training or masking. Its weight matrices are ordinary
`nn.Linear` / `nn.Embedding` parameters, so masks address them by name.

`model(tokens, intermediates=True)` also returns the named features of every stage (the residual
stream after the embedding and after each block, and the normed vector the head reads), so probes,
distillation and analyses need no hooks.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from common.config import Frozen
from tasks.base import register_model


class GPTConfig(Frozen):
    name: Literal["gpt"] = "gpt"
    n_layers: int = Field(2, ge=1, le=48)
    d_model: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    mlp_ratio: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token sequence (B, T) -> logits (B, n_classes) read at the last position.

    Features (`forward(..., intermediates=True)`): `embed` and `block{i}` are the residual stream
    (B, T, C); `final` is the normed last-position vector the head reads (B, C).
    """

    head_name = "head"
    penultimate = "final"  # the feature the head reads

    def __init__(self, cfg: GPTConfig, vocab_size: int, n_positions: int, n_classes: int):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(n_positions, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, n_classes)

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return ("embed", *(f"block{i}" for i in range(len(self.blocks))), "final")

    def forward(
        self, tokens: torch.Tensor, intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, n_classes); with `intermediates`, `(logits, features)` (see the class doc)."""
        features: dict[str, torch.Tensor] = {}
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))  # (B, T, C)
        features["embed"] = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            features[f"block{i}"] = x
        x = self.ln_f(x[:, -1])  # (B, C)
        features["final"] = x
        logits = self.head(x)
        return (logits, features) if intermediates else logits


@register_model("gpt", GPTConfig)
def build_gpt(cfg: GPTConfig, *, vocab_size: int, n_positions: int, n_classes: int) -> GPT:
    return GPT(cfg, vocab_size=vocab_size, n_positions=n_positions, n_classes=n_classes)
