"""Image classifiers for the shape-bias experiments: torchvision's ResNet-18 and VisionTransformer,
adapted to small images.

- `resnet18`: torchvision's ResNet with BasicBlocks [2, 2, 2, 2] and a 3x3, stride-1 stem without
  max-pool (the usual adaptation to 32-64 px images). `width: 64` is torchvision's ResNet-18 exactly
  (11.2M parameters); smaller widths scale every stage (`width: 16` for CPU runs).
- `vit`: torchvision's VisionTransformer with patch size 4.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.resnet import BasicBlock, ResNet

from tasks.base import register_model
from common.config import Frozen


class ResNet18Config(Frozen):
    name: Literal["resnet18"] = "resnet18"
    width: int = Field(64, ge=4, description="channels of the first stage; 64 is the standard ResNet-18")


class SmallImageResNet(ResNet):
    """torchvision's ResNet-18, stem adapted to small images, stage widths w, 2w, 4w, 8w."""

    head_name = "fc"

    def __init__(self, width: int, n_classes: int):
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes the ImageNet stem and widths
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
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


@register_model("resnet18", ResNet18Config)
def build_resnet18(cfg: ResNet18Config, *, n_classes: int, image_size: int, **_) -> nn.Module:
    return SmallImageResNet(cfg.width, n_classes)


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
    head_name = "heads"


@register_model("vit", ViTConfig)
def build_vit(cfg: ViTConfig, *, n_classes: int, image_size: int, **_) -> nn.Module:
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
