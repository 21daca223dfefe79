"""The method registry: how each compared method builds the model it then trains downstream.

A method declares what upstream work it needs (`uses_source`, `uses_mask`); the orchestrator
fetches that work from its artifact store and never runs a method along an axis it ignores
(a method without a mask does not depend on sparsity).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from methods.masking import Mask, complement, sample_like
from methods.transfer import TransferConfig, transfer
from common.registry import Registry


@dataclasses.dataclass
class MethodInputs:
    """What a method may draw on. `fresh` is a new model from the trial's init seed."""

    fresh: nn.Module
    source: nn.Module | None
    mask: Mask | None
    transfer: TransferConfig
    generator: torch.Generator  # the method's own random stream (e.g. a sampled mask)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[MethodInputs], nn.Module]
    uses_source: bool
    uses_mask: bool
    description: str


METHODS = Registry("method")


def register_method(name: str, *, uses_source: bool, uses_mask: bool, description: str):
    """Decorator for `build(inputs) -> nn.Module`; a new method is one function and this line."""
    if uses_mask and not uses_source:
        raise ValueError(f"method {name!r}: a mask is found in a source model, so uses_mask needs uses_source")

    def add(fn):
        METHODS.register(name)(Method(name, fn, uses_source, uses_mask, description))
        return fn

    return add


def get_method(name: str) -> Method:
    return METHODS.get(name)


@register_method("scratch", uses_source=False, uses_mask=False, description="fresh model, nothing transferred")
def _scratch(inp: MethodInputs) -> nn.Module:
    return inp.fresh


@register_method("full_transfer", uses_source=True, uses_mask=False, description="the whole source model, fine-tuned")
def _full_transfer(inp: MethodInputs) -> nn.Module:
    model = copy.deepcopy(inp.source)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@register_method(
    "subtask_induction",
    uses_source=True,
    uses_mask=True,
    description="the discovered subnetwork transferred into a fresh model",
)
def _subtask_induction(inp: MethodInputs) -> nn.Module:
    return transfer(inp.source, inp.fresh, inp.mask, inp.transfer)


@register_method(
    "sampled_subnetwork",
    uses_source=True,
    uses_mask=True,
    description="a uniformly random mask with as many ones as the discovered one, transferred the same way",
)
def _sampled(inp: MethodInputs) -> nn.Module:
    return transfer(inp.source, inp.fresh, sample_like(inp.mask, inp.generator), inp.transfer)


@register_method(
    "complement_subnetwork",
    uses_source=True,
    uses_mask=True,
    description="the discovered mask's complement, transferred the same way",
)
def _complement(inp: MethodInputs) -> nn.Module:
    return transfer(inp.source, inp.fresh, complement(inp.mask), inp.transfer)


@register_method(
    "paper_sampled_subnetwork",
    uses_source=True,
    uses_mask=True,
    description=(
        "the paper's code's sampled baseline, for reproducing its figure only: the complement of a random "
        "mask with |S| ones, i.e. almost the whole source network with |S| random weights re-initialised"
    ),
)
def _paper_sampled(inp: MethodInputs) -> nn.Module:
    return transfer(inp.source, inp.fresh, complement(sample_like(inp.mask, inp.generator)), inp.transfer)
