"""Methods that fail on purpose, for the failure-handling tests (loaded through `plugins:`)."""

import os
from pathlib import Path

import torch
from torch import nn

from methods.registry import MethodContext, register_method


def _count_attempt(name: str) -> int:
    folder = os.environ.get("INSTILL_TEST_ATTEMPTS")
    if not folder:
        return 0
    path = Path(folder) / name
    with open(path, "a") as f:
        f.write("x")
    return len(path.read_text())


@register_method("explodes", description="test: always raises")
def _explodes(ctx: MethodContext) -> nn.Module:
    _count_attempt("explodes")
    raise RuntimeError("deliberate failure for the test")


class _NaN(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, **kwargs):
        return self.inner(x, **kwargs) * torch.tensor(float("nan"))


@register_method("goes_nan", description="test: its loss is NaN")
def _goes_nan(ctx: MethodContext) -> nn.Module:
    return _NaN(ctx.fresh)
