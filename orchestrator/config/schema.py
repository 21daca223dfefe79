"""The sweep config's schema: `SweepConfig` (the grid and one block per stage, plus the blocks
plug-ins declare), its fixed blocks (`Resources`, `Storage`, `Tuning`, downstream training) and
what the registrations say about blocks (`needed_kinds`, `shared_blocks`, `per_method_blocks`)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

import tasks
from common.config import Frozen, stable_hash
from methods import ANALYSES, ARTIFACTS, METHODS, TrainConfig
from methods.analysis import parse_analysis
from orchestrator.config.paths import Layer, _flatten, _head
from tasks.base import format_validation


class ConfigError(ValueError):
    """A sweep file that cannot be run; the message says which field and what to do."""


class DownstreamTraining(TrainConfig):
    """Downstream training: the paper's AdamW 2e-4, batch 50, 100 epochs, best epoch on validation.
    The schedule settings of `TrainConfig` (`lr_schedule`, `select`, `ties`) apply here too."""

    lr: float = Field(2e-4, gt=0, json_schema_extra={"tune": (1e-4, 1e-2)})  # `instill tune`'s default range
    epochs: int = Field(100, ge=1, json_schema_extra={"tune": (10, 100)})


class Resources(Frozen):
    """What each trial gets, and how many run at once."""

    cpu: Literal["auto"] | PositiveFloat = Field(
        1.0,
        description="CPUs per trial, torch threads pinned to it; 'auto' measures, once per machine and model, "
        "whether trials of 1, 2, 4, ... threads give the node the most model-steps/s and keeps the fewest threads "
        "within 5% of the fastest (orchestrator/threads.py; the artifact store keeps the measurement, so a resumed "
        "sweep keeps its threads). Not the default: a choice made from timings could differ between two fresh runs, "
        "and numbers are bit-identical at one thread count only",
    )
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
    compile: Literal["auto"] | bool = Field(
        "auto",
        description="a trial trained alone (not packed) runs its training step through torch.compile (on CPU, "
        "for a cross-entropy objective, forward, backward and the AdamW update as one graph; otherwise the loss "
        "and its backward, with the fused optimiser), compiled once per worker process and reused by its later "
        "trials: "
        "'auto' (the default) where it pays (a run of at least methods.training.AUTO_MIN_STEPS steps, decided "
        "from the run alone, never the worker's history; docs/PERFORMANCE.md), true always, false never. "
        "Numbers follow the eager ones within float rounding, not bit for bit; where compiling fails the trial "
        "trains eagerly after a warning",
    )
    checkpoint_every_s: float | None = Field(
        300.0,
        ge=0,
        description="a trial checkpoints its training state (in the artifact store) at the first epoch end this "
        "many seconds after its start or last checkpoint, and resumes from it when rerun; 0: every epoch; "
        "null: never (a stop request still checkpoints)",
    )


class Storage(Frozen):
    artifacts: str | None = Field(None, description="where source models and masks are cached; default OUT/artifacts")


class Keep(Frozen):
    """What a trial keeps besides its row; not part of its identity."""

    models: bool = Field(
        False,
        description="store each trial's trained model in the artifact store (by trial hash), so that "
        "`instill analyse` can run more analyses on finished trials without training them again",
    )


class ReportSettings(Frozen):
    """How `instill run` and `instill report` compare the sweep's series; not part of any identity.
    The margin is declared here, before any result is read, never inferred from the data."""

    versus: tuple[str, ...] = Field(
        (),
        description="what every series is compared with, paired by seed (findings): methods, or PATH=VALUE "
        "settings (model.name=gpt: each series against its twin with that value at that path)",
    )
    margin: float | None = Field(None, gt=0, description="inside +-margin a difference is equivalent")
    target: float = Field(0.9, gt=0, le=1, description="accuracy whose required budget the headline reports")
    mean_over: str | None = Field(None, description="an axis the series are also averaged over (e.g. model.n_layers)")
    metrics: tuple[str, ...] = Field(
        (),
        description="summarised columns judged with findings besides test_acc (val_acc, analysis columns)",
    )

    @field_validator("versus", "metrics", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return (v,) if isinstance(v, str) else v


class Tuning(Frozen):
    """`instill tune`: an Optuna search per method over these ranges, on the validation split.

    Keys are config paths of numeric fields (`training.lr`, `<method>.<field>`); by default (null)
    every field of the sweep's blocks that declares a range (`json_schema_extra={"tune": (low, high)}`).
    Floats are searched on a log scale, integers uniformly. A shared artifact's settings are tuned by
    the methods that own them (`owns=`) and inherited by its other users.
    """

    budget: int = Field(8, ge=1, description="Optuna trials per method: the same effort for every method")
    in_run: bool = Field(
        False, description="`instill run` first tunes every method (this budget each) on validation, then runs tuned"
    )
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


class SeedTarget(Frozen):
    """`seeds.until`: the precision every cell (series x budget) must reach. Precision, never
    significance: the stopping rule does not look at the sign of a difference (docs/CONFIG.md)."""

    half_width: float = Field(gt=0, description="the 95% interval's (hi - lo) / 2 at or below which a cell stops")
    metric: str = Field("test_acc", description="a summarised column (test_acc, val_acc, ...)")
    versus: str | None = Field(
        None, description="a method, or PATH=VALUE (an axis value): judge the interval of the paired difference to it"
    )


class SeedRule(Frozen):
    """`seeds: {min, max, step, until}`: seeds 0..min-1 first; after each round every cell wider than
    `until` gets `step` more seeds, up to `max` (`orchestrator.seeds`)."""

    min: int = Field(ge=1, description="seeds of the first round: 0..min-1")
    max: int = Field(ge=1, description="the most seeds a cell gets")
    step: int = Field(1, ge=1, description="seeds a cell wider than the target gets per round")
    until: SeedTarget

    @model_validator(mode="after")
    def _order(self) -> SeedRule:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be at most max ({self.max})")
        return self

    def __str__(self) -> str:
        of = f"the paired difference to {self.until.versus}" if self.until.versus else "the mean"
        return (f"0..{self.min - 1}, then {self.step} more per round (up to {self.max}) for every series x "
                f"budget whose 95% interval of {of} of {self.until.metric} is wider than "
                f"+-{self.until.half_width:g}")  # fmt: skip


_RULE = "{min: 3, max: 20, step: 3, until: {half_width: 0.03, metric: test_acc}}"
_TASK_CACHE: dict[str, object] = {}
VARIANT = "variant"  # the grid axis of `variants:` (a row column of that name)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    keep: Keep = Keep()
    report: ReportSettings = ReportSettings()
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
    seeds: tuple[int, ...] | SeedRule = Field((0,), description="a list, or a precision target (`SeedRule`)")

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

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_rule(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple, SeedRule)):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"expected a list of seeds or a rule such as {_RULE}; got {v!r}")
        try:
            return SeedRule.model_validate(v)
        except ValidationError as err:  # one message per field, named as the file spells it
            raise ValueError("; ".join(format_validation(err).splitlines())) from None

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...] | SeedRule) -> tuple[int, ...] | SeedRule:
        if isinstance(v, tuple) and not v:
            raise ValueError(f"give at least 1 seed, or a rule such as {_RULE}")
        return _unique(v, "seeds") if isinstance(v, tuple) else v

    @property
    def first_seeds(self) -> tuple[int, ...]:
        """The seeds every trial runs: the list, or a rule's first round (0..min-1)."""
        return tuple(range(self.seeds.min)) if isinstance(self.seeds, SeedRule) else self.seeds

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
        """The extra axes of the grid: the `axes:` paths and, with `variants:`, `variant` (their names)."""
        return {**self.axes, VARIANT: tuple(self.variants)} if self.variants else self.axes

    def axis_heads(self, path: str) -> set[str]:
        """The sweep blocks an extra axis changes: a path's first part, or for `variant` the first
        parts of every path any variant sets."""
        return {_head(p) for values in self.variants.values() for p in values} if path == VARIANT else {_head(path)}

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
            from orchestrator.config.loading import _with_values  # loading builds configs from this schema

            self._variants[key] = _with_values(self, values)
        return self._variants[key]

    def layers(self) -> list[Layer]:
        """The overlay, in the order it applies (a later layer wins): each method block's `training:`,
        each method's `method_overrides` (those of a shared artifact's blocks reach every method),
        each variant. A trial's own axis values come last (`effective`)."""
        out = [Layer(m, _flatten(self, "training", v), method=m, owner=m) for m, v in self.method_training.items()]
        shared = shared_blocks()
        for m, values in self.method_overrides.items():
            own = {p: v for p, v in values.items() if _head(p) not in shared}
            out.append(Layer(f"method_overrides.{m}", own, method=m, owner=m))
            out.append(Layer(f"method_overrides.{m}", {p: v for p, v in values.items() if p not in own}, owner=m))
        return out + [Layer(f"variants.{name}", values, variant=name) for name, values in self.variants.items()]

    def own_settings(self, method: str) -> tuple[str, ...]:
        """The config paths `method`'s own layers set (its block's `training:`, its `method_overrides`,
        tuned values among them), axis and variant paths aside: part of the method, so a report pairing
        its series with another method's does not count them as settings the two must share."""
        varied = set(self.grid) | {p for values in self.variants.values() for p in values}
        return tuple(sorted({p for layer in self.layers() if layer.method == method for p in layer.values} - varied))

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
        defaults = [(n, None) for n in self.build_task().default_analyses if n not in names]
        return defaults + [parse_analysis(entry, "analyses") for entry in self.analyses]

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


def needed_kinds(methods, analyses, uses=None) -> list[str]:
    """The artifact kinds that `methods` and `analyses` (names) need, each after what it needs
    (`uses`: a kind's needs in one configuration, `methods.artifacts.closure`)."""
    from methods.artifacts import closure

    needs = [k for m in methods for k in METHODS.get(m).needs]
    return closure(needs + [k for a in analyses for k in ANALYSES.get(a).needs], uses)


def shared_blocks() -> set[str]:
    """Sweep blocks that configure shared artifacts (every block an artifact kind reads)."""
    return {block for _, kind in ARTIFACTS.items() for block in kind.blocks}


def _unique(values: tuple, field: str) -> tuple:
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    if seen:
        raise ValueError(f"{field} lists {seen} more than once")
    return values


def per_method_blocks() -> set[str]:
    """Blocks whose settings may differ between methods (tuned or overridden): downstream training,
    a method's own block, and the settings of shared artifacts (inherited by all their users)."""
    return {"training", *shared_blocks(), *(name for name, m in METHODS.items() if m.Config is not None)}
