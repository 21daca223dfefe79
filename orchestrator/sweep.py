"""Running a sweep: the trials not yet finished in OUT, on Ray Tune, then OUT/results.parquet.

The pieces live beside this module: `outdir` (the output directory and its rows), `ray_session`
(joining or starting Ray), `upstream` (artifacts computed before the trials), `callbacks` (rows
written on the driver, the progress line). Rows are written by the driver, so workers on other nodes
need no shared disk for results. A run pointed at a directory that already holds rows runs only the
trials without a finished row: an interrupted sweep resumes where it stopped, and a grown sweep runs
only what is new.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Any

from orchestrator import results
from orchestrator.artifacts import ArtifactStore
from orchestrator.callbacks import make_callbacks
from orchestrator.config import SweepConfig, load_sweep
from orchestrator.outdir import SweepMismatch, prepare_out_dir, read_row, store_for
from orchestrator.ray_session import concurrency as cluster_concurrency
from orchestrator.ray_session import start_ray
from orchestrator.trial import TrialSpec, expand, run_trial, upstream_keys
from orchestrator.upstream import precompute

__all__ = ["SweepMismatch", "SweepOutcome", "order_trials", "run_sweep", "start_ray"]


@dataclasses.dataclass
class SweepOutcome:
    out_dir: Path
    table: Any  # pandas.DataFrame of every row of the current grid
    ran: int  # trials run in this invocation
    skipped: int  # trials already done before it
    failed: int
    wall_s: float


def order_trials(sweep: SweepConfig, specs: list[TrialSpec], concurrency: int) -> list[TrialSpec]:
    """Order trials so that trials running side by side rarely need the same missing artifact.

    Trials are taken largest budget first (the long ones start early, so the sweep's tail is
    short), then arranged in waves of `concurrency` where no two trials of a wave would compute
    the same upstream artifact: the second would only wait on the first's lock.
    """
    pending = sorted(specs, key=lambda s: -s.data_fraction)
    needs = {id(s): set(upstream_keys(sweep, s)) for s in pending}
    ready: set[tuple[str, str]] = set()
    ordered: list[TrialSpec] = []
    while pending:
        wave, claimed = [], set()
        for spec in pending:
            missing = needs[id(spec)] - ready
            if missing & claimed:
                continue
            wave.append(spec)
            claimed |= missing
            if len(wave) == concurrency:
                break
        for spec in wave:
            pending.remove(spec)
        ordered += wave
        ready |= claimed
    return ordered


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
    todo = [s for s in specs if (read_row(out_dir, sweep, s) or {}).get("status") != "done"]
    start = time.monotonic()
    if todo:
        start_ray(address, num_cpus=num_cpus, num_gpus=None)
        concurrency = cluster_concurrency(sweep.resources.cpu, sweep.resources.max_concurrent)
        precompute(sweep, store, todo, concurrency)
        todo = order_trials(sweep, todo, concurrency)
        _, callbacks = make_callbacks(out_dir, sweep, todo, len(specs) - len(todo))
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
                trial_dirname_creator=lambda t: f"{TrialSpec(**t.config['spec']).name[:80]}-{t.trial_id}",
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
