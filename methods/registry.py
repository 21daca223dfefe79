"""The method registry: how each compared method builds its model and what it trains it on.

A method declares
- `needs`: the upstream artifact kinds it consumes (`methods.artifacts.ARTIFACTS`: "source", "mask", ...);
  the orchestrator computes them once per key and hands them over in `ctx.artifacts`;
- `config`: its own typed config block, written in the sweep file under the method's name
  (`l2sp: {alpha: 0.01}`), validated there, tunable and sweepable by path (`l2sp.alpha`);
- `owns`: shared artifact settings (e.g. "discovery") that `instill tune` searches for this method;
  every method using that artifact inherits the tuned values;
- `reference`: whether it is the no-transfer reference that the report measures data savings against;
- `reads`: the sweep blocks besides task, model, training and its own that it reads (e.g.
  "transfer"): they enter its trials' identity, and they are all it can read (`ctx.block(name)`;
  an undeclared block raises `common.config.UndeclaredBlock` naming the declaration);
- `build(ctx) -> nn.Module`, and optionally `objective(ctx, model) -> Objective` (default:
  cross-entropy on the downstream training split, best epoch by validation accuracy);
- rarely, `train(ctx, model, generator, mixed_precision) -> TrainResult` (default: `fit` on
  `objective`), for several phases (probe, then fine-tune) or a closed-form fit. Every `fit` run in
  a trial is checkpointed (`methods.training.supervised`), so a `train` must call `fit` in the same
  order every time; training that does not go through `fit` is not checkpointed.

A simple method is one decorated function (its `build`); a method with its own objective is a
small class. Either is one file plus `@register_method(...)`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from common.config import Frozen
from common.registry import Registry
from methods.masking import complement, sample_like
from methods.training import Objective, TrainConfig, TrainResult, cross_entropy, fit
from methods.transfer import transfer
from tasks.base import StageData


@dataclasses.dataclass
class MethodContext:
    """Everything a method may draw on in one trial."""

    task: Any
    data: StageData  # the downstream data at this trial's budget
    config: Frozen | None  # the method's own block (None for methods without one)
    training: TrainConfig
    artifacts: dict[str, Any]  # kind -> loaded artifact (an nn.Module for "source", a Mask for "mask")
    generator: torch.Generator  # the method's own random stream (e.g. a sampled mask)
    device: torch.device
    fresh_model: Callable[[str], nn.Module]  # fresh_model(stage): a new model, init seeded by (seed, stage)
    settings: Any = None  # in a trial: the sweep as the method may read it (`common.config.Declared`)

    def block(self, name: str) -> Any:
        """The sweep block `name`, if the method may read it: declared in `reads`, its own, or task,
        model and training; otherwise `UndeclaredBlock` says which declaration to add."""
        if self.settings is None:
            raise ValueError("this MethodContext was built without the sweep's settings (settings=None)")
        return self.settings.block(name)

    @property
    def fresh(self) -> nn.Module:
        """A new model from the trial's downstream init seed (the same for every method)."""
        return self.fresh_model("init").to(self.device)

    def artifact(self, kind: str) -> Any:
        if kind not in self.artifacts:
            raise KeyError(f"artifact {kind!r} was not declared in the method's needs; it has {sorted(self.artifacts)}")
        return self.artifacts[kind]


class Method:
    """Base class of registered methods. Subclasses override `build` and, if they train
    differently, `objective`."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[Frozen] | None] = None
    reads: ClassVar[tuple[str, ...]] = ()
    owns: ClassVar[tuple[str, ...]] = ()
    reference: ClassVar[bool] = False
    description: ClassVar[str] = ""
    # Whether K trials of this method may train as one packed model (`methods.packing.fit_packed`):
    # its objective's loss reads only the batch and its module's own tensors (the default
    # cross-entropy), and `train` is one `fit` of `objective`.
    packable: ClassVar[bool] = False

    def build(self, ctx: MethodContext) -> nn.Module:
        raise NotImplementedError

    def objective(self, ctx: MethodContext, model: nn.Module) -> Objective:
        return cross_entropy(model, ctx.data, ctx.training.eval_batch_size)

    def train(
        self, ctx: MethodContext, model: nn.Module, generator: torch.Generator, mixed_precision: bool = False
    ) -> TrainResult:
        """Train `model` in place on the downstream data; the result's score is its validation accuracy."""
        return fit(self.objective(ctx, model), ctx.data, ctx.training, generator, mixed_precision=mixed_precision)


