"""One trial in its stages: upstream artifacts -> method build -> the method's objective in the one
training loop -> evaluation -> analyses -> its row.

`run_trial` is a plain function of (sweep config, trial spec, artifact store): it runs and is tested
without Ray; the Tune layer only adapts it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from common.config import stable_hash
from common.provenance import plugin_sources
from common.seeding import torch_generator
from methods import ANALYSES, AnalysisContext, MethodContext, evaluate, get_method
from methods.training import Interrupted, compiling, supervised
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import SweepConfig
from orchestrator.trial.grid import (
    TrialSpec,
    analysis_entries,
    analysis_settings,
    identity,
    method_settings,
    series_of,
    trial_needs,
)
from orchestrator.trial.upstream import Report, TrialSupervisor, Upstream, fresh_model, pick_device


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
        self.effective = spec.config(sweep)
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
        supervision = self.supervisor.supervision("train", checkpointer)
        with supervised(supervision), compiling(self.effective.resources.compile) as record:
            result = self.method.train(
                self.ctx, self.model, self.train_generator(), mixed_precision=self.effective.resources.mixed_precision
            )
        self.row["compiled"] = record.compiled > 0  # whether any of its training runs stepped compiled
        self.row["compiled_whole"] = record.whole > 0  # ... through the compiled whole step
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
        self.last_state = result.last_state
        self.row["measurements_json"] = json.dumps(result.measurements)
        if timed:
            self.lap("train")
        self.report({"stage": "train", "val_acc": result.best_val_acc, **self.times})

    def finish(self) -> dict[str, Any]:
        effective, data, model, row = self.effective, self.ctx.data, self.model, self.row
        if not self.tuning:
            test, size = data.evals["test"], effective.training.eval_batch_size
            row["test_acc"] = evaluate(model, test, size)["y"]
            row["test_acc_last"] = row["test_acc"]  # the last epoch is the kept one, or no epoch ran
            if self.last_state is not None:  # the last epoch's test accuracy beside the kept epoch's
                kept = {name: t.clone() for name, t in model.state_dict().items()}
                model.load_state_dict(self.last_state)
                row["test_acc_last"] = evaluate(model, test, size)["y"]
                model.load_state_dict(kept)
            self.lap("eval")
            if effective.keep.models:  # before the analyses: what they measure is what is kept
                weights = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
                meta = {"trial": self.spec.name, "training": model.training}
                self.store.put(KEPT_MODELS, kept_key(row["trial_hash"]), weights, meta)
            self.analyse(effective.analysis_list())
        times = self.times
        # Compute time: the stages' wall time less the time spent waiting on another trial's lock.
        times["total_s"] = sum(v for k, v in times.items() if k != "wait_s") - times["wait_s"]
        row.update(times, status="done", device=str(self.device), finished_at=time.time())
        row["threads"] = torch.get_num_threads()  # numbers are bit-identical at one thread count only
        row.setdefault("pack", 1)
        row.setdefault("packed", False)
        row.setdefault("compiled", False)
        row.setdefault("compiled_whole", False)
        self.report({"stage": "done", "row_json": json.dumps(row), "val_acc": row["val_acc"]})
        return row

    def analyse(self, analyses: list[tuple[str, Any]]) -> None:
        """Run `analyses` ((name, config) pairs) on the trained model into the row. An analysis that
        raises is the analysis's failure, not the trial's: its columns stay empty and its message
        goes to `analysis_errors` (JSON, name -> message). A stop request (`Interrupted`) propagates."""
        errors = json.loads(self.row.get("analysis_errors") or "{}")
        for name, config in analyses:
            analysis, effective = ANALYSES.get(name), self.effective
            errors.pop(name, None)
            try:
                actx = AnalysisContext(
                    task=self.task,
                    data=self.ctx.data,
                    artifacts={kind: self.upstream.get(kind) for kind in analysis.needs},
                    fresh_model=self.make_fresh,
                    generator=torch_generator(self.spec.seed, f"analysis:{name}"),
                    device=self.device,
                    eval_batch_size=effective.training.eval_batch_size,
                    method=self.spec.method,
                    seed=self.spec.seed,
                    settings=analysis_settings(effective, name),
                )
                self.row.update(analysis.check(analysis.run(actx, self.model, config)))
            except Interrupted:
                raise
            except Exception as error:
                errors[name] = error_text(error)
                for column in [c for c in self.row if c.startswith(name) and analysis.declares(c)]:
                    del self.row[column]  # a value from an earlier run of it (`instill analyse`) is not this one's
            self.lap(f"analysis_{name}")
        self.row["analysis_errors"] = json.dumps(errors, sort_keys=True) if errors else None


KEPT_MODELS = "trained_model"  # the store's folder of the models `keep: {models: true}` keeps


def kept_key(trial_hash: str) -> dict[str, str]:
    """The store key of a trial's kept model: its identity's hash."""
    return {"trial_hash": trial_hash}


def analyse_trial(
    sweep: SweepConfig,
    spec: TrialSpec,
    store: ArtifactStore,
    row: dict[str, Any],
    analyses: list[tuple[str, Any]],
    device: torch.device | None = None,
) -> dict[str, Any]:
    """`row` (a finished trial's) with `analyses` run on its trained model, rebuilt by the method
    from its upstream artifacts and given the weights the trial kept (`keep: {models: true}`)."""
    trial = Trial(sweep, spec, store, device=device)
    trial.prepare()
    tensors, meta = store.load(KEPT_MODELS, kept_key(row["trial_hash"]))
    trial.model.load_state_dict(tensors)
    trial.model.train(meta["training"])  # the mode the trial's analyses saw
    trial.row, trial.times, trial.clock = dict(row), {}, time.perf_counter()
    trial.analyse(analyses)
    # The row now says it ran them (the report summarises the columns of the analyses it lists); its
    # name, series and so `instill run`'s view of it stay those of the trial's identity.
    config = json.loads(row["config_json"])
    names = {name for name, _ in analyses}
    config["analyses"] = [a for a in config.get("analyses", []) if a["name"] not in names]
    config["analyses"] += analysis_entries(analyses)
    code = {**config.get("code", {}), **plugin_sources([ANALYSES.get(name) for name in names])}
    config.update({"code": code} if code else {})
    return {**trial.row, **trial.times, "config_json": json.dumps(config, sort_keys=True)}


def own_settings(sweep: SweepConfig, method: str) -> str:
    """The row's `own_settings`: the paths `method`'s own layers set (`SweepConfig.own_settings`),
    comma-separated; the report does not require a series and its partner of another method to share them."""
    return ",".join(sweep.own_settings(method))


def base_row(sweep: SweepConfig, spec: TrialSpec) -> dict[str, Any]:
    """The identifying columns of a trial's row, filled for done and failed trials alike."""
    effective, config = spec.config(sweep), identity(sweep, spec)
    row = {
        "trial": spec.name,
        "trial_hash": stable_hash(config, 20),
        "series": series_of(config),
        "own_settings": own_settings(sweep, spec.method),
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
    message = error if isinstance(error, str) else error_text(error)
    return {**base_row(sweep, spec), "status": "failed", "error": message}


def error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(error)).strip()


@functools.cache
def versions_json() -> str:
    """Python's and the packages' versions, once per process (package metadata is read from disk)."""
    out = {"python": platform.python_version()}
    for package in ("instill", "torch", "ray", "numpy", "pyarrow", "pydantic"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return json.dumps(out, sort_keys=True)
