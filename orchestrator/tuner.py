"""The Tune experiment of a sweep: the trainable, its resources and Tune's settings.

Settings for grids of thousands of trials (figures: docs/PERFORMANCE.md, "Grid scale"):

- Short trials run in groups, one Tune trial each (`orchestrator.queue`, `orchestrator.worker`).
- Results are buffered on the worker (`TUNE_DEFAULTS`): without a buffer every `tune.report` costs
  the trial a round trip through the driver.
- The trial queue instead of a `grid_search`: Tune copies a grid's search space for every trial, O(trials) each.
- A few trials created ahead of the running ones (`ahead`) start on the next free actor at once.
- A FIFO scheduler that looks only at unfinished trials (`live_fifo_scheduler`): Tune's own scans
  every trial on every step, O(trials^2) over a sweep.

Every variable is only a default: set in the environment, it wins.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable

from orchestrator.config import SweepConfig
from orchestrator.outdir import OutDir
from orchestrator.trial import TrialSpec, pack_keys
from orchestrator.worker import trainable as trainable_fn


def make_tuner(
    sweep: SweepConfig,
    todo: list[TrialSpec],
    out: OutDir,
    store_location: str,
    concurrency: int,
    callbacks: list,
    should_stop: Callable[[], bool] = lambda: False,
    queue=None,
):
    """A Tuner that runs `todo` in this order, `concurrency` at a time, from `queue` (default: a new
    `make_queue` of `todo`, stopped by `should_stop()`). Tune's state and trial logs go to OUT/tune."""
    from ray import tune

    from orchestrator.worker_loss import survive_worker_loss

    survive_worker_loss()  # a worker killed for memory fails its trials, not the driver
    for name, value in TUNE_DEFAULTS.items():
        os.environ.setdefault(name, value)  # read when fit() builds Tune's controller

    trainable = tune.with_resources(
        tune.with_parameters(trainable_fn, sweep_json=json.dumps(sweep.canonical()), store_root=store_location),
        {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=queue or make_queue(sweep, todo, concurrency, should_stop),
            num_samples=-1,  # as many Tune trials as the queue hands out groups (lost ones come back)
            scheduler=live_fifo_scheduler(),
            reuse_actors=True,
            max_concurrent_trials=concurrency + ahead(sweep, concurrency),
            trial_name_creator=lambda t: group_name(t.config),
            trial_dirname_creator=lambda t: f"{group_name(t.config)[:80]}-{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S"),
            storage_path=out.path("tune"),
            storage_filesystem=None if out.posix else out.fs,
            failure_config=tune.FailureConfig(max_failures=0),  # retries are the queue's (orchestrator.queue)
            callbacks=callbacks,
            verbose=0,
            # Trial output goes to stdout/stderr files in each trial's directory, synced to OUT/tune.
            log_to_file=True,
            sync_config=tune.SyncConfig(sync_artifacts=True, sync_artifacts_on_checkpoint=False),
        ),
    )


def make_queue(sweep: SweepConfig, todo: list[TrialSpec], concurrency: int, should_stop=lambda: False):
    """The `TrialQueue` Tune draws `todo` from."""
    from orchestrator.queue import TrialQueue

    return TrialQueue(
        todo,
        sweep.resources.group,
        concurrency,
        should_stop,
        pack_keys=pack_keys(sweep, todo),
        pack=PACK_GROUP if sweep.resources.pack == "auto" else sweep.resources.pack,
        retries=sweep.max_failures,
    )


# Under `resources.pack: auto`, the most trials handed to a worker as one pack group; the worker
# trains them in packs of at most its own limit (`orchestrator.worker.pack_limit`).
PACK_GROUP = 64


def group_name(config: dict) -> str:
    """A Tune trial's name: its first trial's, and `+N` for the N others of its group."""
    from orchestrator.queue import members

    specs = members(config)
    return TrialSpec(**specs[0]).name + (f"+{len(specs) - 1}" if len(specs) > 1 else "")


def ahead(sweep: SweepConfig, concurrency: int) -> int:
    """Trials Tune may create beyond those that run, to start on the next free actor at once: only
    where the cluster bounds the running trials and every trial is its own Tune trial (`group: 1`).
    With trial groups, trials created ahead made Tune start actors it then threw away."""
    if sweep.resources.max_concurrent or sweep.resources.group != 1:
        return 0
    return max(4, concurrency)


# Result buffering on the workers: a workaround of a Ray bug, written against Ray 2.60.0, whose
# `TuneController._schedule_trial_train` passes (buffer length, buffer time) to
# `Trainable.train_buffered(buffer_time_s, max_buffer_length)`, the wrong way round: LENGTH is read
# as the time window (2 s) and MIN_TIME_S as the most results (1,000). Read the right way round (a
# fixed Ray), the same values mean pairs of results: still safe, half the round trips; then swap
# them (tests/orchestrator/test_ray_internals.py fails once Ray is fixed). Tune's defaults send every report alone.
TUNE_DEFAULTS = {"TUNE_RESULT_BUFFER_LENGTH": "2", "TUNE_RESULT_BUFFER_MIN_TIME_S": "1000"}


def live_fifo_scheduler():
    """Tune's FIFO scheduler, choosing the first pending (else paused) trial among the unfinished
    ones only, through `TrialScheduler`'s documented hooks."""
    from ray.tune.schedulers import FIFOScheduler

    class LiveFIFOScheduler(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.live: list = []

        def on_trial_add(self, tune_controller, trial):
            self.live.append(trial)

        def choose_trial_to_run(self, tune_controller):
            self.live = [t for t in self.live if t.status not in ("TERMINATED", "ERROR")]
            return next((t for s in ("PENDING", "PAUSED") for t in self.live if t.status == s), None)

    return LiveFIFOScheduler()
