"""Trials that train together: which may share a pack (`pack_keys` on the driver, `Trial.pack_key`
once built), and `run_pack`, which trains them as packs (`methods.packing.fit_packed`) and the rest alone.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from common.config import stable_hash
from methods import get_method
from methods.packing import NotPackable, calibrate, fit_packed, packable
from methods.training import Interrupted, Supervision, compiling, supervised
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import SweepConfig
from orchestrator.trial.grid import TrialSpec
from orchestrator.trial.run import Trial


def pack_keys(sweep: SweepConfig, specs: list[TrialSpec]) -> list[str | None]:
    """For each trial, a key that trials which may train as one pack share (on the driver, before
    anything is built: its packable method's task, model and training settings and its data budget),
    or None for a trial that trains alone. `run_pack` checks the rest once the models are built."""
    if sweep.resources.pack == 1:
        return [None] * len(specs)
    keys: list[str | None] = []
    for spec in specs:
        if not get_method(spec.method).packable:
            keys.append(None)
            continue
        eff = spec.config(sweep)
        blocks = [eff.task.canonical(), eff.model.canonical(), eff.training.canonical(), eff.resources.mixed_precision]
        keys.append(f"{spec.data_fraction}|{json.dumps(blocks, sort_keys=True, default=str)}")
    return keys


def near_equal(n: int, parts: int) -> list[int]:
    """`n` split into `parts` sizes that differ by at most one, larger first: 33 in 2 is [17, 16]."""
    return [n // parts + (i < n % parts) for i in range(parts)]


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
    and `packed` = True, and `compiled` whether its steps ran compiled. A packable trial with no company trains
    as a pack of one: a packed model's numbers do not depend on what else is in its pack
    (`methods.packing`), so a trial gives the same row whichever packs a run forms (resumed, extended,
    on another machine)."""
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
            supervision = Supervision(name="train", checkpointer=checkpointer, should_stop=should_stop, on_epoch=None)
            with supervised(supervision), compiling(trials[0].effective.resources.compile) as record:
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
            compiled = {"compiled": record.compiled > 0, "compiled_whole": record.whole > 0}
            trial.row.update(pack=len(trials), packed=True, **compiled)
            outcomes[i] = trial.finish()
        except Exception as error:
            outcomes[i] = error
    return outcomes
