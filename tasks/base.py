"""What a task provides, and the registries of tasks and models.

A task owns its data and its models. It knows nothing of masks, methods or Ray: methods consume
what it returns (tensors and modules), the orchestrator wires the two together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from pydantic import ValidationError
from torch import nn

from common.config import Frozen
from common.registry import Registry


@dataclasses.dataclass(frozen=True)
class Split:
    """Inputs and one or more label sets. `labels["y"]` is the target; others are alternative
    readings scored at evaluation (e.g. a competing rule that also fits the training data)."""

    x: torch.Tensor
    labels: dict[str, torch.Tensor]

    def __post_init__(self):
        for name, y in self.labels.items():
            if len(y) != len(self.x):
                raise ValueError(f"label set {name!r} has {len(y)} rows, inputs have {len(self.x)}")

    @property
    def y(self) -> torch.Tensor:
        return self.labels["y"]

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), {name: y.to(device) for name, y in self.labels.items()})

    def take(self, idx: torch.Tensor) -> Split:
        """The rows `idx` (an index tensor on the split's device)."""
        return Split(self.x[idx], {name: y[idx] for name, y in self.labels.items()})


@dataclasses.dataclass(frozen=True)
class StageData:
    """Train/validation data for one training stage, named evaluation splits, and extra named
    training streams that an objective may consume beside `train` (e.g. cued images)."""

    train: Split
    val: Split
    evals: dict[str, Split] = dataclasses.field(default_factory=dict)
    streams: dict[str, Split] = dataclasses.field(default_factory=dict)


class Task(Protocol):
    """A task: data for the base, subtask and downstream stages, and a model factory.

    Seeds: `seed` is the trial's seed; tasks derive per-stage seeds from it (tasks.seeding).
    """

    name: ClassVar[str]
    Config: ClassVar[type[Frozen]]
    supported_models: ClassVar[tuple[str, ...]]
    trains_on_zero: ClassVar[bool]  # whether data fraction 0 still leaves downstream training data
    default_analyses: ClassVar[tuple[str, ...]]  # analyses every trial of the task runs (by name)
    config: Frozen

    def base_data(self, seed: int) -> StageData: ...

    def subtask_data(self, seed: int) -> StageData: ...

    def downstream_data(self, seed: int, data_fraction: float) -> StageData: ...

    def downstream_size(self, data_fraction: float) -> int: ...

    def key_fields(self, stage: str) -> dict: ...

    def build_model(self, model_config: Frozen) -> nn.Module: ...


TASKS = Registry("task")
MODELS = Registry("model")


def register_task(name: str):
    """Class decorator: register a Task under `name`."""

    def add(cls):
        cls.name = name
        return TASKS.register(name)(cls)

    return add


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model family: its config block and a builder `(config, task) -> nn.Module`."""

    name: str
    Config: type[Frozen]
    build: Callable[..., nn.Module]


def build_model_for(task: Task, model_config: Frozen, **dims) -> nn.Module:
    """Build the registered model `model_config.name` with the task's dimensions, refusing models
    the task does not support."""
    if model_config.name not in task.supported_models:
        valid = ", ".join(task.supported_models)
        raise ValueError(f"model {model_config.name!r} does not fit task {task.name!r}; use one of: {valid}")
    return MODELS.get(model_config.name).build(model_config, **dims)


def register_model(name: str, config_cls: type[Frozen]):
    """Decorator for a builder function `(config, **task_dims) -> nn.Module`."""

    def add(fn):
        MODELS.register(name)(ModelSpec(name, config_cls, fn))
        return fn

    return add


def parse_block(registry: Registry, block: Any, where: str) -> Frozen:
    """Validate a `{name: ..., <fields>}` block against the config class registered under name.

    Raises ValueError whose lines each name a field path (`where.field`) and what is wrong.
    """
    if not isinstance(block, dict) or "name" not in block:
        raise ValueError(f"{where}: expected a mapping with a 'name' key; valid names: {', '.join(registry.names())}")
    try:
        entry = registry.get(block["name"])
    except KeyError as err:
        raise ValueError(f"{where}.name: {err.args[0]}") from None
    try:
        return entry.Config(**block)
    except ValidationError as err:
        raise ValueError(format_validation(err, where)) from None


def format_validation(err: ValidationError, where: str = "") -> str:
    """One line per error: `path.to.field: message`."""
    lines = []
    for e in err.errors():
        path = ".".join(p for p in [where, *map(str, e["loc"])] if p)
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {msg}" if path else msg)
    return "\n".join(lines)
