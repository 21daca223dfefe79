"""Methods that fail on purpose, for the failure-handling tests (loaded through `plugins:`)."""

import os
from pathlib import Path

import torch
from torch import nn

from methods.registry import MethodInputs, register_method


def _count_attempt(name: str) -> int:
    folder = os.environ.get("INSTILL_TEST_ATTEMPTS")
    if not folder:
        return 0
    path = Path(folder) / name
    with open(path, "a") as f:
        f.write("x")
    return len(path.read_text())


@register_method("explodes", uses_source=False, uses_mask=False, description="test: always raises")
def _explodes(inp: MethodInputs) -> nn.Module:
    _count_attempt("explodes")
    raise RuntimeError("deliberate failure for the test")


class _NaN(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * torch.tensor(float("nan"))


@register_method("goes_nan", uses_source=False, uses_mask=False, description="test: its loss is NaN")
def _goes_nan(inp: MethodInputs) -> nn.Module:
    return _NaN(inp.fresh)
