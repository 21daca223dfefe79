"""The Ray Tune layer: runs the trials of a sweep in parallel and collects their rows.

The output directory holds everything a sweep produced:

    OUT/sweep.json          the resolved config (refuses to mix two different sweeps in one dir)
    OUT/rows/<trial>.json   one row per finished trial, written by the driver as results arrive
    OUT/results.parquet     every row of the sweep's grid, rebuilt at the end of each run
    OUT/artifacts/          source models and masks (unless storage.artifacts points elsewhere)
    OUT/tune/               Ray Tune's own experiment state and per-trial logs

Rows are written by the driver (a Tune callback), so workers on other nodes need no shared disk
for results. A run pointed at a directory that already holds rows runs only the missing or failed
trials: an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from methods import get_method
from orchestrator import results
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import ConfigError, SweepConfig, load_sweep
from orchestrator.trial import TrialSpec, expand, failed_row, run_trial, upstream_keys
from common.config import stable_hash

log = logging.getLogger(__name__)


class SweepMismatch(ConfigError):
    """The output directory holds a different sweep."""


@dataclasses.dataclass
class SweepOutcome:
    out_dir: Path
    table: Any  # pandas.DataFrame of every row
    ran: int  # trials run in this invocation
    skipped: int  # trials already done before it
    failed: int
    wall_s: float


# --- trial ordering ----------------------------------------------------------------------


def order_trials(sweep: SweepConfig, specs: list[TrialSpec], concurrency: int) -> list[TrialSpec]:
    """Order trials so that trials running side by side rarely need the same missing artifact.

    Trials are taken largest budget first (the long ones start early, so the sweep's tail is
    short), then arranged in waves of `concurrency` where no two trials of a wave would compute
    the same upstream artifact: the second would only wait on the first's lock.
    """
    pending = sorted(specs, key=lambda s: -s.data_fraction)
    ready: set[tuple[str, str]] = set()
    ordered: list[TrialSpec] = []
    while pending:
        wave, claimed = [], set()
        for spec in pending:
            needs = {k for k in upstream_keys(sweep, spec) if k not in ready}
            if needs & claimed:
                continue
            wave.append(spec)
            claimed |= needs
            if len(wave) == concurrency:
                break
        for spec in wave:
            pending.remove(spec)
        ordered += wave
        ready |= claimed
    return ordered


# --- output directory --------------------------------------------------------------------


def prepare_out_dir(sweep: SweepConfig, out_dir: Path, force: bool = False) -> None:
    """Create OUT, or check that it holds this same sweep. Never deletes anything."""
    marker = out_dir / "sweep.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("config_hash") != sweep.config_hash and not force:
            raise SweepMismatch(
                f"{out_dir} holds a different sweep ({previous.get('name')!r}, config hash "
                f"{previous.get('config_hash')}); pass another --out, or --force to run this sweep there "
                "(finished rows of the other sweep are kept but not reused)"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rows").mkdir(exist_ok=True)
    for stale in (out_dir / "rows").glob("*.running"):  # left by a driver that was killed
        stale.unlink()
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"name": sweep.name, "config_hash": sweep.config_hash, "config": sweep.canonical()}, indent=1)
    )
    os.replace(tmp, marker)


def row_path(out_dir: Path, spec: TrialSpec) -> Path:
    return out_dir / "rows" / f"{spec.name}.json"


def write_row(out_dir: Path, spec: TrialSpec, row: dict[str, Any]) -> None:
    path = row_path(out_dir, spec)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, default=str))
    os.replace(tmp, path)


def read_row(out_dir: Path, spec: TrialSpec, config_hash: str) -> dict[str, Any] | None:
    path = row_path(out_dir, spec)
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    return row if row.get("config_hash") == config_hash else None


def store_for(sweep: SweepConfig, out_dir: Path) -> ArtifactStore:
    return ArtifactStore(sweep.storage.artifacts or out_dir / "artifacts")


# --- Ray ---------------------------------------------------------------------------------


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at `address`, or start a quiet local Ray (the embedded default)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The legacy console reporter honours verbose=0; the new one prints tables regardless.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)


def _upstream(sweep_json: str, store_root: str, kind: str, seed: int, sparsity: float | None) -> float:
    """Runs inside a Ray worker: compute one source model or mask into the store."""
    import torch

    from orchestrator.trial import get_mask, get_source, pick_device

    sweep = load_sweep(json.loads(sweep_json))
    torch.set_num_threads(max(1, int(sweep.resources.cpu)))
    store, task, device = ArtifactStore(store_root), sweep.build_task(), pick_device(sweep)
    start = time.perf_counter()
    source, _ = get_source(sweep, task, seed, store, device)
    if kind == "mask":
        get_mask(sweep, task, seed, sparsity, source, store)
    return time.perf_counter() - start


def precompute(sweep: SweepConfig, store: ArtifactStore, specs: list[TrialSpec], concurrency: int) -> dict[str, str]:
    """Compute the missing upstream artifacts of `specs`, each once, before any trial runs.

    Sources first, then masks, as Ray tasks with a trial's resources and at most `concurrency` at a
    time. This makes computation exactly-once on any storage, object stores included, and keeps
    trials from idling on each other's locks. A failure here is reported and left to the trials
    that need the artifact: they retry it and record the error. Returns {artifact: error}.
    """
    import ray

    from orchestrator.trial import mask_key, source_key

    remote = ray.remote(_upstream).options(num_cpus=sweep.resources.cpu, num_gpus=sweep.resources.gpu)
    errors: dict[str, str] = {}
    jobs: dict[tuple[str, str], tuple] = {}  # (kind, key hash) -> job: one entry per distinct artifact
    for spec in specs:
        method, effective = get_method(spec.method), sweep.for_method(spec.method)
        as_json = json.dumps(effective.canonical())
        if method.uses_source:
            key = source_key(effective, spec.seed)
            jobs.setdefault(("source", stable_hash(key)), ("source", spec.seed, None, as_json, key))
        if method.uses_mask:
            key = mask_key(effective, spec.seed, spec.sparsity)
            jobs.setdefault(("mask", stable_hash(key)), ("mask", spec.seed, spec.sparsity, as_json, key))
    # One existence check per distinct artifact (each is a request on an object store), not per trial.
    missing = [job[:4] for job in jobs.values() if not store.exists(job[0], job[4])]
    sources = [j for j in missing if j[0] == "source"]
    masks = [j for j in missing if j[0] == "mask"]
    phases = [
        sorted(sources, key=lambda j: (j[1], j[3])),
        sorted(masks, key=lambda j: (j[1], j[2], j[3])),
    ]
    for jobs in phases:
        if not jobs:
            continue
        print(f"[instill] computing {len(jobs)} {jobs[0][0]} artifact(s) before the trials", file=sys.stderr)
        pending, running = list(jobs), {}
        while pending or running:
            while pending and len(running) < concurrency:
                job = pending.pop(0)
                if job[0] == "mask" and f"source seed {job[1]}" in errors:
                    continue  # its source failed: the trials will report it
                kind, seed, sparsity, as_json = job
                running[remote.remote(as_json, store.location, kind, seed, sparsity)] = job
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as err:  # reported, then left to the trials (see docstring)
                name = f"{job[0]} seed {job[1]}" + (f" sparsity {job[2]}" if job[2] is not None else "")
                errors[name] = str(err).strip().splitlines()[-1]
                print(f"[instill] {name} failed: {errors[name]}", file=sys.stderr)
    return errors


def _trainable(config: dict[str, Any], sweep_json: str, store_root: str) -> None:
    """Runs inside a Ray worker: one trial, reporting after every stage."""
    import torch
    from ray import tune

    sweep = load_sweep(json.loads(sweep_json))
    spec = TrialSpec(**config["spec"])
    torch.set_num_threads(max(1, int(sweep.resources.cpu)))
    if sweep.resources.gpu > 0 and torch.cuda.is_available() and sweep.resources.gpu < 1:
        # Fractional GPUs only steer Ray's scheduling; cap memory so packed trials cannot starve each other.
        torch.cuda.set_per_process_memory_fraction(sweep.resources.gpu)

    def report(metrics: dict[str, Any]) -> None:
        # Goes to the trial's own log file (RunConfig(log_to_file=True)), not the console.
        timing = {k: round(v, 2) for k, v in metrics.items() if k.endswith("_s")}
        print(f"[{spec.name}] stage {metrics['stage']} {timing}", flush=True)
        tune.report(metrics)

    run_trial(sweep, spec, ArtifactStore(store_root), report=report)


def _cost(spec: TrialSpec) -> float:
    """Relative cost of a trial for the ETA: training time grows with the budget; 0.1 stands for the
    fixed part (evaluation, set-up)."""
    return spec.data_fraction + 0.1


def _make_callbacks(out_dir: Path, sweep: SweepConfig, todo: list[TrialSpec], done_before: int):
    total = len(todo)
    total_cost = sum(_cost(s) for s in todo)
    from ray import tune

    class Rows(tune.Callback):
        """Writes each trial's row on the driver as soon as it finishes or finally fails."""

        def __init__(self):
            self.done = self.failed = self.running = 0
            self.cost_done = 0.0

        def on_step_end(self, iteration, trials, **info):
            # Counted from Tune's own states: with reused actors, on_trial_start is not always called.
            self.running = sum(t.status == "RUNNING" for t in trials)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("stage") == "source":  # a trial's first report: mark it running for `status`
                row_path(out_dir, TrialSpec(**trial.config["spec"])).with_suffix(".running").touch()

        def _finish(self, trial) -> TrialSpec:
            spec = TrialSpec(**trial.config["spec"])
            self.cost_done += _cost(spec)
            row_path(out_dir, spec).with_suffix(".running").unlink(missing_ok=True)
            return spec

        def on_trial_complete(self, iteration, trials, trial, **info):
            spec = self._finish(trial)
            last = trial.last_result or {}
            if last.get("stage") != "done":
                write_row(out_dir, spec, failed_row(sweep, spec, "trial ended without a final result"))
                self.failed += 1
                return
            write_row(out_dir, spec, json.loads(last["row_json"]))
            self.done += 1

        def on_trial_error(self, iteration, trials, trial, **info):
            spec = self._finish(trial)
            message = _error_text(trial)
            write_row(out_dir, spec, failed_row(sweep, spec, message))
            self.failed += 1

    class Progress(tune.Callback):
        """One live summary line: done, running, pending, failed, elapsed, ETA."""

        def __init__(self, rows: Rows):
            self.rows = rows
            self.start = time.monotonic()
            self.last_print = 0.0

        def line(self) -> str:
            r = self.rows
            finished = r.done + r.failed
            running = min(r.running, total - finished)  # Tune's states lag completions by a step
            pending = total - finished - running
            elapsed = time.monotonic() - self.start
            # Largest budgets run first, so a plain count would overstate the time left.
            eta = "?" if finished == 0 else _hms(elapsed / r.cost_done * (total_cost - r.cost_done))
            return (
                f"[instill] {done_before + r.done}/{done_before + total} done, {running} running, "
                f"{pending} pending, {r.failed} failed | elapsed {_hms(elapsed)} | ETA {eta}"
            )

        def on_step_end(self, iteration, trials, **info):
            now = time.monotonic()
            if now - self.last_print >= (1.0 if sys.stderr.isatty() else 30.0):
                self._print()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._print()

        on_trial_error = on_trial_complete

        def on_experiment_end(self, trials, **info):
            self._print(final=True)

        def _print(self, final: bool = False):
            self.last_print = time.monotonic()
            stream = sys.stderr  # looked up at print time: the Tuner pickles its callbacks
            tty = stream.isatty()
            end = "\n" if (final or not tty) else ""
            prefix = "\r\033[K" if tty else ""
            stream.write(prefix + self.line() + end)
            stream.flush()

    rows = Rows()
    return rows, [rows, Progress(rows)]


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text = Path(path).read_text().strip().splitlines()
        # The last line of a traceback names the exception and its message.
        return text[-1] if text else "unknown error"
    return str(getattr(trial, "error_msg", None) or "unknown error")


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def run_sweep(
    sweep: SweepConfig,
    out_dir: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    force: bool = False,
) -> SweepOutcome:
    """Run every unfinished trial of `sweep` on Ray Tune and write OUT/results.parquet."""
    from ray import tune

    out_dir = Path(out_dir).resolve()
    prepare_out_dir(sweep, out_dir, force=force)
    store = store_for(sweep, out_dir)
    specs = expand(sweep)
    todo = [s for s in specs if (read_row(out_dir, s, sweep.config_hash) or {}).get("status") != "done"]
    start = time.monotonic()
    if todo:
        start_ray(address, num_cpus=num_cpus, num_gpus=None)
        import ray

        cpus = ray.cluster_resources().get("CPU", 1)
        concurrency = max(1, int(cpus // sweep.resources.cpu))
        if sweep.resources.max_concurrent:
            concurrency = min(concurrency, sweep.resources.max_concurrent)
        precompute(sweep, store, todo, concurrency)
        todo = order_trials(sweep, todo, concurrency)
        _, callbacks = _make_callbacks(out_dir, sweep, todo, len(specs) - len(todo))
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, sweep_json=json.dumps(sweep.canonical()), store_root=store.location),
            {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"spec": tune.grid_search([s.model_dump() for s in todo])},
            tune_config=tune.TuneConfig(
                reuse_actors=True,
                max_concurrent_trials=concurrency,
                trial_name_creator=lambda t: TrialSpec(**t.config["spec"]).name,
                trial_dirname_creator=lambda t: f"{TrialSpec(**t.config['spec']).name}-{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S"),
                storage_path=str(out_dir / "tune"),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=callbacks,
                verbose=0,
                # Trial output goes to stdout/stderr files in each trial's directory, synced to OUT/tune.
                log_to_file=True,
                sync_config=tune.SyncConfig(sync_artifacts=True, sync_artifacts_on_checkpoint=False),
            ),
        )
        tuner.fit()
    table = results.collect(out_dir, sweep, specs)
    results.write(table, out_dir / "results.parquet")
    failed = int((table["status"] == "failed").sum()) if len(table) else 0
    return SweepOutcome(
        out_dir=out_dir,
        table=table,
        ran=len(todo),
        skipped=len(specs) - len(todo),
        failed=failed,
        wall_s=time.monotonic() - start,
    )
