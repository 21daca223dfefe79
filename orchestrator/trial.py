"""One trial: upstream artifacts -> method build -> the method's objective in the one training
loop -> evaluation -> analyses.

`run_trial` is a plain function of (sweep config, trial spec, artifact store): it runs and is
tested without Ray; the Tune layer only adapts it. Upstream work comes from the artifact store,
keyed by exactly the config fields that determine it, so it is computed once per key whatever the
number of trials that need it. Nothing here knows a method, artifact kind or analysis by name: it
follows what their registrations declare.

A trial's identity (`identity`) is its method, grid point, every setting its result depends on and
the source of every plug-in module it uses (`common.provenance`); its hash names its row, so a sweep
that grows by a seed, a budget, a method or an axis value reuses every finished trial and runs only
the new ones, and editing a plug-in reruns only the trials that use it. Methods, analyses and
artifact kinds see only the sweep blocks they declare (`common.config.Declared`), and those blocks
are in the identity (and an artifact's key): reading a block they did not declare is an error. The
project's own code version is not in the identity: every row and artifact records it
(`code_version`), and `instill run --rerun-stale` reruns the rows of other versions.

Every training run inside a trial (`methods.training.fit`: the downstream training, and the source
or mask when the trial computes them) is supervised (`TrialSupervisor`): it checkpoints into the
artifact store every `resources.checkpoint_every_s` (`orchestrator.checkpoints`), resumes from
its checkpoint when the trial is rerun (bit for bit on CPU), stops on request (`Interrupted`), and
reports each epoch through `report` (`{"stage": "epoch", "fit": "train", "epoch": 3,
"train/val_score": ..., "train/loss": ..., "train/<measurement>": ...}`), so Tune logs live curves.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
from pydantic import Field
from torch import nn

import tasks
from common.config import Declared, Frozen, stable_hash
from common.provenance import code_version, plugin_sources
from common.seeding import seeded_init, torch_generator
from methods import ANALYSES, ARTIFACTS, AnalysisContext, ArtifactContext, MethodContext, evaluate, get_method
from methods.packing import NotPackable, calibrate, fit_packed, packable
from methods.training import Interrupted, Supervision, supervised
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoints import Checkpointer, CheckpointStore, Interval
from orchestrator.config import SweepConfig, needed_kinds

Report = Callable[[dict[str, Any]], None]


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

    @property
    def name(self) -> str:
        axes = "".join(f"-{path}={_short(v)}" for path, v in sorted(self.axes.items()))
        return f"{self.method}{axes}-f{self.data_fraction:g}-seed{self.seed}"


def _short(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:24]


# --- the grid and trial identity ---------------------------------------------------------


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
                for seed in sweep.seeds:
                    spec = TrialSpec(method=method, data_fraction=fraction, seed=seed, axes=axes)
                    key = trial_hash(sweep, spec)
                    if key not in seen:  # e.g. two variants that give the method the same settings
                        seen.add(key)
                        specs.append(spec)
    return specs


def identity(sweep: SweepConfig, spec: TrialSpec) -> dict[str, Any]:
    """Everything the trial's results depend on: method, grid point and every setting it runs with.
    Resources, storage, the sweep's name and retries are not part of it."""
    effective = sweep.effective(spec.method, spec.axes)
    out: dict[str, Any] = {"method": spec.method, "data_fraction": spec.data_fraction, "seed": spec.seed}
    for block in identity_blocks(effective, spec.method):
        out[block] = effective.block(block).canonical()
    # Where a task caches what it generates is not part of what it generates.
    for field in getattr(type(effective.task), "not_identity", ()):
        out["task"].pop(field, None)
    out["analyses"] = [{"name": n, **(c.canonical() if c else {})} for n, c in effective.analysis_list()]
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


def trial_hash(sweep: SweepConfig, spec: TrialSpec) -> str:
    return stable_hash(identity(sweep, spec), 20)


