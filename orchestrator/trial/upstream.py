"""A trial's upstream artifacts (`Upstream`: keys, and objects loaded or computed via the artifact
store), and the supervision of its training runs (`TrialSupervisor`): each checkpoints into the
store every `resources.checkpoint_every_s`, resumes when the trial reruns (bit for bit on CPU), stops
on request (`Interrupted`) and reports each epoch (`{"stage": "epoch", "fit": "train", "epoch": 3,
"train/<measurement>": ...}`), so Tune logs live curves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from common.config import stable_hash
from common.provenance import plugin_sources
from common.seeding import seeded_init
from methods import ARTIFACTS, ArtifactContext
from methods.training import Supervision, supervised
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoints import Checkpointer, CheckpointStore, Interval
from orchestrator.config import SweepConfig
from orchestrator.trial.grid import TrialSpec, kind_settings, kind_uses, packs_upstream, stage_plugins, trial_needs

Report = Callable[[dict[str, Any]], None]


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
        self.sweep = spec.config(sweep)
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
            for dep in kind_uses(self.sweep)(kind):  # a need this config leaves unread has no key to make
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
            chance = 1 / self.task.feeds().n_classes
            failed = [f"{kind}.{gate}" for gate, ok in art.gates(fetched.meta, chance).items() if not ok]
            self.columns["gates_failed"] = ",".join(filter(None, [self.columns.get("gates_failed", ""), *failed]))
            self.wait_s += fetched.wait_s
        return self.objects[kind]


def upstream_keys(sweep: SweepConfig, spec: TrialSpec) -> list[tuple[str, str]]:
    """(kind, key hash) of every artifact the trial needs, in the order it needs them."""
    up = Upstream(sweep, spec, None, torch.device("cpu"))
    return [(kind, stable_hash(up.key(kind), 24)) for kind in trial_needs(sweep, spec)]


def artifact_key(sweep: SweepConfig, spec: TrialSpec, kind: str) -> dict:
    """The key of the `kind` artifact that `spec`'s trial uses (without computing anything)."""
    return Upstream(sweep, spec, None, torch.device("cpu")).key(kind)
