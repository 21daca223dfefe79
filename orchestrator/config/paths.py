"""Config paths (`training.lr`, `<block>.<field>`) and the overlay: whatever sets paths for some
trials only is a `Layer` (a method block's `training:`, `method_overrides`, a variant, a trial's axis
values); `SweepConfig.effective` applies those that reach a trial, `loading` validates them all."""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any

from common.config import Frozen

if TYPE_CHECKING:
    from orchestrator.config.schema import SweepConfig


# Paths that are not settings of an experiment: sweeping them is a mistake with a better spelling.
_NOT_AXES = {
    "methods": "list the methods in `methods:`",
    "data_fractions": "use the `data_fractions:` axis",
    "seeds": "use the `seeds:` axis",
    "name": "the sweep's name does not change results",
    "plugins": "plugins are imported once for the whole sweep",
    "resources": "resources do not change results",
    "storage": "storage does not change results",
    "keep": "keeping models does not change results",
    "report": "how results are reported does not change them",
    "max_failures": "retries do not change results",
    "tuning": "tuning settings are for `instill tune`",
    "method_overrides": "set per-method values in method_overrides directly",
    "method_training": "set a method's training in its block: <method>: {training: {...}}",
    "axes": "axes cannot be swept",
    "variants": "variants cannot be swept",
    "analyses": "list analyses in `analyses:`",
}


def _head(path: str) -> str:
    return path.split(".")[0]


@dataclasses.dataclass(frozen=True)
class Layer:
    """Config paths set together for the trials a scope reaches (`method`, `variant`: None reaches
    every one). `where` is how the sweep file spells it, for messages; `owner` is the method whose
    block or overrides wrote it: it may set only what can differ between methods."""

    where: str
    values: dict[str, Any]
    method: str | None = None
    variant: str | None = None
    owner: str | None = None


def _flatten(config: SweepConfig, prefix: str, mapping: dict[str, Any]) -> dict[str, Any]:
    """`{lr: 30, groups: [...]}` under `training` as paths: `{training.lr: 30, training.groups: [...]}`;
    a mapping for a nested block goes one level down, so it sets only the fields it names."""
    out = {}
    for key, value in mapping.items():
        path = f"{prefix}.{key}"
        nested = isinstance(value, dict) and isinstance(_walk(config, path)[0], Frozen)
        out.update(_flatten(config, path, value) if nested else {path: value})
    return out


def _walk(config: SweepConfig, path: str) -> tuple[Any, int]:
    """The node at `path`, or the deepest one found, and how many of its parts were found."""
    parts = path.split(".")
    node: Any = config.block(parts[0]) if parts[0] not in _NOT_AXES else None
    depth = 1
    while depth < len(parts) and isinstance(node, Frozen) and parts[depth] in type(node).model_fields:
        node, depth = getattr(node, parts[depth]), depth + 1  # may be None: a null field is still a setting
    return node, depth


def all_paths(config: SweepConfig) -> list[str]:
    """Every settable leaf path of `config` (blocks' fields, nested blocks flattened)."""
    out = []

    def walk(prefix: str, block: Frozen) -> None:
        for name, value in block:
            if isinstance(value, Frozen):
                walk(f"{prefix}.{name}", value)
            else:
                out.append(f"{prefix}.{name}")

    for name in [*type(config).model_fields, *config.blocks]:
        block = config.block(name)
        if block is not None and name not in _NOT_AXES:
            walk(name, block)
    return out


def resolve_path(config: SweepConfig, path: str) -> Any:
    """The current value at `path`; ValueError naming near matches and the block's fields for an
    unknown path."""
    parts = path.split(".")
    if parts[0] in _NOT_AXES:
        raise ValueError(f"{path} is not an experiment setting: {_NOT_AXES[parts[0]]}")
    node, depth = _walk(config, path)
    if depth == len(parts) > 1 and not isinstance(node, Frozen):
        return node
    near = difflib.get_close_matches(path, all_paths(config), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else "; paths look like training.lr or model.n_layers"
    if isinstance(node, Frozen):
        hint += f" (the fields of {'.'.join(parts[:depth])}: {', '.join(type(node).model_fields)})"
    raise ValueError(f"unknown config path {path!r}{hint}")
