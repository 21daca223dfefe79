"""Running a sweep: the trials not yet finished in OUT, on Ray Tune, then OUT/results.parquet.

Rows are written by the driver (`callbacks`), so workers on other nodes need no shared disk for
results. A run in a directory that already holds rows runs only the trials without a finished row;
a finished row made by another version of the code (its `code_version`) is kept and counted
(`SweepOutcome.stale`), and `rerun_stale` runs its trial again.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator import results, seeds
from orchestrator.callbacks import make_callbacks
from orchestrator.config import SweepConfig
from orchestrator.config.schema import SeedRule
from orchestrator.ordering import order_trials
from orchestrator.outdir import OutDir, SweepMismatch, as_outdir, prepare_out_dir, read_row, store_for
from orchestrator.ray_session import concurrency as cluster_concurrency
from orchestrator.ray_session import start_ray
from orchestrator.stop import GracefulStop, driver_stopping
from orchestrator.storage import check_shared
from orchestrator.threads import resolve as resolve_threads
from orchestrator.tracking import callbacks as tracking_callbacks
from orchestrator.trial import TrialSpec, trial_hash
from orchestrator.tuner import make_queue, make_tuner
from orchestrator.upstream import precompute

__all__ = ["SweepMismatch", "SweepOutcome", "order_trials", "run_sweep", "start_ray"]


@dataclasses.dataclass
class SweepOutcome:
    out_dir: Path | str  # a local path, or the URI of an object-store directory
    table: Any  # pandas.DataFrame of every row of the current grid
    ran: int  # trials that finished (done or failed) in this invocation
    skipped: int  # trials already done before it
    failed: int
    wall_s: float
    stopped_by: int | None = None  # the signal that stopped the sweep (SIGINT/SIGTERM), or None
    stale: int = 0  # finished trials whose row came from another code version (rerun with `rerun_stale`)
    rerun_stale: bool = False  # whether this run reran them


def run_sweep(
    sweep: SweepConfig,
    out_dir: str | Path | OutDir,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    force: bool = False,
    callbacks: list | None = None,
    grace_s: float = 120.0,
    lease_ttl_s: float = 30.0,
    resume_hint: str | None = None,
    tracking: str | None = None,
    rerun_stale: bool = False,
    overrides: Sequence[str] = (),
) -> SweepOutcome:
    """Run every unfinished trial of `sweep` on Ray Tune and write OUT/results.parquet.

    One driver at a time: a lease on OUT (`orchestrator.lease`) makes a second one stop with
    `DirectoryBusy`. SIGINT/SIGTERM stop the sweep gracefully (`orchestrator.stop`; `stopped_by`).
    `tracking` ('wandb', 'mlflow') adds Ray's logger callback; `callbacks` are extra Tune callbacks;
    `resume_hint` is printed when a stop cannot return; `rerun_stale`: see `to_run`; `overrides`: the
    `--set PATH=VALUE` the sweep was loaded with, recorded in sweep.json.
    """
    out = as_outdir(out_dir if isinstance(out_dir, OutDir) or "://" in str(out_dir) else Path(out_dir).resolve())
    out.makedirs()
    extra = tracking_callbacks(tracking, experiment=sweep.name, out_dir=out.local or out.uri) + list(callbacks or [])
    stopper = GracefulStop(grace_s, finish_now=lambda signum: None)
    lease = out.lease(ttl_s=lease_ttl_s, on_lost=lambda holder: _lost(stopper, out, holder))
    start = time.monotonic()
    with lease:
        prepare_out_dir(sweep, out, force=force, overrides=overrides)
        store = store_for(sweep, out)
        plan = seeds.advance(sweep, out)
        specs = plan.specs
        todo, stale = to_run(sweep, out, specs, rerun_stale)
        ran: list[TrialSpec] = []  # every trial this invocation ran, over the rounds of a seed rule

        def finish_now(signum: int) -> None:
            # Stop at once (second signal, or the grace period is over): rows already written stay.
            try:
                table = results.collect(out, sweep, specs)
                write_results(out, table)
            finally:
                lease.release()
                if resume_hint:
                    print(f"[instill] stopped; finished rows are kept. Resume with:\n  {resume_hint}", file=sys.stderr)
                sys.stderr.flush()
                os._exit(128 + signum)

        stopper.finish_now = finish_now
        if todo:
            stopper.install()
            try:
                start_ray(address, num_cpus=num_cpus, num_gpus=None)
                stopper.connect()
                check_shared({"--out": out.root if out.posix else None, "storage.artifacts": store.location})
                sweep = resolve_threads(sweep, store)
                concurrency = cluster_concurrency(sweep.resources.cpu, sweep.resources.max_concurrent)
                while todo and not stopper.stopping:  # one pass per round of a seed rule
                    precompute(sweep, store, todo, concurrency, should_stop=lambda: stopper.stopping)
                    if stopper.stopping:
                        break
                    todo = order_trials(sweep, todo, concurrency)
                    queue = make_queue(sweep, todo, concurrency, should_stop=lambda: stopper.stopping)
                    _, tune_callbacks = make_callbacks(
                        out, sweep, todo, len(specs) - len(todo), stopping=driver_stopping, queue=queue
                    )
                    make_tuner(sweep, todo, out, store.location, concurrency, tune_callbacks + extra, queue=queue).fit()
                    ran += todo
                    if stopper.stopping or not isinstance(sweep.seeds, SeedRule):
                        break
                    plan = seeds.advance(sweep, out, {trial_hash(sweep, s) for s in ran}, len(plan.rounds))
                    specs, done_here = plan.specs, set(ran)
                    more, newly_stale = to_run(sweep, out, specs, rerun_stale)
                    todo, stale = [s for s in more if s not in done_here], list({*stale, *newly_stale})
            finally:
                if not stopper.stopping:
                    stopper.restore()
        try:
            # While stopping, the handlers stay until the table is written: a second signal here
            # writes it and exits (finish_now) rather than killing the process half-way.
            table = results.collect(out, sweep, specs)
            write_results(out, table)
        finally:
            stopper.restore()
    finished = set(table.loc[table["status"] != "pending", "trial_hash"]) if len(table) else set()
    return SweepOutcome(
        out_dir=out.local or out.uri,
        table=table,
        ran=sum(trial_hash(sweep, s) in finished for s in ran),
        skipped=len(set(specs) - set(ran) - set(todo)),
        failed=int((table["status"] == "failed").sum()) if len(table) else 0,
        wall_s=time.monotonic() - start,
        stopped_by=stopper.signum,
        stale=len(stale),
        rerun_stale=rerun_stale,
    )


def to_run(
    sweep: SweepConfig, out: OutDir, specs: list[TrialSpec], rerun_stale: bool = False
) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """(the trials of `specs` without a finished row, and with `rerun_stale` the stale ones too; the
    stale ones: finished, with a row from another code version than `TrialSpec.code_version`, or none)."""
    todo, stale = [], []
    for spec in specs:
        row = read_row(out, sweep, spec) or {}
        if row.get("status") != "done":
            todo.append(spec)
        elif row.get("code_version") != spec.code_version:
            stale.append(spec)
            if rerun_stale:
                todo.append(spec)
    return todo, stale


def write_results(out: OutDir, table) -> None:
    """OUT/results.parquet, written whole."""
    if out.posix:
        results.write(table, out.local / "results.parquet")
        return
    with tempfile.TemporaryDirectory() as tmp:
        results.write(table, Path(tmp) / "results.parquet")
        out.write_bytes("results.parquet", (Path(tmp) / "results.parquet").read_bytes())


def _lost(stopper: GracefulStop, out: OutDir, holder) -> None:
    who = holder.describe() if holder is not None else "nobody (the lease was deleted)"
    print(f"[instill] lost the lease on {out} to {who}: stopping", file=sys.stderr, flush=True)
    if not stopper.stopping:
        stopper.request(signal.SIGTERM)
