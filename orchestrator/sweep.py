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
import time
from pathlib import Path
from typing import Any

from orchestrator import results
from orchestrator.callbacks import make_callbacks
from orchestrator.config import SweepConfig
from orchestrator.ordering import order_trials
from orchestrator.outdir import SweepMismatch, prepare_out_dir, read_row, store_for
from orchestrator.ray_session import concurrency as cluster_concurrency
from orchestrator.ray_session import start_ray
from orchestrator.trial import expand
from orchestrator.tuner import make_tuner
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


def run_sweep(
    sweep: SweepConfig,
    out_dir: str | Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    force: bool = False,
) -> SweepOutcome:
    """Run every unfinished trial of `sweep` on Ray Tune and write OUT/results.parquet."""
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
        tuner = make_tuner(sweep, todo, out_dir, store.location, concurrency, callbacks)
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
