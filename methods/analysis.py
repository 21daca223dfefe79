"""Analyses: measurements of a trained model, run after training, as plug-ins.

A registered analysis has a name, the artifact kinds it needs (e.g. "source"), an optional typed
config block (its parameters in the sweep file: `{name: lmc_barrier, points: 11}`), the sweep blocks
it reads besides task, model and training (`reads=`: in the identity of the trials that run it, and
all `ctx.block(name)` gives it), and the output columns it declares: dtype, and whether the report
summarises it. Every column it returns starts with its name; a declared column ending in `*` stands
for a family (`splits_*`). The trial checks what an analysis returns against what it declared.

A new analysis is one file with a function `(ctx, model, config) -> dict[str, value]` under
`@register_analysis(...)`, plus its import (in `methods/analyses/__init__.py`, or a sweep's `plugins:`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common.config import Frozen
from common.registry import Registry
from tasks.base import StageData


@dataclasses.dataclass(frozen=True)
class Profile:
    """How the report draws a column family as profiles: the value against a position (e.g. depth),
    one panel per line (e.g. an input feature), one curve per series at its largest budget.

    `split(column)` gives (position, line) for a column of the family; `order` names a string column
    of the same analysis holding the positions in order, comma-separated (the order is the model's,
    known only when the analysis runs)."""

    split: Callable[[str], tuple[str, str]]
    order: str
    xlabel: str = ""
    ylabel: str = ""


@dataclasses.dataclass(frozen=True)
class Column:
    dtype: str = "float64"  # a pyarrow/pandas dtype name
    summarise: bool = True  # whether the report gives mean, std and CI of it
    plot: bool = False  # whether the report draws its curve against the budget (one figure per column)
    description: str = ""
    profile: Profile | None = None  # whether (and how) the report draws the family as profiles
    bounds: tuple[float, float] | None = None  # the range the value can take (e.g. (0, 1) for a share):
    # the report keeps its intervals inside it (accuracies, columns named `*acc`, are kept in [0, 1] anyway)


@dataclasses.dataclass
class AnalysisContext:
    """What an analysis may draw on: the trial's task, data, artifacts and fresh-model factory."""

    task: Any
    data: StageData  # the downstream data of the trial (train, val, evals)
    artifacts: dict[str, Any]
    fresh_model: Callable[[str], nn.Module]  # fresh_model("init") is the trained model's own initial model
    generator: torch.Generator  # the analysis's own random stream
    device: torch.device
    eval_batch_size: int
    method: str
    seed: int = 0  # the trial's seed (for data an analysis draws from the task, e.g. probe splits)
    settings: Any = None  # in a trial: the sweep as the analysis may read it (`common.config.Declared`)

    def block(self, name: str) -> Any:
        """The sweep block `name`, if the analysis may read it: declared in `reads`, or task, model
        and training; otherwise `UndeclaredBlock` says which declaration to add."""
        if self.settings is None:
            raise ValueError("this AnalysisContext was built without the sweep's settings (settings=None)")
        return self.settings.block(name)

    def artifact(self, kind: str) -> Any:
        if kind not in self.artifacts:
            have = sorted(self.artifacts)
            raise KeyError(f"artifact {kind!r} was not declared in the analysis's needs; it has {have}")
        return self.artifacts[kind]


@dataclasses.dataclass(frozen=True)
class Analysis:
    name: str
    run: Callable[[AnalysisContext, nn.Module, Frozen | None], dict[str, Any]]
    needs: tuple[str, ...]
    columns: dict[str, Column]
    Config: type[Frozen] | None
    description: str
    reads: tuple[str, ...] = ()  # sweep blocks it reads besides task, model and training

    def declares(self, column: str) -> Column | None:
        for pattern, spec in self.columns.items():
            if column == pattern or (pattern.endswith("*") and fnmatch.fnmatchcase(column, pattern)):
                return spec
        return None

    def check(self, values: dict[str, Any]) -> dict[str, Any]:
        """`values` if every column is declared and prefixed by the name; a clear error otherwise."""
        bad = [c for c in values if not c.startswith(self.name) or self.declares(c) is None]
        if bad:
            raise ValueError(
                f"analysis {self.name!r} returned undeclared columns {bad}; declare them in "
                f"register_analysis(columns=...) and start each with {self.name!r}"
            )
        return {col: _cast(self.name, col, value, self.declares(col).dtype) for col, value in values.items()}


_CASTS = {"float64": float, "int64": int, "bool": bool, "string": str}


def _cast(analysis: str, column: str, value: Any, dtype: str) -> Any:
    """`value` as a plain Python value of the declared dtype (rows are JSON), or a clear error."""
    if value is None or dtype not in _CASTS:
        return value
    try:
        return _CASTS[dtype](value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError) as err:
        message = f"analysis {analysis!r}: column {column!r} is declared {dtype} but got {value!r} ({err})"
        raise ValueError(message) from None


ANALYSES = Registry("analysis")


def register_analysis(
    name: str,
    *,
    columns: dict[str, Column],
    needs: tuple[str, ...] = (),
    config: type[Frozen] | None = None,
    reads: tuple[str, ...] = (),
    description: str = "",
):
    """Decorator for `run(ctx, model, config) -> dict`; columns must start with `name`. `reads`:
    the sweep blocks it reads (`ctx.block(name)`) besides task, model and training."""
    misnamed = [c for c in columns if not c.startswith(name)]
    if misnamed:
        raise ValueError(f"analysis {name!r}: every column must start with its name; fix {misnamed}")

    def add(fn):
        ANALYSES.register(name)(Analysis(name, fn, tuple(needs), dict(columns), config, description, tuple(reads)))
        return fn

    return add


def parse_analysis(entry: Any, where: str) -> tuple[str, Frozen | None]:
    """`lmc_barrier` or `{name: lmc_barrier, points: 11}` -> (name, validated config).
    Raises ValueError naming `where` and what is wrong."""
    from pydantic import ValidationError

    if isinstance(entry, str):
        name, params = entry, {}
    elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
        name, params = entry["name"], {k: v for k, v in entry.items() if k != "name"}
    else:
        raise ValueError(f"{where}: expected an analysis name or a mapping with 'name'; valid names: "
                         f"{', '.join(ANALYSES.names())}")  # fmt: skip
    if name not in ANALYSES:
        raise ValueError(f"{where}: unknown analysis {name!r}; valid names: {', '.join(ANALYSES.names())}")
    spec = ANALYSES.get(name)
    if spec.Config is None:
        if params:
            raise ValueError(f"{where}: analysis {name!r} takes no parameters, got {sorted(params)}")
        return name, None
    try:
        return name, spec.Config.model_validate(params)
    except ValidationError as err:
        lines = [f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ValueError("\n".join(lines)) from None
