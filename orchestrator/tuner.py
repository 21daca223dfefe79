"""The Tune experiment of a sweep: the trainable, its resources and Tune's settings."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable

from orchestrator.config import SweepConfig
from orchestrator.outdir import OutDir
from orchestrator.trial import TrialSpec
from orchestrator.worker import trainable as trainable_fn


def make_tuner(
    sweep: SweepConfig,
    todo: list[TrialSpec],
    out: OutDir,
    store_location: str,
    concurrency: int,
    callbacks: list,
    should_stop: Callable[[], bool] = lambda: False,
):
    """A Tuner that runs `todo` (in this order), `concurrency` at a time, launching no new trial
    once `should_stop()` is True. Tune's state and trial logs go to OUT/tune (a local path or OUT's
    object store)."""
    from ray import tune

    from orchestrator.queue import TrialQueue

    trainable = tune.with_resources(
        tune.with_parameters(trainable_fn, sweep_json=json.dumps(sweep.canonical()), store_root=store_location),
        {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=TrialQueue([{"spec": s.model_dump()} for s in todo], should_stop),
            num_samples=len(todo),
            reuse_actors=True,
            max_concurrent_trials=concurrency,
            trial_name_creator=lambda t: TrialSpec(**t.config["spec"]).name,
            trial_dirname_creator=lambda t: f"{TrialSpec(**t.config['spec']).name[:80]}-{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S"),
            storage_path=out.path("tune"),
            storage_filesystem=None if out.posix else out.fs,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            callbacks=callbacks,
            verbose=0,
            # Trial output goes to stdout/stderr files in each trial's directory, synced to OUT/tune.
            log_to_file=True,
            sync_config=tune.SyncConfig(sync_artifacts=True, sync_artifacts_on_checkpoint=False),
        ),
    )
    return tuner
