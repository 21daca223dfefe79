"""A test-only artifact kind with a settings block of its own (a stand-in for a guide network), and
a method that needs it: loaded through `plugins:`."""

import torch
from pydantic import Field
from torch import nn

from common.config import Frozen
from methods.artifacts import ArtifactKind, register_artifact
from methods.registry import MethodContext, register_method


class ProbeGuideConfig(Frozen):
    scale: float = Field(1.0, gt=0)


@register_artifact("probe_guide", needs=("source",), config=ProbeGuideConfig)
class ProbeGuide(ArtifactKind):
    def key(self, ctx):
        return {"source": ctx.key_of("source"), "guide": ctx.settings.block("probe_guide").canonical()}

    def compute(self, ctx):
        scale = ctx.settings.block("probe_guide").scale
        weights = {n: p.detach() * scale for n, p in ctx.get("source").state_dict().items()}
        return weights, {"scale": scale}

    def load(self, ctx, tensors, meta):
        model = ctx.fresh_model("guide")
        model.load_state_dict(tensors)
        return model

    def columns(self, meta):
        return {"probe_guide_scale": meta["scale"]}


@register_method("uses_guide", needs=("probe_guide",), description="test: the guide's weights, fine-tuned")
def _uses_guide(ctx: MethodContext) -> nn.Module:
    model = ctx.artifact("probe_guide")
    assert isinstance(model, nn.Module) and not isinstance(model, torch.Tensor)
    return model
