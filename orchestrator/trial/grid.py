"""The grid of trials (`expand`) and each trial's identity: its method, grid point, every setting
it depends on and the source of every plug-in module it uses (`common.provenance`). Its hash names
its row, so a grown sweep reruns only new trials, and editing a plug-in only the trials that use it.
Methods, analyses and artifact kinds see only the blocks they declare (`common.config.Declared`),
and those blocks are in the identity. The project's own code version is not: rows record it
(`code_version`), and `instill run --rerun-stale` reruns the rows of other versions.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from pydantic import Field, PrivateAttr

import tasks
from common.config import Declared, Frozen, stable_hash
from common.provenance import code_version, plugin_sources
from methods import ANALYSES, ARTIFACTS, get_method
from orchestrator.config import SweepConfig, needed_kinds


class TrialSpec(Frozen):
    """A point of the grid. `axes` holds the values of the sweep's axes (its `axes:` paths, the
    axes of the artifact kinds it needs, `variant`) that this trial's method depends on.
    `code_version`: the project's code version (`common.provenance.code_version`) of the process
    that planned the trial (the driver), recorded in its row and artifacts; not part of its identity."""

    method: str
    data_fraction: float = Field(ge=0, le=1)
    seed: int
    axes: dict[str, Any] = {}
    code_version: str = Field(default_factory=code_version)
    # What the plan computed for this spec: [the sweep, the trial's effective config, its identity].
    _plan: list[Any] | None = PrivateAttr(None)

    def __eq__(self, other: object) -> bool:  # the fields: a planned spec equals an unplanned one
        return isinstance(other, TrialSpec) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(stable_hash(self.model_dump(mode="json")))

    def config(self, sweep: SweepConfig) -> SweepConfig:
        """The config this trial runs with (every overlay layer that reaches it, then its axis
        values), computed once: by the plan (`expand`), or where a spec arrives as a dict (a
        worker), at its first use. It travels with the spec to every key, row and failure."""
        if self._plan is None or self._plan[0] is not sweep:
            self._plan = [sweep, sweep.effective(self.method, self.axes), None]
        return self._plan[1]

    @property
    def name(self) -> str:
        axes = "".join(f"-{path}={_short(v)}" for path, v in sorted(self.axes.items()))
        return f"{self.method}{axes}-f{self.data_fraction:g}-seed{self.seed}"


def _short(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:24]


# Blocks every method and analysis may read without declaring them: every trial's identity holds
# them (task, model, training). Artifact kinds may read `model` undeclared: every kind can build
# models (`ctx.fresh_model`), so every artifact key holds it; a kind keys the task's fields of its
# stage itself (`ctx.task.key_fields`), and reads no other block undeclared.
TRIAL_BLOCKS = ("task", "model", "training")


KIND_BLOCKS = ("model",)


def identity_blocks(sweep: SweepConfig, method: str) -> list[str]:
    """The sweep blocks a trial of `method` depends on: task, model, training, the blocks of every
    artifact it or its analyses need, the blocks the method and its analyses read, and its own settings."""
    spec, names = get_method(method), [name for name, _ in sweep.analysis_list()]
    analyses = [ANALYSES.get(name) for name in names]
    blocks = list(TRIAL_BLOCKS)
    for kind in needed_kinds([method], names):
        blocks += ARTIFACTS.get(kind).blocks
    blocks += list(spec.reads) + [b for analysis in analyses for b in analysis.reads]
    if method in sweep.blocks:
        blocks.append(method)
    return list(dict.fromkeys(blocks))


def method_settings(effective: SweepConfig, method: str) -> Declared:
    """The sweep as method `method` may read it: its `reads`, its own block and `TRIAL_BLOCKS`."""
    spec = get_method(method)
    own = (method,) if method in effective.blocks else ()
    hint = "reads= in its @register_method"
    return Declared(effective, f"method {method!r}", (*spec.reads, *own), hint, TRIAL_BLOCKS)


def analysis_settings(effective: SweepConfig, name: str) -> Declared:
    """The sweep as analysis `name` may read it: its `reads` and `TRIAL_BLOCKS`."""
    reads = ANALYSES.get(name).reads
    return Declared(effective, f"analysis {name!r}", reads, "reads= in its @register_analysis", TRIAL_BLOCKS)


def kind_settings(effective: SweepConfig, kind: str) -> Declared:
    """The sweep as artifact kind `kind` may read it: its `blocks` (its own block among them) and `KIND_BLOCKS`."""
    blocks = ARTIFACTS.get(kind).blocks
    return Declared(effective, f"artifact kind {kind!r}", blocks, "blocks= in its @register_artifact", KIND_BLOCKS)


def stage_plugins(effective: SweepConfig) -> list[Any]:
    """The registered task and model of a config: what every trial and artifact uses."""
    return [tasks.TASKS.get(effective.task.name), tasks.MODELS.get(effective.model.name)]


def expand(sweep: SweepConfig) -> list[TrialSpec]:
    """The trials of a sweep: methods x data fractions x seeds x the grid's axes. A method runs once
    per value of the axes it depends on only: those of the blocks in its identity (a method that
    needs no artifact of a kind does not depend on the kind's axes or blocks)."""
    specs, seen = [], set()
    for method in sweep.methods:
        blocks = set(identity_blocks(sweep, method))
        paths = [p for p in sweep.grid if sweep.axis_heads(p) & blocks]
        for values in itertools.product(*(sweep.grid[p] for p in paths)):
            axes = dict(zip(paths, values, strict=True))
            for fraction in sweep.data_fractions:
                for seed in sweep.first_seeds:
                    spec = TrialSpec(method=method, data_fraction=fraction, seed=seed, axes=axes)
                    key = trial_hash(sweep, spec)
                    if key not in seen:  # e.g. two variants that give the method the same settings
                        seen.add(key)
                        specs.append(spec)
    return specs


def identity(sweep: SweepConfig, spec: TrialSpec) -> dict[str, Any]:
    """Everything the trial's results depend on: method, grid point and every setting it runs with.
    Resources, storage, the sweep's name and retries are not part of it. Computed once per spec."""
    effective = spec.config(sweep)
    if spec._plan[2] is None:
        spec._plan[2] = _identity(sweep, spec, effective)
    return copy.deepcopy(spec._plan[2])


def _identity(sweep: SweepConfig, spec: TrialSpec, effective: SweepConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"method": spec.method, "data_fraction": spec.data_fraction, "seed": spec.seed}
    for block in identity_blocks(effective, spec.method):
        out[block] = effective.block(block).canonical()
    # Where a task caches what it generates is not part of what it generates.
    for field in getattr(type(effective.task), "not_identity", ()):
        out["task"].pop(field, None)
    out["analyses"] = analysis_entries(effective.analysis_list())
    if effective.resources.mixed_precision:  # bfloat16 on GPU changes the numbers
        out["mixed_precision"] = True
    needs = trial_needs(sweep, spec)
    if packs_upstream(effective) and any(ARTIFACTS.get(k).packs_seeds for k in needs):
        out["packed_upstream"] = True  # packed upstream artifacts are not the serial ones
    used = [get_method(spec.method), *(ANALYSES.get(n) for n, _ in effective.analysis_list())]
    code = plugin_sources(used + [ARTIFACTS.get(k) for k in needs] + stage_plugins(effective))
    if code:  # the project's own code is recorded beside the identity (`code_version`), not in it
        out["code"] = code
    return out


def analysis_entries(analyses: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """(name, config) pairs as the identity lists them: `{"name": ..., <params>}`."""
    return [{"name": n, **(c.canonical() if c else {})} for n, c in analyses]


def trial_hash(sweep: SweepConfig, spec: TrialSpec) -> str:
    return stable_hash(identity(sweep, spec), 20)


def packs_upstream(sweep: SweepConfig) -> bool:
    """Whether artifact kinds that can (`ArtifactKind.packs_seeds`) train several seeds as one pack:
    `resources.pack_upstream` (off by default; never where trials do not pack). A function of the
    config only, so the driver and every worker agree on the keys and identities."""
    return bool(sweep.resources.pack_upstream) and sweep.resources.pack != 1


def series_of(config: dict[str, Any]) -> str:
    """The report's series key: the trial's identity without seed and budget."""
    return stable_hash({k: v for k, v in config.items() if k not in ("seed", "data_fraction")})


def trial_needs(sweep: SweepConfig, spec: TrialSpec, tuning: bool = False) -> list[str]:
    """Artifact kinds the trial needs (its method's and its analyses'), each after the kinds it uses
    in the trial's config (`ArtifactKind.uses`)."""
    config = spec.config(sweep)
    analyses = [] if tuning else [name for name, _ in config.analysis_list()]
    return needed_kinds([spec.method], analyses, kind_uses(config))


def kind_uses(effective: SweepConfig):
    """kind -> the kinds it reads in `effective` (`ArtifactKind.uses` on what it may read), which
    must be among its declared `needs`. What a trial computes, loads and is gated by follows this;
    its identity (`identity_blocks`) keeps the blocks of every declared need, so that a trial's hash
    does not move with a kind's `uses`."""

    def uses(kind: str) -> tuple[str, ...]:
        art = ARTIFACTS.get(kind)
        used = tuple(art.uses(kind_settings(effective, kind)))
        if not set(used) <= set(art.needs):
            raise ValueError(f"artifact kind {kind!r}: uses() returned {used}, not all among its needs {art.needs}")
        return used

    return uses
