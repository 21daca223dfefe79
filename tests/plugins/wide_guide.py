"""A test-only artifact kind that declares an axis of its own (`wide_guide.width`) which one
computation serves at once (`shares=`), with a shorthand (`widths: [..]`), and a method that needs
it: loaded through `plugins:`, with no change to the orchestrator."""

import torch
from pydantic import Field

from common.config import Frozen
from methods.artifacts import ArtifactKind, register_artifact
from methods.registry import MethodContext, register_method


class WideGuideConfig(Frozen):
    width: int = Field(8, ge=1)
    scale: float = Field(1.0, gt=0)


@register_artifact(
    "wide_guide",
    needs=("source",),
    config=WideGuideConfig,
    axes=("wide_guide.width",),
    shares=("wide_guide.width",),
    shorthand={"widths": "wide_guide.width"},
)
class WideGuide(ArtifactKind):
    reported = ("wide_guide_width",)

    def key(self, ctx):  # the store adds the kind's block, width included
        return {"source": ctx.key_of("source")}

    def compute(self, ctx):
        return self.compute_many([ctx])[0]

    def compute_many(self, contexts):
        """Every width from one pass over the source (as one discovery run serves every sparsity)."""
        total = sum(float(p.detach().sum()) for p in contexts[0].get("source").parameters())
        configs = [ctx.settings.wide_guide for ctx in contexts]
        meta = [{"width": cfg.width, "served": len(contexts)} for cfg in configs]
        return [({"w": torch.full((cfg.width,), total * cfg.scale)}, m) for cfg, m in zip(configs, meta, strict=True)]

    def load(self, ctx, tensors, meta):
        return tensors["w"]

    def columns(self, meta):
        return {"wide_guide_width": meta["width"], "wide_guide_served": meta["served"]}


@register_method("uses_wide_guide", needs=("wide_guide",), description="test: a fresh model beside the guide")
def _uses_wide_guide(ctx: MethodContext):
    assert ctx.artifact("wide_guide").ndim == 1
    return ctx.fresh
