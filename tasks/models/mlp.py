"""A deep fully connected net (the "untrainable" target of representational guidance, seed 004),
for token tasks and image tasks alike.

- Tokens (B, T) of ints (arithmetic): each token is embedded (`nn.Embedding(vocab_size, embed_dim)`)
  and the embeddings are concatenated. The input width is `n_positions * embed_dim`; a shorter
  sequence is right-padded with zero vectors, which changes nothing (zero inputs add nothing to the
  first layer and give its columns no gradient). The arithmetic task passes `n_positions = 4` and
  feeds the three tokens [a, b, =].
- Images (B, C, H, W): flattened to `C * image_size**2` values (C = the task's channels, 3 by default).

Then `n_layers` hidden layers `Linear -> activation -> dropout` of `width` units and a linear head.
Deep and wide on images (e.g. 8 layers of 1024), it is the paper's untrainable fully connected
target: it fits the training images and generalises poorly.

`model(x, intermediates=True)` returns `(logits, features)`: `embed` is the flattened input of the
first layer (B, in_dim); `layer{i}` is hidden layer i after its activation (B, width); `final` is
what the head reads (the last hidden layer after dropout; the same values as `layer{n-1}` in eval
mode or without dropout).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from common.config import Frozen
from tasks.base import register_model

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPConfig(Frozen):
    name: Literal["mlp"] = "mlp"
    n_layers: int = Field(4, ge=1, description="hidden layers")
    width: int = Field(256, ge=1, description="units per hidden layer")
    embed_dim: int = Field(32, ge=1, description="token embedding size (token tasks only)")
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class MLP(nn.Module):
    """Tokens (B, T) or images (B, C, H, W) -> logits (B, n_classes). See the module doc."""

    head_name = "head"
    penultimate = "final"

    def __init__(
        self,
        cfg: MLPConfig,
        n_classes: int,
        vocab_size: int | None = None,
        n_positions: int | None = None,
        image_size: int | None = None,
        channels: int = 3,
    ):
        super().__init__()
        self.cfg = cfg
        if vocab_size is not None:
            self.embed = nn.Embedding(vocab_size, cfg.embed_dim)
            self.n_positions = n_positions
            in_dim = n_positions * cfg.embed_dim
        else:
            self.embed = None
            in_dim = channels * image_size * image_size
        self.in_dim = in_dim
        widths = [in_dim] + [cfg.width] * cfg.n_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.width, n_classes)
        # A module (no parameters), called once per hidden layer: its input is that layer's
        # pre-activation (what representational guidance aligns).
        self.act = _ACTIVATIONS[cfg.activation]()

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return ("embed", *(f"layer{i}" for i in range(len(self.layers))), "final")

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return x.flatten(1)  # (B, C H W)
        if x.shape[1] > self.n_positions:
            raise ValueError(f"mlp: got {x.shape[1]} tokens, built for at most n_positions = {self.n_positions}")
        e = self.embed(x).flatten(1)  # (B, T E)
        return F.pad(e, (0, self.in_dim - e.shape[1]))  # (B, n_positions E)

    def forward(
        self, x: torch.Tensor, intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, n_classes); with `intermediates`, `(logits, features)` (see the module doc)."""
        features: dict[str, torch.Tensor] = {}
        h = self._flat_input(x)
        features["embed"] = h
        for i, layer in enumerate(self.layers):
            a = self.act(layer(h))
            features[f"layer{i}"] = a
            h = self.drop(a)  # a fresh tensor, so the recorded activation is left as it was
        features["final"] = h
        logits = self.head(h)
        return (logits, features) if intermediates else logits


@register_model("mlp", MLPConfig, accepts=("tokens", "images"))
def build_mlp(
    cfg: MLPConfig,
    *,
    n_classes: int,
    vocab_size: int | None = None,
    n_positions: int | None = None,
    image_size: int | None = None,
    channels: int = 3,
    **_,
) -> MLP:
    if vocab_size is not None:
        if n_positions is None:
            raise ValueError("mlp: a token task must pass n_positions with vocab_size")
        return MLP(cfg, n_classes, vocab_size=vocab_size, n_positions=n_positions)
    if image_size is None:
        raise ValueError("mlp: the task passed neither vocab_size (tokens) nor image_size (images)")
    return MLP(cfg, n_classes, image_size=image_size, channels=channels)
