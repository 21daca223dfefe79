"""The sweep file: the grid (methods x data fractions x seeds x any `axes:` path) and one block per
stage, plus the blocks plug-ins declare (`<method>: {<field>: ...}`, an artifact kind's own block).

`load_sweep_file` turns YAML into a frozen, validated `SweepConfig`, or raises `ConfigError` whose
message names every bad field by its path (`training.lr: Input should be greater than 0`).

Paths. Every setting has a dotted path: `training.lr`, `model.n_layers`, `<block>.<field>`.
Whatever sets a path for some trials only is a `Layer` of the overlay (a method block's
`training:`, `method_overrides`, a variant, a trial's axis values): `effective` applies the layers
that reach a trial, `_check_overlay` validates them all with one set of rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt, PrivateAttr, SerializeAsAny, ValidationError, field_validator

import tasks
from common.config import BLOCKS, Frozen, stable_hash
from methods import ANALYSES, ARTIFACTS, METHODS, TrainConfig
from methods.analysis import parse_analysis
from tasks.base import format_validation, parse_block


class ConfigError(ValueError):
    """A sweep file that cannot be run; the message says which field and what to do."""


class DownstreamTraining(TrainConfig):
    """Downstream training: the paper's AdamW 2e-4, batch 50, 100 epochs, best epoch on validation.
    The schedule settings of `TrainConfig` (`lr_schedule`, `select`, `ties`) apply here too."""

    lr: float = Field(2e-4, gt=0, json_schema_extra={"tune": (1e-4, 1e-2)})  # `instill tune`'s default range
    epochs: int = Field(100, ge=1, json_schema_extra={"tune": (10, 100)})


class Resources(Frozen):
    """What each trial gets, and how many run at once."""

    cpu: float = Field(1.0, gt=0, description="CPUs per trial; torch threads are pinned to this")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; 0.25 packs four trials on a GPU")
    max_concurrent: int | None = Field(None, ge=1, description="cap on trials running at once")
    group: Literal["auto"] | PositiveInt = Field(
        "auto",
        description="trials run one after another in one Tune trial, each with its own row: 'auto' groups "
        "trials shorter than a few seconds (Tune's cost per trial is then paid per group), N groups N, "
        "1 gives every trial a Tune trial of its own",
    )
    pack: Literal["auto"] | PositiveInt = Field(
        "auto",
        description="trials of one data budget and training setting whose models have the same shapes train "
        "together as one vectorised model of K models, each with its own row: 'auto' (the default) picks K, "
        "N packs at most N, 1 trains every model alone with the serial loop (other numbers than packed)",
    )
    pack_upstream: bool = Field(
        False,
        description="upstream artifacts of different seeds that can train as one pack (source models) do so, "
        "one pack per upstream slot, where trials pack too (pack is not 1). Off by default: it does not pay on "
        "CPU, and on GPUs it is not measured yet. A packed artifact's key and its trials' identity say so.",
    )
    mixed_precision: bool = Field(False, description="bfloat16 autocast for training on GPU (ignored on CPU)")
    checkpoint_every_s: float | None = Field(
        300.0,
        ge=0,
        description="a trial checkpoints its training state (in the artifact store) at the first epoch end this "
        "many seconds after its start or last checkpoint, and resumes from it when rerun; 0: every epoch; "
        "null: never (a stop request still checkpoints)",
    )


class Storage(Frozen):
    artifacts: str | None = Field(None, description="where source models and masks are cached; default OUT/artifacts")


class Tuning(Frozen):
    """`instill tune`: an Optuna search per method over these ranges, on the validation split.

    Keys are config paths of numeric fields (`training.lr`, `<method>.<field>`); by default (null)
    every field of the sweep's blocks that declares a range (`Field(..., json_schema_extra={"tune":
    (low, high)})`). Float ranges are searched on a log scale, integer ranges uniformly. Settings of
    a shared artifact's blocks are tuned only by the methods that declare they own them (`owns=`),
    and every method that uses the artifact inherits the tuned values; a method's own block is tuned
    for it only.
    """

    budget: int = Field(8, ge=1, description="Optuna trials per method: the same effort for every method")
    data_fractions: tuple[float, ...] = Field((0.1,), min_length=1)
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    space: dict[str, tuple[float, float]] | None = None

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, tuple[float, float]] | None) -> dict[str, tuple[float, float]] | None:
        for key, (low, high) in (v or {}).items():
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
VARIANT = "variant"  # the grid axis of `variants:` (a row column of that name)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Paths that are not settings of an experiment: sweeping them is a mistake with a better spelling.
_NOT_AXES = {
    "methods": "list the methods in `methods:`",
    "data_fractions": "use the `data_fractions:` axis",
    "seeds": "use the `seeds:` axis",
    "name": "the sweep's name does not change results",
    "plugins": "plugins are imported once for the whole sweep",
    "resources": "resources do not change results",
    "storage": "storage does not change results",
    "max_failures": "retries do not change results",
    "tuning": "tuning settings are for `instill tune`",
    "method_overrides": "set per-method values in method_overrides directly",
    "method_training": "set a method's training in its block: <method>: {training: {...}}",
    "axes": "axes cannot be swept",
    "variants": "variants cannot be swept",
    "analyses": "list analyses in `analyses:`",
}


class SweepConfig(Frozen):
    name: str = "sweep"
    plugins: tuple[str, ...] = Field(
        (), description="modules imported before validation, e.g. ones that register more methods or tasks"
    )
    task: SerializeAsAny[Frozen]
    model: SerializeAsAny[Frozen]
    training: DownstreamTraining = DownstreamTraining()
    resources: Resources = Resources()
    storage: Storage = Storage()
    max_failures: int = Field(1, ge=0, description="retries of a failing trial before it is recorded failed")
    tuning: Tuning = Tuning()
    method_overrides: dict[str, dict[str, Any]] = Field(
        {}, description="per-method values of config paths, e.g. from `instill tune` (see --tuned)"
    )
    blocks: dict[str, SerializeAsAny[Frozen]] = Field(
        {},
        description="the blocks plug-ins declare, by name (top level in YAML): methods' and artifact kinds' own "
        "settings, and the blocks declared for their readers (`common.config.declare_block`)",
    )
    method_training: dict[str, dict[str, Any]] = Field(
        {}, description="each method block's `training:` (`<method>: {training: {lr: 30}}`): its trials only"
    )
    analyses: tuple[dict[str, Any], ...] = Field(
        (), description="analyses run on every trained model: names or {name: ..., <params>}"
    )
    axes: dict[str, tuple[Any, ...]] = Field({}, description="config path -> values: more axes of the grid")
    variants: dict[str, dict[str, Any]] = Field(
        {},
        description="name -> {config path: value}: one more axis of the grid, `variant`, whose values are "
        "named sets of settings applied together (e.g. an ablation that changes one thing at a time)",
    )

    methods: tuple[str, ...] = Field(min_length=1)
    _variants: dict[str, SweepConfig] = PrivateAttr(default_factory=dict)
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

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
        for path, values in v.items():
            if not values:
                raise ValueError(f"{path}: give at least one value")
            _unique(tuple(json.dumps(x, sort_keys=True, default=str) for x in values), path)
        return v

    @field_validator("variants", mode="before")
    @classmethod
    def _variant_names(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("expected a mapping of variant names to {config path: value} mappings")
        for name, values in v.items():
            if not _NAME.match(str(name)):
                raise ValueError(f"variants: {name!r} is not a usable name: use letters, digits, '_', '.', '-'")
            if not isinstance(values, dict):
                raise ValueError(f"variants.{name}: expected a mapping of config paths to values, "
                                 "e.g. {model.init: torch}; {} is the unchanged sweep")  # fmt: skip
        return v

    @property
    def grid(self) -> dict[str, tuple[Any, ...]]:
        """The extra axes of the grid: the `axes:` paths and, with `variants:`, the axis `variant`
        (its values are the variants' names)."""
        if not self.variants:
            return self.axes
        return {**self.axes, VARIANT: tuple(self.variants)}

    def axis_heads(self, path: str) -> set[str]:
        """The sweep blocks an extra axis changes: a path's first part, or for `variant` the first
        parts of every path any variant sets."""
        if path == VARIANT:
            return {_head(p) for values in self.variants.values() for p in values}
        return {_head(path)}

    # --- paths, overrides, effective configs ---------------------------------------------

    def canonical(self) -> dict[str, Any]:
        """The sweep file this config is (method blocks at the top level), defaults filled in."""
        out = super().canonical()
        out.update(out.pop("blocks"))
        for method, training in out.pop("method_training").items():
            out[method] = {**out.get(method, {}), "training": training}
        return out

    def block(self, name: str) -> Frozen | None:
        """The block `name`: a stage's block, or one a plug-in declares."""
        if name in self.blocks:
            return self.blocks[name]
        value = getattr(self, name, None) if name in type(self).model_fields else None
        return value if isinstance(value, Frozen) else None

    def with_values(self, values: dict[str, Any]) -> SweepConfig:
        """This sweep with each config path set to its value, validated as that field would be.
        Raises ValueError naming the path and the field's rule."""
        if not values:
            return self
        key = json.dumps(values, sort_keys=True, default=str)
        if key not in self._variants:  # expanding a grid asks for the same variants many times
            self._variants[key] = _with_values(self, values)
        return self._variants[key]

    def layers(self) -> list[Layer]:
        """The overlay, in the order it applies (a later layer wins where two set one path): each
        method block's `training:`, each method's `method_overrides` (those of a shared artifact's
        blocks reach every method: its users share the artifact), each variant. A trial's own axis
        values come last (`effective`)."""
        out = [Layer(m, _flatten(self, "training", v), method=m, owner=m) for m, v in self.method_training.items()]
        shared = shared_blocks()
        for m, values in self.method_overrides.items():
            own = {p: v for p, v in values.items() if _head(p) not in shared}
            out.append(Layer(f"method_overrides.{m}", own, method=m, owner=m))
            out.append(Layer(f"method_overrides.{m}", {p: v for p, v in values.items() if p not in own}, owner=m))
        return out + [Layer(f"variants.{name}", values, variant=name) for name, values in self.variants.items()]

    def effective(self, method: str, axes: dict[str, Any] | None = None) -> SweepConfig:
        """The config a trial of `method` at grid point `axes` runs with: every layer that reaches
        it, then its axis values."""
        point = dict(axes or {})
        variant = point.pop(VARIANT, None)
        if variant is not None and variant not in self.variants:
            raise ValueError(f"variant {variant!r} is not in variants {list(self.variants)}")
        values: dict[str, Any] = {}
        for layer in self.layers():
            if layer.method in (None, method) and layer.variant in (None, variant):
                values.update(layer.values)
        return self.with_values({**values, **point})

    def build_task(self):
        """The task object for this sweep's task block (one per distinct block and process: building
        one may scan data directories, and it caches the data it generates)."""
        key = stable_hash(self.task.canonical())
        if key not in _TASK_CACHE:
            _TASK_CACHE[key] = tasks.TASKS.get(self.task.name)(self.task)
        return _TASK_CACHE[key]

    def analysis_list(self) -> list[tuple[str, Frozen | None]]:
        """(name, config) of every analysis a trial runs: the task's defaults, then the sweep's."""
        names = [a["name"] for a in self.analyses]
        out = [(n, None) for n in self.build_task().default_analyses if n not in names]
        for entry in self.analyses:
            out.append(parse_analysis(entry, "analyses"))
        return out

    @property
    def config_hash(self) -> str:
        return stable_hash(self.canonical())

    @property
    def tuning_space(self) -> dict[str, tuple[float, float]]:
        """`tuning.space`, or by default the range of every field of this sweep's blocks that declares one."""
        if self.tuning.space is not None:
            return self.tuning.space
        out = {}
        for name in [*type(self).model_fields, *self.blocks]:
            block = self.block(name)
            for field, info in type(block).model_fields.items() if block is not None else ():
                if isinstance(info.json_schema_extra, dict) and "tune" in info.json_schema_extra:
                    out[f"{name}.{field}"] = tuple(info.json_schema_extra["tune"])
        return out


def needed_kinds(methods, analyses) -> list[str]:
    """The artifact kinds that `methods` and `analyses` (names) need, each after what it needs."""
    from methods.artifacts import closure

    needs = [k for m in methods for k in METHODS.get(m).needs]
    return closure(needs + [k for a in analyses for k in ANALYSES.get(a).needs])


def shared_blocks() -> set[str]:
    """Sweep blocks that configure shared artifacts (every block an artifact kind reads)."""
    return {block for _, kind in ARTIFACTS.items() for block in kind.blocks}


def _head(path: str) -> str:
    return path.split(".")[0]


# --- the overlay ---------------------------------------------------------------------------


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
        if isinstance(value, dict) and isinstance(_walk(config, path)[0], Frozen):
            out.update(_flatten(config, path, value))
        else:
            out[path] = value
    return out


def _walk(config: SweepConfig, path: str) -> tuple[Any, int]:
    """The node at `path`, or the deepest one found, and how many of its parts were found."""
    parts = path.split(".")
    node: Any = config.block(parts[0]) if parts[0] not in _NOT_AXES else None
    depth = 1
    while depth < len(parts) and isinstance(node, Frozen) and parts[depth] in type(node).model_fields:
        node, depth = getattr(node, parts[depth]), depth + 1  # may be None: a null field is still a setting
    return node, depth


def _with_values(base: SweepConfig, values: dict[str, Any]) -> SweepConfig:
    raw = base.canonical()
    if "model.name" in values and values["model.name"] != base.model.name:
        # Another architecture: its block starts from the fields the sweep file set explicitly (the
        # other defaults belong to the old architecture), each validated by the new one's config.
        raw["model"] = {**base.model.model_dump(mode="json", exclude_unset=True), "name": values["model.name"]}
    for path, value in values.items():
        resolve_path(base, path)
        parent = raw
        parts = path.split(".")
        for part in parts[:-1]:
            parent = parent[part]
        parent[parts[-1]] = value
    return _build(raw)


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


def _unique(values: tuple, field: str) -> tuple:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{field} lists {seen} more than once")
    return values


# --- loading -----------------------------------------------------------------------------


def _import_plugins(plugins: Any, errors: list[str]) -> None:
    if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) for p in plugins):
        errors.append("plugins: expected a list of module names, e.g. [my_lab.methods]")
        return
    for module in plugins:
        try:
            importlib.import_module(module)
        except Exception as err:  # any import failure is the user's to fix; say which and why
            errors.append(f"plugins: cannot import {module!r}: {type(err).__name__}: {err}")


def _parse_blocks(data: dict, errors: list[str]) -> None:
    """Replace the task, model, analysis and plug-in block entries of `data` by validated objects,
    and artifact kinds' shorthands (`ArtifactKind.shorthand`) by the `axes:` they stand for. A
    sweep holds every declared block (`common.config.declare_block`), the own block of each method
    it lists and artifact kind they or its analyses need, and any other such block it writes or sweeps."""
    for key, registry in (("task", tasks.TASKS), ("model", tasks.MODELS)):
        if key not in data:
            errors.append(f"{key}: missing; give a mapping with 'name' (one of: {', '.join(registry.names())})")
            continue
        try:
            data[key] = parse_block(registry, data[key], key)
        except ValueError as err:
            errors.append(str(err))
    _parse_analyses(data, errors)
    methods = data.get("methods") if isinstance(data.get("methods"), (list, tuple)) else []
    methods = [m for m in methods if isinstance(m, str) and m in METHODS]
    needed = needed_kinds(methods, [a["name"] for a in data["analyses"]])
    axes = data.get("axes", {})
    for key, path in [item for _, kind in ARTIFACTS.items() for item in kind.shorthand.items()]:
        if key in data and isinstance(axes, dict):
            if path in axes:
                errors.append(f"{key}: lists the values of the axis {path}, which axes: sets too; keep one")
            data["axes"] = axes = {**axes, path: data.pop(key)}
    swept = {_head(str(path)) for path in axes} if isinstance(axes, dict) else set()
    training: dict[str, dict] = {}
    for name in METHODS.names():  # `<method>: {training: {...}}`: that method's training, an overlay layer
        if name not in data:
            continue
        has_training = isinstance(data[name], dict) and "training" in data[name]
        if has_training:
            data[name] = dict(data[name])
            training[name] = data[name].pop("training")
            if not isinstance(training[name], dict):
                errors.append(f"{name}.training: expected a mapping of training fields, e.g. {{lr: 30, epochs: 200}}")
                training.pop(name)
        if METHODS.get(name).Config is None and (data.pop(name) or not has_training):
            errors.append(f"{name}: method {name!r} has no settings of its own besides `training:`; remove them")
    schemas = {name: (config, True) for name, config in BLOCKS.items()}
    owners = [(n, m, n in methods or n in swept) for n, m in METHODS.items()]
    owners += [(n, k, n in needed or n in swept) for n, k in ARTIFACTS.items()]
    for name, owner, used in owners:
        if owner.Config is None:
            continue
        if name in schemas:
            errors.append(f"{name}: two plug-ins declare a block named {name!r} (a method, artifact kind or "
                          "declared block); rename one")  # fmt: skip
            continue
        schemas[name] = (owner.Config, used)
    settings: dict[str, Frozen] = {}
    for name, (config, used) in schemas.items():
        if used or name in data:
            _parse_settings(data, name, config, settings, errors)
    data["blocks"], data["method_training"] = settings, training


def _parse_analyses(data: dict, errors: list[str]) -> None:
    analyses = data.get("analyses", ())
    if not isinstance(analyses, (list, tuple)):
        valid = ", ".join(ANALYSES.names())
        errors.append(f"analyses: expected a list of analysis names or {{name: ..., <params>}}; valid names: {valid}")
        data["analyses"] = ()
        return
    normalised = []
    for i, entry in enumerate(analyses):
        try:
            name, config = parse_analysis(entry, f"analyses[{i}]")
        except ValueError as err:
            errors.append(str(err))
            continue
        normalised.append({"name": name, **(config.canonical() if config is not None else {})})
    names = [a["name"] for a in normalised]
    if len(set(names)) != len(names):
        errors.append(f"analyses: {names} lists an analysis more than once")
    data["analyses"] = tuple(normalised)


def _parse_settings(data: dict, name: str, config_cls: type, settings: dict, errors: list[str]) -> None:
    """Pop the top-level block `name` (absent: defaults) and validate it into `settings[name]`."""
    block = data.pop(name, {}) or {}
    if not isinstance(block, dict):
        errors.append(f"{name}: expected a mapping of {name}'s settings")
        return
    try:
        settings[name] = config_cls.model_validate(block)
    except ValidationError as err:
        errors.append(format_validation(err, name))


def _build(raw: dict) -> SweepConfig:
    """Validate a raw mapping into a SweepConfig; raises ValueError with one line per problem."""
    errors: list[str] = []
    data = dict(raw)
    data.pop("blocks", None)
    _parse_blocks(data, errors)
    if errors:
        # Still check the other fields, so one pass reports every problem: stand-ins replace the
        # blocks that failed (a bare Frozen() passes the field's type check).
        for key in ("task", "model"):
            if not isinstance(data.get(key), Frozen):
                data[key] = Frozen()
    try:
        config = SweepConfig(**data)
    except ValidationError as err:
        errors.append(format_validation(err))
        raise ValueError("\n".join(errors)) from None
    if errors:
        raise ValueError("\n".join(errors))
    # The axes of the kinds the sweep needs are axes of its grid, with the block's one value by default.
    kinds = needed_kinds(config.methods, [a["name"] for a in config.analyses])
    paths = [p for kind in kinds for p in ARTIFACTS.get(kind).axes if p not in config.axes]
    if not paths:
        return config
    return config.model_copy(update={"axes": {**config.axes, **{p: (resolve_path(config, p),) for p in paths}}})


def _check_runnable(config: SweepConfig) -> list[str]:
    """Problems only building the task and model reveal (data directories, shapes)."""
    errors = []
    try:
        task = config.build_task()
    except ValueError as err:  # e.g. a data directory that is missing or malformed
        return [str(err)]
    try:
        task.build_model(config.model)
    except ValueError as err:
        return [f"model: {err}"]
    if not task.trains_on_zero and any(task.downstream_size(f) < 1 for f in config.data_fractions):
        errors.append(
            f"data_fractions: {list(config.data_fractions)} includes a budget of 0 training samples, "
            f"and task {config.task.name!r} has nothing else to train on; use fractions > 0"
        )
    budgets: dict[int, float] = {}
    for fraction in config.data_fractions:
        n = task.downstream_size(fraction)
        if n in budgets:
            errors.append(
                f"data_fractions: {budgets[n]} and {fraction} both give a budget of n = {n} samples, so they would "
                "be the same point of every curve; drop one"
            )
        budgets.setdefault(n, fraction)
    try:
        config.analysis_list()
    except ValueError as err:
        errors.append(str(err))
    return errors


def per_method_blocks() -> set[str]:
    """Blocks whose settings may differ between methods (tuned or overridden): downstream training,
    a method's own block, and the settings of shared artifacts (inherited by all their users)."""
    return {"training", *shared_blocks(), *(name for name, m in METHODS.items() if m.Config is not None)}


def _per_method_hint() -> str:
    return f"only {', '.join(sorted(b + '.*' for b in per_method_blocks()))} can differ between methods"


def _check_overlay(config: SweepConfig) -> list[str]:
    """Every layer (and each axis value, as a layer of its own): its paths settable in its scope,
    its values valid (a variant's also with each axis value) and runnable where they change the
    task or model. Errors name the layer as the sweep file spells it."""
    axes = [Layer("axes", {path: value}) for path, values in config.axes.items() for value in values]
    errors = _check_shared(config)
    for layer in [*config.layers(), *axes]:
        bad = [f"{layer.where}.{p}: {why}" for p in layer.values if (why := _path_problem(config, layer, p))]
        errors += bad
        for context in [] if bad else [{}] + ([a.values for a in axes] if layer.variant else []):
            problem = _value_problem(config, layer, context)
            if problem:
                errors.append(problem)
                break
    return list(dict.fromkeys(errors))  # an axis's bad path once, not once per value


def _path_problem(config: SweepConfig, layer: Layer, path: str) -> str | None:
    """Why `layer` cannot set `path`, or None."""
    head, axis = _head(path), layer.where == "axes"
    if path == "task.name":
        reason = "a sweep has one task; run one sweep per task and report them together"
        return f"{path} cannot be an axis: {reason}" if axis else reason
    if axis and head in _NOT_AXES:
        return f"{path} cannot be an axis: {_NOT_AXES[head]}"
    try:
        resolve_path(config, path)
    except ValueError as err:
        return str(err)
    if layer.owner is None:
        if head in METHODS and head not in config.methods:
            return f"method {head!r} is not in methods {list(config.methods)}"
        return f"{path} is also an axis; drop one of them" if layer.variant and path in config.axes else None
    if layer.owner not in config.methods:
        return f"method {layer.owner!r} is not in methods {list(config.methods)}"
    if head in METHODS and head != layer.owner:
        return f"{path} is another method's setting"
    if head not in per_method_blocks():
        return f"cannot set {path}; {_per_method_hint()}"
    if path in config.axes:
        return f"{path} is also an axis; drop one of them"
    if any(path in values for values in config.variants.values()):
        return f"{path} is also set by a variant; drop one of them"
    return None


def _value_problem(config: SweepConfig, layer: Layer, context: dict[str, Any]) -> str | None:
    """Why `layer`'s values (with the axis value `context`) are invalid or cannot run, or None."""
    where = layer.where + "".join(f" with axes.{p}={v!r}" for p, v in context.items())
    if layer.where == "axes":
        ((path, value),) = layer.values.items()
        where = f"axes.{path}={value!r}"
    try:
        variant = config.with_values({**layer.values, **context})
    except ValueError as err:
        lines = str(err).splitlines()
        if layer.where != "axes":
            return f"{where}: " + "; ".join(lines)
        # One setting's rule ("must be >= 0"); several settings (another model's block): each named.
        rule = lines[0].split(": ", 1)[-1] if len(lines) == 1 and lines[0].startswith(path) else "; ".join(lines)
        return f"axes.{path}: value {value!r} is invalid: {rule}"
    if any(_head(p) in ("task", "model") for p in [*layer.values, *context]):
        return "\n".join(f"{where}: {e}" for e in _check_runnable(variant)) or None
    return None


def _check_shared(config: SweepConfig) -> list[str]:
    """A shared artifact's setting reaches every method that uses the artifact: one value only."""
    errors, seen = [], {}
    for layer in config.layers():
        for path, value in layer.values.items() if layer.owner and not layer.method else ():
            if seen.setdefault(path, (layer.owner, value))[1] != value:
                errors.append(f"method_overrides: {path} is a shared artifact setting, set differently for "
                              f"{seen[path][0]!r} and {layer.owner!r}; give one value")  # fmt: skip
    return errors


def _check_space(config: SweepConfig) -> list[str]:
    """`tuning.space`: numeric settings that may differ between methods."""
    errors = []
    for path in config.tuning_space:
        if _head(path) not in per_method_blocks():
            errors.append(f"tuning.space: cannot tune {path!r}; {_per_method_hint()}")
            continue
        try:
            value = resolve_path(config, path)
        except ValueError as err:
            errors.append(f"tuning.space.{path}: {err}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"tuning.space: {path} is not a numeric setting, so it cannot be searched")
    return errors


def load_sweep(raw: Any, source: str = "sweep") -> SweepConfig:
    """Validate a parsed sweep mapping. Raises ConfigError listing every problem by field path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    errors: list[str] = []
    _import_plugins(raw.get("plugins", ()), errors)
    config = None
    try:
        config = _build(raw)
    except ValueError as err:
        errors.append(str(err))
    if config is not None:
        errors += _check_overlay(config) + _check_space(config)
        if not errors:
            errors += _check_runnable(config)
    if not errors:
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