def pack_keys(sweep: SweepConfig, specs: list[TrialSpec]) -> list[str | None]:
    """For each trial, a key that trials which may train as one pack share (on the driver, before
    anything is built: its packable method's task, model and training settings and its data budget),
    or None for a trial that trains alone. `run_pack` checks the rest once the models are built."""
    if sweep.resources.pack == 1:
        return [None] * len(specs)
    settings: dict[tuple, str] = {}
    keys: list[str | None] = []
    for spec in specs:
        if not get_method(spec.method).packable:
            keys.append(None)
            continue
        at = (spec.method, json.dumps(spec.axes, sort_keys=True, default=str))
        if at not in settings:  # one effective config per method and axis values, not per trial
            eff = sweep.effective(spec.method, spec.axes)
            blocks = [eff.task.canonical(), eff.model.canonical(), eff.training.canonical()]
            blocks.append(eff.resources.mixed_precision)
            settings[at] = json.dumps(blocks, sort_keys=True, default=str)
        keys.append(f"{spec.data_fraction}|{settings[at]}")
    return keys


def near_equal(n: int, parts: int) -> list[int]:
    """`n` split into `parts` sizes that differ by at most one, larger first: 33 in 2 is [17, 16]."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def packs_upstream(sweep: SweepConfig) -> bool:
    """Whether artifact kinds that can (`ArtifactKind.packs_seeds`) train several seeds as one pack:
    `resources.pack_upstream` (off by default; never where trials do not pack). A function of the
    config only, so the driver and every worker agree on the keys and identities."""
    return bool(sweep.resources.pack_upstream) and sweep.resources.pack != 1


def series_of(config: dict[str, Any]) -> str:
    """The report's series key: the trial's identity without seed and budget."""
    return stable_hash({k: v for k, v in config.items() if k not in ("seed", "data_fraction")})


# --- artifacts -----------------------------------------------------------------------------


def fresh_model(sweep: SweepConfig, task, seed: int, stage: str) -> nn.Module:
    """A new model whose default init is a function of (seed, stage) only."""
    with seeded_init(seed, stage):
        return task.build_model(sweep.model)


def pick_device(sweep: SweepConfig) -> torch.device:
    """cuda when the trial was given a GPU and one is visible, else cpu."""
    if sweep.resources.gpu > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class TrialSupervisor:
    """How a trial's training runs are supervised: checkpoints in the artifact store (one
    `Interval` for the whole trial), the stop request, and a report per epoch."""

    def __init__(
        self,
        sweep: SweepConfig,
        store: ArtifactStore | None,
        report: Report | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.checkpoints = CheckpointStore(store) if store is not None else None
        self.interval = Interval(sweep.resources.checkpoint_every_s)
        self.report, self.should_stop = report, should_stop

    def checkpointer(self, owner: str) -> Checkpointer | None:
        return Checkpointer(self.checkpoints, owner, self.interval) if self.checkpoints is not None else None

    def supervision(self, name: str, checkpointer: Checkpointer | None) -> Supervision:
        """For the runs that train `name` ("train", or an artifact kind), checkpointed by `checkpointer`."""
        on_epoch = self.on_epoch if self.report is not None else None
        return Supervision(name=name, checkpointer=checkpointer, should_stop=self.should_stop, on_epoch=on_epoch)

    def on_epoch(self, label: str, epoch: int, values: dict[str, float]) -> None:
        # "<label>/<name>" keys: one TensorBoard group per training run.
        self.report({"stage": "epoch", "fit": label, "epoch": epoch, **{f"{label}/{k}": v for k, v in values.items()}})


class Upstream:
    """The artifacts of one trial: keys, and (on demand) the loaded objects, via the store. An
    artifact computed here is trained under `supervisor` (default: checkpoints only), its
    checkpoints owned by `<kind>-<key hash>`."""

    def __init__(
        self,
        sweep: SweepConfig,
        spec: TrialSpec,
        store: ArtifactStore | None,
        device: torch.device,
        supervisor: TrialSupervisor | None = None,
    ):
        self.sweep = sweep.effective(spec.method, spec.axes)
        self.spec, self.store, self.device = spec, store, device
        self.supervisor = supervisor or TrialSupervisor(self.sweep, store)
        self.task = self.sweep.build_task()
        self.keys: dict[str, dict] = {}
        self.objects: dict[str, Any] = {}
        self.columns: dict[str, Any] = {}
        self.wait_s = 0.0

    def context(self, kind: str, seed: int | None = None, config: SweepConfig | None = None) -> ArtifactContext:
        """The context of `kind` for this trial, or for another `seed` (a kind that packs seeds) or
        `config` (this trial's with other values of the kind's `shares` paths)."""
        seed = self.spec.seed if seed is None else seed
        config = self.sweep if config is None else config
        art = ARTIFACTS.get(kind)
        key_of, get = self.key, self.get
        if seed != self.spec.seed:  # this trial's artifacts are of its own seed

            def key_of(kind, seed=seed):
                raise ValueError(f"an artifact computed for seed {seed} cannot read {kind!r} of seed {self.spec.seed}")

            get = key_of
        return ArtifactContext(
            task=self.task,
            settings=kind_settings(config, kind),
            seed=seed,
            device=self.device,
            mixed_precision=self.sweep.resources.mixed_precision,
            fresh_model=lambda stage: fresh_model(self.sweep, self.task, seed, stage),
            key_of=key_of,
            get=get,
            packed=art.packs_seeds and packs_upstream(self.sweep),
        )

    def key(self, kind: str) -> dict:
        if kind not in self.keys:
            for dep in ARTIFACTS.get(kind).needs:
                self.key(dep)
            self.keys[kind] = self.store_key(self.context(kind), kind)
        return self.keys[kind]

    def store_key(self, ctx: ArtifactContext, kind: str) -> dict:
        """The store key of `kind`'s artifact in `ctx`: what its `key(ctx)` says (its upstream keys,
        its grid point, the task's fields of its stage), every block it may read (`reads`), and the
        source of the plug-in modules it runs (`code`: the kind's, the task's and the model's)."""
        art = ARTIFACTS.get(kind)
        key = {**art.key(ctx), "reads": ctx.settings.canonical()}
        code = plugin_sources([art, *stage_plugins(self.sweep)])
        return {**key, "code": code} if code else key

    def stamp(self, computed: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
        """Artifacts just computed, their meta recording the code version that computed them."""
        return [(tensors, {**meta, "code_version": self.spec.code_version}) for tensors, meta in computed]

    def compute_shared(self, kind: str, points: list[dict[str, Any]]) -> None:
        """Store the `kind` artifacts of this trial's context at each of `points` (values of the
        kind's `shares` paths, and `seed` for a kind that packs seeds), the missing ones from one
        `compute_many`; loads nothing for the trial."""
        art = ARTIFACTS.get(kind)
        contexts = []
        for point in points:
            values = {path: value for path, value in point.items() if path != "seed"}
            contexts.append(self.context(kind, point.get("seed"), self.sweep.with_values(values)))
        keys = [self.store_key(one, kind) for one in contexts]

        used = []  # the run's checkpointer, cleared once its artifacts are stored

        def compute(missing: list[int]):
            used.append(self.supervisor.checkpointer(f"{kind}-{stable_hash([keys[i] for i in missing], 24)}"))
            with supervised(self.supervisor.supervision(kind, used[0])):
                return self.stamp(art.compute_many([contexts[i] for i in missing]))

        self.store.get_or_compute_many(kind, keys, compute)
        if used and used[0] is not None:
            used[0].clear()

    def get(self, kind: str) -> Any:
        if kind not in self.objects:
            art, ctx, key = ARTIFACTS.get(kind), self.context(kind), self.key(kind)
            checkpointer = self.supervisor.checkpointer(f"{kind}-{stable_hash(key, 24)}")

            def compute():
                with supervised(self.supervisor.supervision(kind, checkpointer)):
                    return self.stamp([art.compute(ctx)])[0]

            fetched = self.store.get_or_compute(kind, key, compute)
            if fetched.computed and checkpointer is not None:
                checkpointer.clear()
            self.objects[kind] = art.load(ctx, fetched.tensors, fetched.meta)
            self.columns.update(art.columns(fetched.meta))
            self.columns[f"{kind}_computed"] = fetched.computed
            self.wait_s += fetched.wait_s
        return self.objects[kind]


def trial_needs(sweep: SweepConfig, spec: TrialSpec, tuning: bool = False) -> list[str]:
    """Artifact kinds the trial needs (its method's and its analyses'), each after its own needs."""
    analyses = [] if tuning else [name for name, _ in sweep.effective(spec.method, spec.axes).analysis_list()]
    return needed_kinds([spec.method], analyses)


def upstream_keys(sweep: SweepConfig, spec: TrialSpec) -> list[tuple[str, str]]:
    """(kind, key hash) of every artifact the trial needs, in the order it needs them."""
    up = Upstream(sweep, spec, None, torch.device("cpu"))
    return [(kind, stable_hash(up.key(kind), 24)) for kind in trial_needs(sweep, spec)]


# --- the trial -----------------------------------------------------------------------------


def run_trial(
    sweep: SweepConfig,
    spec: TrialSpec,
    store: ArtifactStore,
    report: Report | None = None,
    device: torch.device | None = None,
    tuning: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run one trial and return its result row (see `orchestrator.results.COLUMNS`).

    `tuning=True` (used by `instill tune`) stops after training: no test split and no analysis is
    ever read, so tuning sees validation data only. `report` gets a result after every stage and
    every epoch. `should_stop()` is asked at every epoch end: when True, the run saves a checkpoint
    and `methods.training.Interrupted` is raised (no row); running the trial again resumes it.
    """
    trial = Trial(sweep, spec, store, report, device, tuning, should_stop)
    trial.prepare()
    return trial.train_alone()


def run_pack(
    sweep: SweepConfig,
    specs: list[TrialSpec],
    store: ArtifactStore,
    limit: int,
    device: torch.device | None = None,
    should_stop: Callable[[], bool] | None = None,
    calibrate_k: bool = False,
    report: Callable[[TrialSpec, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any] | BaseException]:
    """Run trials whose models can train together, as packs of at most `limit` models
    (`methods.packing.fit_packed`); the rest alone. `calibrate_k`: packs of the K that
    `methods.packing.calibrate` measures (at most `limit`), once per kind of pack in this process.
    Each trial's upstream, build, evaluation and analyses are as in `run_trial`. Returns each
    trial's row, or the exception that ended it (in set-up, or a diverging model: the others go on).
    `should_stop()` is asked at every epoch end: when True, `Interrupted` is raised (a pack saves
    its checkpoint first, where the sweep keeps checkpoints).

    Trials pack when their methods are packable, their training settings are the same, their models
    have the same parameters and buffers (names, shapes, which train) and their data the same sizes:
    `fit_packed` checks the rest and refuses (`NotPackable`) before training, and those trials train
    alone. A pack's training time is shared out equally among its trials' `train_s`, so the sum of
    their `total_s` is the compute spent. A pack checkpoints its training as a trial does, owned by
    its set of trials (a stop or a lost worker resumes it when the same pack forms again), and
    reports each trial's epochs and stages to `report(spec, metrics)`; its rows have `pack` = its number of models
    and `packed` = True. A packable trial with no company trains as a pack of one: a packed model's
    numbers do not depend on what else is in its pack (`methods.packing`), so a trial gives the same
    row whichever packs a run forms (resumed, extended, on another machine)."""
    outcomes: dict[int, dict[str, Any] | BaseException] = {}
    ready: dict[tuple, list[tuple[int, Trial]]] = {}
    for i, spec in enumerate(specs):
        reporter = None if report is None else functools.partial(report, spec)
        trial = Trial(sweep, spec, store, reporter, device, should_stop=should_stop)
        try:
            trial.prepare()
        except Interrupted:
            raise
        except Exception as error:
            outcomes[i] = error
            continue
        ready.setdefault(trial.pack_key(), []).append((i, trial))
    for key, members in ready.items():
        k = max(1, limit)
        if calibrate_k and len(members) > 1:
            k = _calibrated(key, members[0][1], min(k, len(members)))
        # Packs of near-equal size: 33 trials at K = 32 train as 17 + 16, not 32 + 1 alone.
        sizes = near_equal(len(members), math.ceil(len(members) / k))
        start = 0
        for size in sizes:
            outcomes.update(_train_pack(members[start : start + size], should_stop))
            start += size
    return [outcomes[i] for i in range(len(specs))]


_CALIBRATED: dict[tuple, int] = {}  # (pack key, limit) -> K, per process


def _calibrated(key: tuple, trial: Trial, limit: int) -> int:
    """The measured pack size for trials like `trial` (`methods.packing.calibrate`), at most `limit`."""
    if (key, limit) not in _CALIBRATED:
        objective = trial.method.objective(trial.ctx, trial.model)
        if packable([objective], [trial.ctx.data]) is not None:
            _CALIBRATED[(key, limit)] = limit  # `_train_pack` trains them alone anyway
        else:
            resources = trial.effective.resources
            try:
                found = calibrate(objective, trial.ctx.data, trial.effective.training, limit,
                                  memory_fraction=min(1.0, resources.gpu) if resources.gpu > 0 else 1.0,
                                  mixed_precision=resources.mixed_precision)  # fmt: skip
            except Exception as error:  # measuring must not cost the trials: pack as many as allowed
                print(f"[instill] pack size not measured ({error!r}); packs of at most {limit}", flush=True)
                _CALIBRATED[(key, limit)] = limit
            else:
                rates = ", ".join(f"K={k}: {r:.0f}" for k, r in found.rates.items())
                print(f"[instill] pack size {found.k} ({found.stopped}; model-steps/s {rates})", flush=True)
                _CALIBRATED[(key, limit)] = found.k
    return _CALIBRATED[(key, limit)]


def _train_pack(members: list[tuple[int, Trial]], should_stop) -> dict[int, dict[str, Any] | BaseException]:
    trials = [t for _, t in members]
    outcomes: dict[int, dict[str, Any] | BaseException] = {}
    if not all(getattr(t.method, "packable", False) for t in trials):
        objectives, reason = [], "a method that trains alone"
    else:
        objectives = [t.method.objective(t.ctx, t.model) for t in trials]
        reason = packable(objectives, [t.ctx.data for t in trials])
    start = time.perf_counter()
    # The pack's checkpoints: owned by its set of trials (the same pending trials form the same
    # packs in the next run, which then resumes it).
    owner = "pack-" + stable_hash(sorted(t.row["trial_hash"] for t in trials), 24)
    checkpointer = trials[0].supervisor.checkpointer(owner) if reason is None else None
    if reason is None:
        try:
            with supervised(
                Supervision(name="train", checkpointer=checkpointer, should_stop=should_stop, on_epoch=None)
            ):
                results = fit_packed(
                    objectives,
                    [t.ctx.data for t in trials],
                    trials[0].effective.training,
                    [t.train_generator() for t in trials],
                    mixed_precision=trials[0].effective.resources.mixed_precision,
                    # each trial's epoch reports (live curves) to its own observer, as alone
                    observers=[t.supervisor.on_epoch if t.supervisor.report is not None else None for t in trials],
                )
        except NotPackable as refused:  # found by its first forward, before anything trained
            reason = str(refused)
    if reason is not None:
        for i, trial in members:
            try:
                outcomes[i] = trial.train_alone()
            except Interrupted:
                raise
            except Exception as error:
                outcomes[i] = error
        return outcomes
    if checkpointer is not None:
        checkpointer.clear()
    share = (time.perf_counter() - start) / len(trials)
    for (i, trial), result in zip(members, results, strict=True):
        if isinstance(result, BaseException):
            outcomes[i] = result
            continue
        try:  # evaluation and analyses: a failure is this trial's
            trial.times["train_s"] = share
            trial.clock = time.perf_counter()
            trial.trained(result, timed=False)
            trial.row.update(pack=len(trials), packed=True)
            outcomes[i] = trial.finish()
        except Exception as error:
            outcomes[i] = error
    return outcomes


class Trial:
    """One trial in its stages: `prepare` (upstream artifacts, data, the method's model), then
    training (the caller's: alone or packed), `trained(result)`, `finish()` (evaluation, analyses,
    the row)."""

    def __init__(
        self,
        sweep: SweepConfig,
        spec: TrialSpec,
        store: ArtifactStore,
        report: Report | None = None,
        device: torch.device | None = None,
        tuning: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.sweep, self.spec, self.store, self.tuning = sweep, spec, store, tuning
        self.report = report or (lambda metrics: None)
        self.device = device or pick_device(sweep)
        self.row: dict[str, Any] = base_row(sweep, spec)
        self.effective = sweep.effective(spec.method, spec.axes)
        self.task, self.method = self.effective.build_task(), get_method(spec.method)
        self.supervisor = TrialSupervisor(self.effective, store, self.report, should_stop)
        self.times: dict[str, float] = {}
        self.clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[f"{stage}_s"] = self.times.get(f"{stage}_s", 0.0) + now - self.clock
        self.clock = now

    def train_generator(self) -> torch.Generator:
        return torch_generator(self.spec.seed, "downstream_train")

    def pack_key(self) -> tuple:
        """Trials with equal keys may train as one pack: packable method, same training settings,
        same parameters and buffers (names, shapes, dtypes, which train), same data sizes."""
        if not getattr(self.method, "packable", False):
            return ("alone", id(self))
        model = self.model
        # By name: a mask loaded from the store and one just discovered may list their tensors in another order.
        tensors = tuple(sorted((n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in model.named_parameters()))
        buffers = tuple(sorted((n, tuple(b.shape), str(b.dtype)) for n, b in model.named_buffers()))
        sizes = (len(self.ctx.data.train), tuple(sorted((k, len(v)) for k, v in self.ctx.data.streams.items())))
        return (type(model), tensors, buffers, sizes, json.dumps(self.effective.training.canonical(), sort_keys=True))

    def train_alone(self) -> dict[str, Any]:
        """Train with the method's own `train` (checkpointed, stoppable, reporting epochs); the row."""
        checkpointer = self.supervisor.checkpointer(self.row["trial_hash"])
        with supervised(self.supervisor.supervision("train", checkpointer)):
            result = self.method.train(
                self.ctx, self.model, self.train_generator(), mixed_precision=self.effective.resources.mixed_precision
            )
        self.trained(result)
        row = self.finish()
        if checkpointer is not None:
            checkpointer.clear()
        return row

    def prepare(self) -> None:
        spec, seed, effective = self.spec, self.spec.seed, self.effective
        self.row["started_at"] = time.time()
        self.row["worker"] = f"{platform.node()}:{os.getpid()}"
        self.clock = time.perf_counter()
        self.upstream = upstream = Upstream(self.sweep, spec, self.store, self.device, self.supervisor)
        for kind in trial_needs(self.sweep, spec, self.tuning):
            upstream.get(kind)
            self.lap(kind)
            self.report({"stage": kind, **self.times})
        self.row.update(upstream.columns)
        self.times["wait_s"] = upstream.wait_s

        task = self.task
        data = task.downstream_data(seed, spec.data_fraction)
        self.make_fresh = lambda stage: fresh_model(effective, task, seed, stage)
        settings = method_settings(effective, spec.method)
        self.ctx = MethodContext(
            task=task,
            data=data,
            config=effective.blocks.get(spec.method),
            training=effective.training,
            settings=settings,
            artifacts={kind: upstream.objects[kind] for kind in self.method.needs},
            generator=torch_generator(seed, f"method:{spec.method}"),
            device=self.device,
            fresh_model=self.make_fresh,
        )
        self.model = self.method.build(self.ctx).to(self.device)
        self.lap("build")
        self.report({"stage": "build", **self.times})

    def trained(self, result, timed: bool = True) -> None:
        self.row.update(val_acc=result.best_val_acc, best_epoch=result.best_epoch, epochs_run=result.epochs_run)
        self.row["measurements_json"] = json.dumps(result.measurements)
        if timed:
            self.lap("train")
        self.report({"stage": "train", "val_acc": result.best_val_acc, **self.times})

    def finish(self) -> dict[str, Any]:
        effective, data, model, row = self.effective, self.ctx.data, self.model, self.row
        if not self.tuning:
            row["test_acc"] = evaluate(model, data.evals["test"], effective.training.eval_batch_size)["y"]
            self.lap("eval")
            for name, config in effective.analysis_list():
                analysis = ANALYSES.get(name)
                actx = AnalysisContext(
                    task=self.task,
                    data=data,
                    artifacts={kind: self.upstream.objects[kind] for kind in analysis.needs},
                    fresh_model=self.make_fresh,
                    generator=torch_generator(self.spec.seed, f"analysis:{name}"),
                    device=self.device,
                    eval_batch_size=effective.training.eval_batch_size,
                    method=self.spec.method,
                    seed=self.spec.seed,
                    settings=analysis_settings(effective, name),
                )
                row.update(analysis.check(analysis.run(actx, model, config)))
                self.lap(f"analysis_{name}")
        times = self.times
        # Compute time: the stages' wall time less the time spent waiting on another trial's lock.
        times["total_s"] = sum(v for k, v in times.items() if k != "wait_s") - times["wait_s"]
        row.update(times, status="done", device=str(self.device), finished_at=time.time())
        row.setdefault("pack", 1)
        row.setdefault("packed", False)
        self.report({"stage": "done", "row_json": json.dumps(row), "val_acc": row["val_acc"]})
        return row


def base_row(sweep: SweepConfig, spec: TrialSpec) -> dict[str, Any]:
    """The identifying columns of a trial's row, filled for done and failed trials alike."""
    effective = sweep.effective(spec.method, spec.axes)
    config = identity(sweep, spec)
    row = {
        "trial": spec.name,
        "trial_hash": stable_hash(config, 20),
        "series": series_of(config),
        "task": effective.task.name,
        "model": effective.model.name,
        "method": spec.method,
        "data_fraction": spec.data_fraction,
        "n_train": effective.build_task().downstream_size(spec.data_fraction),
        "seed": spec.seed,
        "config_json": json.dumps(config, sort_keys=True),  # what this trial ran with
        "code_version": spec.code_version,
        "versions": versions_json(),
    }
    for path in sweep.grid:
        row[path] = spec.axes.get(path)
    return row


def failed_row(sweep: SweepConfig, spec: TrialSpec, error: BaseException | str) -> dict[str, Any]:
    message = error if isinstance(error, str) else "".join(traceback.format_exception_only(error)).strip()
    return {**base_row(sweep, spec), "status": "failed", "error": message}


@functools.cache
def versions_json() -> str:
    """The versions, once per process (package metadata is read from disk)."""
    return json.dumps(versions(), sort_keys=True)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("instill", "torch", "ray", "numpy", "pyarrow", "pydantic"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def artifact_key(sweep: SweepConfig, spec: TrialSpec, kind: str) -> dict:
    """The key of the `kind` artifact that `spec`'s trial uses (without computing anything)."""
    return Upstream(sweep, spec, None, torch.device("cpu")).key(kind)