METHODS = Registry("method")


def register_method(
    name: str,
    *,
    needs: tuple[str, ...] = (),
    config: type[Frozen] | None = None,
    reads: tuple[str, ...] = (),
    owns: tuple[str, ...] = (),
    reference: bool = False,
    packable: bool = False,
    description: str,
):
    """Register a `Method` subclass, or a plain `build(ctx) -> nn.Module` function, under `name`."""

    def add(obj):
        if isinstance(obj, type) and issubclass(obj, Method):
            cls = obj
        elif callable(obj):
            build = staticmethod(lambda ctx, _fn=obj: _fn(ctx))
            # __module__: where the method is defined (its build function's module), not this one.
            cls = type(f"Method_{name}", (Method,), {"build": build, "__module__": obj.__module__})
        else:
            raise TypeError(f"register_method({name!r}) decorates a Method subclass or a build function")
        cls.name, cls.needs, cls.Config, cls.description = name, tuple(needs), config, description
        cls.reads, cls.owns, cls.reference, cls.packable = tuple(reads), tuple(owns), reference, packable
        METHODS.register(name)(cls())
        return obj

    return add


def get_method(name: str) -> Method:
    return METHODS.get(name)


# --- the built-in methods ----------------------------------------------------------------


@register_method("scratch", reference=True, packable=True, description="fresh model, nothing transferred")
def _scratch(ctx: MethodContext) -> nn.Module:
    return ctx.fresh


@register_method("full_transfer", needs=("source",), packable=True, description="the whole source model, fine-tuned")
def source_copy(ctx: MethodContext) -> nn.Module:
    """A trainable copy of the source: full_transfer's model, the start of every source fine-tuning."""
    return copy.deepcopy(ctx.artifact("source")).requires_grad_(True)


_SUBNET = {"needs": ("source", "mask"), "reads": ("transfer",), "packable": True}


@register_method(
    "subtask_induction",
    **_SUBNET,
    owns=("discovery",),
    description="the discovered subnetwork transferred into a fresh model",
)
def _subtask_induction(ctx: MethodContext) -> nn.Module:
    return transfer(ctx.artifact("source"), ctx.fresh, ctx.artifact("mask"), ctx.block("transfer"))


@register_method(
    "sampled_subnetwork",
    **_SUBNET,
    description="a uniformly random mask with as many ones as the discovered one, transferred the same way",
)
def _sampled(ctx: MethodContext) -> nn.Module:
    source, fresh = ctx.artifact("source"), ctx.fresh  # the fresh init before the mask's draw, as ever
    return transfer(source, fresh, sample_like(ctx.artifact("mask"), ctx.generator), ctx.block("transfer"))


@register_method(
    "complement_subnetwork", **_SUBNET, description="the discovered mask's complement, transferred the same way"
)
def _complement(ctx: MethodContext) -> nn.Module:
    return transfer(ctx.artifact("source"), ctx.fresh, complement(ctx.artifact("mask")), ctx.block("transfer"))


@register_method(
    "paper_sampled_subnetwork",
    **_SUBNET,
    description=(
        "the paper's code's sampled baseline, for reproducing its figure only: the complement of a random "
        "mask with |S| ones, i.e. almost the whole source network with |S| random weights re-initialised"
    ),
)
def _paper_sampled(ctx: MethodContext) -> nn.Module:
    mask = complement(sample_like(ctx.artifact("mask"), ctx.generator))
    return transfer(ctx.artifact("source"), ctx.fresh, mask, ctx.block("transfer"))
