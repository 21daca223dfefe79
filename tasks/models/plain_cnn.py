"""A plain CNN without skip connections (a target of representational guidance, seed 004), for
image tasks.

`n_blocks` blocks of `Conv3x3(width) -> BatchNorm -> ReLU` (`norm: none`: `Conv3x3(width, bias)
-> ReLU`), every block after the first followed by a 2x2 max-pool while the map is still larger than
4 px; then global average pooling and a linear head `fc`. The width stays the same in every block
(a small net for CPU runs; the paper's deep plain CNN is far larger). Deep and without
normalisation it is the paper's untrainable plain CNN: without skips or normalisation the signal
and the gradients of a deep ReLU stack degrade and it underfits.

`model(x, intermediates=True)` returns `(logits, features)`: `block{i}` is block i's output map
(B, width, H_i, W_i); `pool` is the pooled vector the head reads (B, width).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from common.config import Frozen
from tasks.base import register_model

MIN_POOLED_SIZE = 4  # no max-pool once the map is this small


class PlainCNNConfig(Frozen):
    name: Literal["plain_cnn"] = "plain_cnn"
    n_blocks: int = Field(4, ge=1)
    width: int = Field(32, ge=1, description="channels of every block")
    norm: Literal["batch", "none"] = Field("batch", description="batch norm after every conv, or none")


class PlainCNN(nn.Module):
    """Images (B, 3, H, W) -> logits (B, n_classes). See the module doc."""

    head_name = "fc"
    penultimate = "pool"

    def __init__(self, cfg: PlainCNNConfig, n_classes: int, image_size: int, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        blocks, size, channels = [], image_size, in_channels
        for i in range(cfg.n_blocks):
            if cfg.norm == "batch":  # BN has the bias
                layers: list[nn.Module] = [
                    nn.Conv2d(channels, cfg.width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(cfg.width),
                ]
            else:
                layers = [nn.Conv2d(channels, cfg.width, kernel_size=3, padding=1)]
            layers.append(nn.ReLU())
            if i > 0 and size > MIN_POOLED_SIZE:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            blocks.append(nn.Sequential(*layers))
            channels = cfg.width
        self.blocks = nn.ModuleList(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cfg.width, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return (*(f"block{i}" for i in range(len(self.blocks))), "pool")

    def forward(
        self, x: torch.Tensor, intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, n_classes); with `intermediates`, `(logits, features)` (see the module doc)."""
        features: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            features[f"block{i}"] = x
        x = torch.flatten(self.avgpool(x), 1)  # (B, width)
        features["pool"] = x
        logits = self.fc(x)
        return (logits, features) if intermediates else logits


@register_model("plain_cnn", PlainCNNConfig, accepts=("images",))
def build_plain_cnn(
    cfg: PlainCNNConfig, *, n_classes: int, image_size: int | None = None, channels: int = 3, **_
) -> PlainCNN:
    if image_size is None:
        raise ValueError("plain_cnn is an image model; the task passed no image_size")
    return PlainCNN(cfg, n_classes, image_size, in_channels=channels)
