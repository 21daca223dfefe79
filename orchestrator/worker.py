"""What runs inside a Ray worker for one Tune trial: the trial, reporting after every stage and epoch."""

from __future__ import annotations

import json
from typing import Any

from methods.training import Interrupted
from orchestrator import stop
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial


def trainable(config: dict[str, Any], sweep_json: str, store_root: str) -> None:
    """Runs inside a Ray worker: one trial, reporting after every stage and every epoch (live
    curves in Tune's logs). A stop request ends it after a checkpoint, with stage `interrupted`."""
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
        if metrics["stage"] != "epoch":
            timing = {k: round(v, 2) for k, v in metrics.items() if k.endswith("_s")}
            print(f"[{spec.name}] stage {metrics['stage']} {timing}", flush=True)
        tune.report(metrics)

    try:
        run_trial(sweep, spec, ArtifactStore(store_root), report=report, should_stop=stop.requested)
    except Interrupted as stopped:
        print(f"[{spec.name}] {stopped}; resumes from its checkpoint in the next run", flush=True)
        tune.report({"stage": "interrupted"})
