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
    training streams that an objective may consume beside `train` (e.g. cued images).

    An evaluation split whose name ends in `_val` is a validation split: drawn from its own stream,
    never from test images, so settings may be chosen on it (a method's epoch by `training.select:
    {split: NAME_val, label: L}`, a shape bias threshold); every other evaluation split is test data."""

    train: Split
    val: Split
    evals: dict[str, Split] = dataclasses.field(default_factory=dict)
    streams: dict[str, Split] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Token sequences `(B, T)` of ids in `[0, vocab_size)`, `T <= n_positions`.

    `labels_are_tokens`: label y is also the id of the token that spells it, so a model whose logits
    are over the vocabulary (a language-model head) is trained and scored on the labels as they are.
    `sequence_loss`: the task trains the next token at every position (`model(x, targets=y)`), which
    needs such a head."""

    vocab_size: int
    n_positions: int
    labels_are_tokens: bool = False
    sequence_loss: bool = False
    kind: ClassVar[str] = "tokens"

    def dims(self) -> dict[str, Any]:
        """The builder keywords of these inputs."""
        return {"vocab_size": self.vocab_size, "n_positions": self.n_positions,
                **({"sequence_loss": True} if self.sequence_loss else {})}  # fmt: skip

    def describe(self) -> str:
        return f"token sequences (vocabulary {self.vocab_size}, up to {self.n_positions} positions)"


@dataclasses.dataclass(frozen=True)
class Images:
    """Images `(B, channels, size, size)`, normalised floats."""

    size: int
    channels: int = 3
    kind: ClassVar[str] = "images"

    def dims(self) -> dict[str, Any]:
        """The builder keywords of these inputs (`channels` only where it is not 3, so builders
        written for RGB images need not take it)."""
        return {"image_size": self.size, **({"channels": self.channels} if self.channels != 3 else {})}

    def describe(self) -> str:
        return f"{self.channels}-channel images of {self.size}x{self.size} px"


INPUT_KINDS = ("tokens", "images")


@dataclasses.dataclass(frozen=True)
class Feeds:
    """What a task feeds a model (`inputs`) and expects back: logits over `n_classes` classes (read
    at argmax; a model with a vocabulary head returns logits over the vocabulary instead, which
    fits where `inputs.labels_are_tokens`). A model fits a task when it accepts `inputs.kind`."""

    inputs: Tokens | Images
    n_classes: int

    def dims(self) -> dict[str, Any]:
        """Every keyword a model builder gets: `n_classes` and the inputs' own."""
        return {"n_classes": self.n_classes, **self.inputs.dims()}


class Task(Protocol):
    """A task: data for the base, subtask and downstream stages, and a model factory.

    Seeds: `seed` is the trial's seed; tasks derive per-stage seeds from it (tasks.seeding).
    """

    name: ClassVar[str]
    Config: ClassVar[type[Frozen]]
    trains_on_zero: ClassVar[bool]  # whether data fraction 0 still leaves downstream training data
    default_analyses: ClassVar[tuple[str, ...]]  # analyses every trial of the task runs (by name)
    config: Frozen

    def base_data(self, seed: int) -> StageData: ...

    def subtask_data(self, seed: int) -> StageData: ...

    def downstream_data(self, seed: int, data_fraction: float) -> StageData: ...

    def downstream_size(self, data_fraction: float) -> int: ...

    def key_fields(self, stage: str) -> dict: ...

    def feeds(self) -> Feeds:
        """What the task feeds a model and expects back (see `Feeds`): any registered model that
        accepts it fits the task."""
        ...

    def build_model(self, model_config: Frozen) -> nn.Module:
        """Usually `build_model_for(self, model_config)`, after any check of the task's own."""
        ...


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
    """A registered model family: its config block, a builder `(config, **dims) -> nn.Module` (the
    keywords of `Feeds.dims()`), the input kinds it accepts (None: undeclared, the builder decides)
    and whether a config of it reads out logits over the vocabulary instead of the classes."""

    name: str
    Config: type[Frozen]
    build: Callable[..., nn.Module]
    accepts: tuple[str, ...] | None = None
    vocabulary_head: Callable[[Frozen], bool] = lambda config: False

    def fits(self, feeds: Feeds, config: Frozen | None = None) -> str | None:
        """None when the model fits a task feeding `feeds`, else why not (with `config`: its head too)."""
        inputs = feeds.inputs
        if self.accepts is not None and inputs.kind not in self.accepts:
            return f"it accepts {' or '.join(self.accepts)}, and the task feeds {inputs.describe()}"
        if config is None:
            return None
        vocabulary = self.vocabulary_head(config)
        if vocabulary and not getattr(inputs, "labels_are_tokens", False):
            return ("its head gives logits over the vocabulary, and the task's labels are not tokens of it; "
                    "use a model with a classes head")  # fmt: skip
        if getattr(inputs, "sequence_loss", False) and not vocabulary:
            return ("the task trains the next token at every position, which needs logits over the vocabulary; "
                    "use a model with a language-model head")  # fmt: skip
        return None


def require_rgb(model: str, channels: int) -> None:
    """For builders of models that read 3-channel images only: a clear error for other channels."""
    if channels != 3:
        raise ValueError(f"model {model!r} reads 3-channel images; the task feeds {channels}-channel ones")


def models_fitting(feeds: Feeds) -> list[str]:
    """Registered models that accept what a task feeds, in registration order."""
    return [name for name, spec in MODELS.items() if spec.fits(feeds) is None]


def build_model_for(task: Task, model_config: Frozen) -> nn.Module:
    """Build the registered model `model_config.name` for what `task.feeds()`, refusing a model that
    does not accept it (the error names the models that do)."""
    feeds = task.feeds()
    spec = MODELS.get(model_config.name)
    why = spec.fits(feeds, model_config)
    if why is not None:
        valid = ", ".join(models_fitting(feeds))
        raise ValueError(
            f"model {model_config.name!r} does not fit task {task.name!r}: {why}; models that accept "
            f"{feeds.inputs.kind}: {valid}"
        )
    return spec.build(model_config, **feeds.dims())


def register_model(
    name: str,
    config_cls: type[Frozen],
    *,
    accepts: tuple[str, ...] | None = None,
    vocabulary_head: Callable[[Frozen], bool] | None = None,
):
    """Decorator for a builder function `(config, **dims) -> nn.Module` (dims: `Feeds.dims()`, e.g.
    `n_classes, vocab_size, n_positions` or `n_classes, image_size`). `accepts`: the input kinds it
    takes (`("tokens",)`, `("images",)` or both); `vocabulary_head(config)`: whether that config
    reads out logits over the vocabulary (a language-model head) instead of the classes."""
    unknown = [kind for kind in accepts or () if kind not in INPUT_KINDS]
    if unknown:
        raise ValueError(f"model {name!r}: unknown input kinds {unknown}; use {', '.join(INPUT_KINDS)}")

    def add(fn):
        spec = ModelSpec(name, config_cls, fn, tuple(accepts) if accepts is not None else None,
                         vocabulary_head or (lambda config: False))  # fmt: skip
        MODELS.register(name)(spec)
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
