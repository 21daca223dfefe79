"""A GPT-style causal transformer in plain torch (after nanoGPT), used for the arithmetic task.

The model knows nothing about training or masking. Its weight matrices are ordinary
`nn.Linear` / `nn.Embedding` parameters, so masks address them by name.

`model(tokens, intermediates=True)` also returns the named features of every stage (the residual
stream after the embedding and after each block, and the normed vector the head reads), so probes,
distillation and analyses need no hooks.

Settings that follow the paper's code (docs/PAPER-SETTINGS.md), defaults keeping the original model:
- `head`: `classes`, a linear head to the task's classes; `tied_lm`, GPT-2's language-model head
  tied to the token embedding: logits over the whole vocabulary, so a class label must be the id of
  the token that spells it (the task's encoding says so). Either head reads the last position.
- `init`: `torch`, each layer's default init; `gpt2`, GPT-2's N(0, 0.02) for embeddings and linear
  weights, zero biases, LayerNorm weight 1 and bias 0 (no extra scaling of residual projections).
  Part of the build, so every fresh model (source, transfer, scratch) gets it.
- `sequence_loss` (from the task, not the config): `model(tokens, targets=y)` returns the mean
  next-token cross-entropy over every position of `tokens ++ y` (`own_loss`), for an LM head only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from common.config import Frozen
from tasks.base import register_model
from tasks.models.dropout import modules_only


class GPTConfig(Frozen):
    name: Literal["gpt"] = "gpt"
    n_layers: int = Field(2, ge=1, le=48)
    d_model: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    mlp_ratio: int = Field(4, ge=1)
    head: Literal["classes", "tied_lm"] = Field(
        "classes", description="classes: a linear head to the classes; tied_lm: GPT-2's LM head tied to tok_emb"
    )
    init: Literal["torch", "gpt2"] = Field(
        "torch", description="torch: each layer's default init; gpt2: N(0, 0.02) weights, zero biases"
    )

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
        self.attn_drop = nn.Dropout(cfg.dropout)  # on the attention weights, inside dropout_through_modules()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.training and self.dropout > 0 and modules_only():
            y = self._attention_through_module(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))

    def _attention_through_module(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # What the fused kernel computes, with its dropout on the weights applied by `attn_drop`.
        T = q.shape[-2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        weights = weights.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        return self.attn_drop(weights) @ v


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


_NEEDS_LM_HEAD = "a next-token loss at every position needs model.head: tied_lm (logits over the vocabulary)"


class TiedHead(nn.Module):
    """GPT-2's LM head: logits = x @ tok_emb.weight.T, over the whole vocabulary, no bias.

    It holds no parameter: the matrix has one name, `tok_emb.weight` (role "embedding" for masks),
    and the embedding is referenced outside the module tree so that state dicts, masks, copies and
    `functional_call` (which swaps `tok_emb.weight`) all see one tensor used twice.
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._tied = (embedding,)  # a tuple, not a submodule: the weight must not get a second name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._tied[0].weight)


class GPT(nn.Module):
    """Token sequence (B, T) -> logits read at the last position: (B, n_classes) with the `classes`
    head, (B, vocab_size) with `tied_lm`.

    Features (`forward(..., intermediates=True)`): `embed` and `block{i}` are the residual stream
    (B, T, C); `final` is the normed last-position vector the head reads (B, C).
    """

    head_name = "head"
    penultimate = "final"  # the feature the head reads

    def __init__(self, cfg: GPTConfig, vocab_size: int, n_positions: int, n_classes: int, sequence_loss: bool = False):
        super().__init__()
        if sequence_loss and cfg.head != "tied_lm":
            raise ValueError(_NEEDS_LM_HEAD)
        self.cfg = cfg
        self.own_loss = sequence_loss  # forward(tokens, targets=y) -> (loss, measurements)
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(n_positions, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, n_classes) if cfg.head == "classes" else TiedHead(self.tok_emb)
        if cfg.init == "gpt2":
            self.apply(gpt2_init)

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return ("embed", *(f"block{i}" for i in range(len(self.blocks))), "final")

    def forward(
        self, tokens: torch.Tensor, intermediates: bool = False, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits; with `intermediates`, `(logits, features)` (see the class doc). With `targets`
        (B,), the next token after `tokens`: `(loss, measurements)`, the loss the mean cross-entropy
        of predicting token t + 1 at every position t of `tokens ++ targets` (`lm`; `ce` is the last
        position's alone). Needs the `tied_lm` head."""
        features: dict[str, torch.Tensor] = {}
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))  # (B, T, C)
        features["embed"] = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            features[f"block{i}"] = x
        if targets is not None:
            return self._sequence_loss(x, tokens, targets)
        x = self.ln_f(x[:, -1])  # (B, C)
        features["final"] = x
        logits = self.head(x)
        return (logits, features) if intermediates else logits

    def _sequence_loss(self, x: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor):
        if self.cfg.head != "tied_lm":
            raise ValueError(_NEEDS_LM_HEAD)
        logits = self.head(self.ln_f(x)).float()  # (B, T, vocab)
        following = torch.cat([tokens[:, 1:], targets[:, None]], dim=1)  # (B, T): the token after each position
        lm = F.cross_entropy(logits.flatten(0, 1), following.flatten())
        ce = F.cross_entropy(logits[:, -1].detach(), targets)
        return lm, {"lm": lm, "ce": ce}


@torch.no_grad()
def gpt2_init(module: nn.Module) -> None:
    """GPT-2's init (as Hugging Face's GPT2PreTrainedModel draws it, less its 1/sqrt(2 n_layers)
    scaling of residual projections): N(0, 0.02) for linear and embedding weights, zero biases,
    LayerNorm weight 1 and bias 0. Draws from torch's global RNG, like the default init."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


@register_model("gpt", GPTConfig, accepts=("tokens",), vocabulary_head=lambda cfg: cfg.head == "tied_lm")
def build_gpt(cfg: GPTConfig, *, vocab_size: int, n_positions: int, n_classes: int, sequence_loss: bool = False) -> GPT:
    return GPT(cfg, vocab_size=vocab_size, n_positions=n_positions, n_classes=n_classes, sequence_loss=sequence_loss)
