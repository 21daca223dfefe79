"""Image classifiers for the shape-bias experiments: torchvision's ResNet-18 and VisionTransformer,
adapted to small images.

- `resnet18`: torchvision's ResNet with BasicBlocks [2, 2, 2, 2] and a 3x3, stride-1 stem without
  max-pool (the usual adaptation to 32-64 px images). `width: 64` is torchvision's ResNet-18 exactly
  (11.2M parameters); smaller widths scale every stage (`width: 16` for CPU runs).
- `vit`: torchvision's VisionTransformer with patch size 4.

Both keep torchvision's modules and weight names and add one thing: `model(x, intermediates=True)`
returns `(logits, features)`, the named output of every stage (`feature_names()`), with
`penultimate` naming the feature the head reads. The forward passes run the very same modules in
the same order as torchvision's, so the logits are bit-identical either way.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.resnet import BasicBlock, ResNet

from common.config import Frozen
from tasks.base import register_model, require_rgb


class ResNet18Config(Frozen):
    name: Literal["resnet18"] = "resnet18"
    width: int = Field(64, ge=4, description="channels of the first stage; 64 is the standard ResNet-18")


class SmallImageResNet(ResNet):
    """torchvision's ResNet-18, stem adapted to small images, stage widths w, 2w, 4w, 8w.

    Features: `stem` and `layer1`..`layer4` are feature maps (B, C_i, H_i, W_i); `pool` is the
    pooled vector the head reads (B, 8w).
    """

    head_name = "fc"
    penultimate = "pool"

    def __init__(self, width: int, n_classes: int, channels: int = 3):
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes the ImageNet stem and widths
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, n_classes)
        for m in self.modules():  # torchvision's own initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

    def forward(
        self, x: torch.Tensor, intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, n_classes); with `intermediates`, `(logits, features)`. The same steps as
        torchvision's `ResNet._forward_impl`, recording each stage's output."""
        features: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features["stem"] = x
        for name in ("layer1", "layer2", "layer3", "layer4"):
            # No block writes into its input in place, so the recorded maps stay as they are.
            x = getattr(self, name)(x)
            features[name] = x
        x = torch.flatten(self.avgpool(x), 1)  # (B, 8w)
        features["pool"] = x
        logits = self.fc(x)
        return (logits, features) if intermediates else logits


@register_model("resnet18", ResNet18Config, accepts=("images",))
def build_resnet18(cfg: ResNet18Config, *, n_classes: int, image_size: int, channels: int = 3, **_) -> nn.Module:
    return SmallImageResNet(cfg.width, n_classes, channels)


class ViTConfig(Frozen):
    name: Literal["vit"] = "vit"
    patch_size: int = Field(4, ge=1)
    n_layers: int = Field(6, ge=1)
    n_heads: int = Field(4, ge=1)
    hidden_dim: int = Field(128, ge=8)
    mlp_dim: int = Field(256, ge=8)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_dim % self.n_heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by n_heads ({self.n_heads})")
        return self


class SmallViT(VisionTransformer):
    """torchvision's VisionTransformer.

    Features: `embed` (the token sequence with class token and position embedding, before the first
    block) and `block{i}` are (B, 1 + patches, D); `final` is the class token after the final
    norm (B, D), what the head reads.
    """

    head_name = "heads"
    penultimate = "final"

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return ("embed", *(f"block{i}" for i in range(len(self.encoder.layers))), "final")

    def forward(
        self, x: torch.Tensor, intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, n_classes); with `intermediates`, `(logits, features)`. The same steps as
        torchvision's `VisionTransformer.forward` and `Encoder.forward`, recording each block."""
        features: dict[str, torch.Tensor] = {}
        x = self._process_input(x)  # (B, patches, D)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        encoder = self.encoder
        x = encoder.dropout(x + encoder.pos_embedding)
        features["embed"] = x
        for i, layer in enumerate(encoder.layers):
            x = layer(x)
            features[f"block{i}"] = x
        # Norm the whole sequence as torchvision does, then read the class token.
        x = encoder.ln(x)[:, 0]  # (B, D)
        features["final"] = x
        logits = self.heads(x)
        return (logits, features) if intermediates else logits


@register_model("vit", ViTConfig, accepts=("images",))
def build_vit(cfg: ViTConfig, *, n_classes: int, image_size: int, channels: int = 3, **_) -> nn.Module:
    require_rgb("vit", channels)
    if image_size % cfg.patch_size:
        raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({cfg.patch_size})")
    return SmallViT(
        image_size=image_size,
        patch_size=cfg.patch_size,
        num_layers=cfg.n_layers,
        num_heads=cfg.n_heads,
        hidden_dim=cfg.hidden_dim,
        mlp_dim=cfg.mlp_dim,
        dropout=cfg.dropout,
        num_classes=n_classes,
    )
