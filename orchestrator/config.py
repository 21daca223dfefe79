"""The sweep file: axes (methods x sparsities x data fractions x seeds) and one block per stage.

`load_sweep_file` turns YAML into a frozen, validated `SweepConfig`, or raises `ConfigError` whose
message names every bad field by its path (`training.lr: Input should be greater than 0`).
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

import tasks
from methods import METHODS, DiscoveryConfig, TrainConfig, TransferConfig
from tasks.base import format_validation, parse_block
from common.config import Frozen, stable_hash


class ConfigError(ValueError):
    """A sweep file that cannot be run; the message says which field and what to do."""


class SourceTraining(TrainConfig):
    """Source-model training: the paper's AdamW 5e-4, batch 50, stopping once validation saturates."""

    lr: float = Field(5e-4, gt=0)
    epochs: int = Field(20, ge=1)
    target_val_acc: float | None = Field(0.999, gt=0, le=1)
    patience: int | None = Field(5, ge=1)


class DownstreamTraining(TrainConfig):
    """Downstream training: the paper's AdamW 2e-4, batch 50, 100 epochs, best epoch on validation."""

    lr: float = Field(2e-4, gt=0)
    epochs: int = Field(100, ge=1)


class Resources(Frozen):
    """What each trial gets, and how many run at once."""

    cpu: float = Field(1.0, gt=0, description="CPUs per trial; torch threads are pinned to this")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; 0.25 packs four trials on a GPU")
    max_concurrent: int | None = Field(None, ge=1, description="cap on trials running at once")
    mixed_precision: bool = Field(False, description="bfloat16 autocast for training on GPU (ignored on CPU)")


class Storage(Frozen):
    artifacts: str | None = Field(None, description="where source models and masks are cached; default OUT/artifacts")


TUNABLE = {
    "training.lr": float,
    "training.epochs": int,
    "training.weight_decay": float,
    "training.batch_size": int,
    "discovery.l0_lambda": float,
    "discovery.lr": float,
    "discovery.epochs": int,
}


