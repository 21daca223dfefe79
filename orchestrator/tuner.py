"""The Tune experiment of a sweep: the trainable, its resources and Tune's settings."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from orchestrator.config import SweepConfig
from orchestrator.trial import TrialSpec
from orchestrator.worker import trainable as trainable_fn


def make_tuner(
    sweep: SweepConfig, todo: list[TrialSpec], out_dir: Path, store_location: str, concurrency: int, callbacks: list
):
    """A Tuner that runs `todo` (in this order), `concurrency` at a time."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(trainable_fn, sweep_json=json.dumps(sweep.canonical()), store_root=store_location),
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
    return tuner
