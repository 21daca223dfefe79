"""Any torchvision classification architecture by name, with optional local weights.

`model: {name: torchvision, arch: resnet18}` builds `torchvision.models.get_model("resnet18",
weights=None, num_classes=<the task's>)`; `weights: PATH` first loads a state dict of that
architecture from a local file (safetensors, or a `torch.save`d state dict read with
`weights_only=True`; e.g. torchvision's ImageNet weights saved beforehand) and, where its classifier
has another number of classes than the task, replaces the classifier's last linear layer with a
fresh one (drawn from the trial's seeded init). Nothing is downloaded.

Instill's model API over an unmodified torchvision model: the head (`head_name`) is its last
`nn.Linear` (`fc`, `classifier.6`, `heads.head`, ...); `model(x, intermediates=True)` returns
`(logits, features)` with the output of every top-level child holding parameters before the head
(`conv1`, `bn1`, `layer1`..`layer4` for a ResNet; `features` for VGG; ...), read by forward hooks and
cloned (torchvision's in-place activations would otherwise overwrite them), and `final`, the vector
the head reads (`penultimate`). Masks address the architecture's own parameter names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from common.config import Frozen
from tasks.base import register_model


def _classifiers() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


class TorchvisionConfig(Frozen):
    name: Literal["torchvision"] = "torchvision"
    arch: str = Field("resnet18", description="a torchvision classifier (torchvision.models.list_models)")
    weights: str | None = Field(None, description="a local state dict of arch (safetensors or torch.save)")

    @field_validator("arch")
    @classmethod
    def _known(cls, v: str) -> str:
        valid = _classifiers()
        if v not in valid:
            raise ValueError(f"unknown torchvision classification model {v!r}; valid names: {', '.join(valid)}")
        return v


def _last_linear(model: nn.Module) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier, so Instill cannot find its head")
    return names[-1]


def _read_state(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"model.weights: {file} is not a file (a local state dict; nothing is downloaded)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class TorchvisionModel(nn.Module):
    """A torchvision classifier (`self.net`) behind Instill's model API; see the module doc."""

    penultimate = "final"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.head_name = f"net.{_last_linear(net)}"
        head_top = _last_linear(net).split(".")[0]
        self._recorded = tuple(
            name for name, child in net.named_children() if name != head_top and any(True for _ in child.parameters())
        )

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return (*self._recorded, "final")

    def forward(
        self, x: torch.Tensor, intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, n_classes); with `intermediates`, `(logits, features)` (see the module doc)."""
        if not intermediates:
            return self.net(x)
        features: dict[str, torch.Tensor] = {}
        children = dict(self.net.named_children())
        heads = dict(self.named_modules())

        def record(name):
            return lambda module, args, output: features.__setitem__(name, output.clone())

        handles = [children[name].register_forward_hook(record(name)) for name in self._recorded]
        handles.append(heads[self.head_name].register_forward_pre_hook(
            lambda module, args: features.__setitem__("final", args[0])))  # fmt: skip
        try:
            logits = self.net(x)
        finally:
            for handle in handles:
                handle.remove()
        return logits, {name: features[name] for name in self.feature_names()}


@register_model("torchvision", TorchvisionConfig, accepts=("images",))
def build_torchvision(cfg: TorchvisionConfig, *, n_classes: int, image_size: int, channels: int = 3, **_) -> nn.Module:
    from torchvision.models import get_model

    if channels != 3:
        raise ValueError(f"torchvision architectures read 3-channel images; the task feeds {channels}-channel ones")
    extra = {"image_size": image_size} if cfg.arch.startswith("vit_") else {}
    if cfg.weights is None:
        return TorchvisionModel(get_model(cfg.arch, weights=None, num_classes=n_classes, **extra))
    state = _read_state(cfg.weights)
    probe = get_model(cfg.arch, weights=None, num_classes=n_classes, **extra)
    head = _last_linear(probe)
    if f"{head}.weight" not in state:
        raise ValueError(f"model.weights: {cfg.weights} has no {head}.weight; is it a state dict of {cfg.arch}?")
    stored = state[f"{head}.weight"].shape[0]
    net = probe if stored == n_classes else get_model(cfg.arch, weights=None, num_classes=stored, **extra)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"model.weights: {cfg.weights} does not fit torchvision's {cfg.arch}: {err}") from None
    if stored != n_classes:  # a new classifier for the task's classes
        parent_name, _, attr = head.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        old = getattr(parent, attr)
        setattr(parent, attr, nn.Linear(old.in_features, n_classes))
    return TorchvisionModel(net)