class Tuning(Frozen):
    """`instill tune`: an Optuna search per method over these ranges, on the validation split.

    Float ranges are searched on a log scale, integer ranges uniformly. `discovery.*` is tuned for
    subtask_induction only, and the controls that reuse its mask (sampled, complement) inherit it.
    """

    budget: int = Field(8, ge=1, description="Optuna trials per method: the same effort for every method")
    data_fractions: tuple[float, ...] = Field((0.1,), min_length=1)
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    space: dict[str, tuple[float, float]] = {
        "training.lr": (1e-4, 1e-2),
        "training.epochs": (10, 100),
        "discovery.l0_lambda": (1e-8, 1e-5),
    }

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for key, (low, high) in v.items():
            if key not in TUNABLE:
                raise ValueError(f"cannot tune {key!r}; tunable fields: {', '.join(TUNABLE)}")
            if not 0 < low < high:
                raise ValueError(f"{key}: the range must satisfy 0 < low < high, got [{low}, {high}]")
        return v

    @field_validator("data_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= f <= 1.0 for f in v):
            raise ValueError(f"data_fractions must lie in [0, 1]; got {list(v)}")
        return v


_TASK_CACHE: dict[str, object] = {}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepConfig(Frozen):
    name: str = "sweep"
    plugins: tuple[str, ...] = Field(
        (), description="modules imported before validation, e.g. ones that register more methods or tasks"
    )
    task: SerializeAsAny[Frozen]
    model: SerializeAsAny[Frozen]
    source: SourceTraining = SourceTraining()
    discovery: DiscoveryConfig = DiscoveryConfig()
    transfer: TransferConfig = TransferConfig()
    training: DownstreamTraining = DownstreamTraining()
    resources: Resources = Resources()
    storage: Storage = Storage()
    max_failures: int = Field(1, ge=0, description="retries of a failing trial before it is recorded failed")
    tuning: Tuning = Tuning()
    method_overrides: dict[str, dict[str, float]] = Field(
        {}, description="per-method values of tunable fields, e.g. from `instill tune` (see --tuned)"
    )

    methods: tuple[str, ...] = Field(min_length=1)
    sparsities: tuple[float, ...] = (0.75,)
    data_fractions: tuple[float, ...] = Field(min_length=1)
    seeds: tuple[int, ...] = Field((0,), min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a usable name: use letters, digits, '_', '.', '-'")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [m for m in v if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; valid names: {', '.join(METHODS.names())}")
        return _unique(v, "methods")

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [s for s in v if not (math.isfinite(s) and 0.0 <= s < 1.0)]
        if bad:
            raise ValueError(f"sparsities must lie in [0, 1) (the fraction of masked weights set to 0); got {bad}")
        return _unique(v, "sparsities")

    @field_validator("data_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [f for f in v if not (math.isfinite(f) and 0.0 <= f <= 1.0)]
        if bad:
            raise ValueError(f"data_fractions must lie in [0, 1] (fractions of the downstream pool); got {bad}")
        return _unique(v, "data_fractions")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _unique(v, "seeds")

    @model_validator(mode="after")
    def _overrides(self):
        for method, values in self.method_overrides.items():
            if method not in self.methods:
                raise ValueError(f"method_overrides names {method!r}, which is not in methods {list(self.methods)}")
            bad = [k for k in values if k not in TUNABLE]
            if bad:
                raise ValueError(f"method_overrides.{method}: cannot set {bad}; settable fields: {', '.join(TUNABLE)}")
        return self

    def for_method(self, method: str) -> SweepConfig:
        """This sweep with `method`'s overrides applied. Discovery settings follow the method whose
        mask is used: subtask_induction's, for every method that uses a mask."""
        values = dict(self.method_overrides.get(method, {}))
        if METHODS.get(method).uses_mask:
            values = {k: v for k, v in values.items() if not k.startswith("discovery.")}
            values.update(
                {
                    k: v
                    for k, v in self.method_overrides.get("subtask_induction", {}).items()
                    if k.startswith("discovery.")
                }
            )
        if not values:
            return self
        blocks: dict[str, dict] = {}
        for path, value in values.items():
            block, field = path.split(".")
            blocks.setdefault(block, {})[field] = TUNABLE[path](value)
        updates = {b: getattr(self, b).model_validate({**getattr(self, b).canonical(), **f}) for b, f in blocks.items()}
        return self.model_copy(update=updates)

    @model_validator(mode="after")
    def _sparsities_needed(self):
        if any(METHODS.get(m).uses_mask for m in self.methods) and not self.sparsities:
            raise ValueError("sparsities is empty but a method needs a mask: give at least one sparsity")
        return self

    def build_task(self):
        """The task object for this sweep's task block (one per distinct block and process: building
        one may scan data directories, and it caches the data it generates)."""
        key = stable_hash(self.task.canonical())
        if key not in _TASK_CACHE:
            _TASK_CACHE[key] = tasks.TASKS.get(self.task.name)(self.task)
        return _TASK_CACHE[key]

    @property
    def config_hash(self) -> str:
        return stable_hash(self.canonical())


def _unique(values: tuple, field: str) -> tuple:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{field} lists {seen} more than once")
    return values


def load_sweep(raw: Any, source: str = "sweep") -> SweepConfig:
    """Validate a parsed sweep mapping. Raises ConfigError listing every problem by field path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    errors: list[str] = []
    data = dict(raw)
    plugins = data.get("plugins", ())
    if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) for p in plugins):
        errors.append("plugins: expected a list of module names, e.g. [my_lab.methods]")
    else:
        for module in plugins:
            try:
                importlib.import_module(module)
            except Exception as err:  # any import failure is the user's to fix; say which and why
                errors.append(f"plugins: cannot import {module!r}: {type(err).__name__}: {err}")
    for key, registry in (("task", tasks.TASKS), ("model", tasks.MODELS)):
        if key not in data:
            errors.append(f"{key}: missing; give a mapping with 'name' (one of: {', '.join(registry.names())})")
            continue
        try:
            data[key] = parse_block(registry, data[key], key)
        except ValueError as err:
            errors.append(str(err))
    if errors:
        # Still check the other fields, so one pass reports every problem: stand-ins replace the
        # blocks that failed (a bare Frozen() passes the field's type check).
        for key in ("task", "model"):
            if not isinstance(data.get(key), Frozen):
                data[key] = Frozen()
        try:
            SweepConfig(**data)
        except ValidationError as err:
            errors.append(format_validation(err))
    else:
        try:
            config = SweepConfig(**data)
        except ValidationError as err:
            errors.append(format_validation(err))
        else:
            try:
                task = config.build_task()
            except ValueError as err:  # e.g. a data directory that is missing or malformed
                errors.append(str(err))
                task = None
            try:
                if task is not None:
                    task.build_model(config.model)
            except ValueError as err:
                errors.append(f"model: {err}")
                task = None
            if task is not None:
                if not task.trains_on_zero and any(task.downstream_size(f) < 1 for f in config.data_fractions):
                    errors.append(
                        f"data_fractions: {list(config.data_fractions)} includes a budget of 0 training samples, "
                        f"and task {config.task.name!r} has nothing else to train on; use fractions > 0"
                    )
                else:
                    return config
    raise ConfigError(f"{source}: invalid sweep file\n  " + "\n  ".join("\n".join(errors).splitlines()))


def load_sweep_file(path: str | Path) -> SweepConfig:
    """Read and validate a YAML sweep file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file; pass the path of a YAML file such as configs/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    return load_sweep(raw, str(path))
