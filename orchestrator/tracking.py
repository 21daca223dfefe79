"""`--tracking wandb|mlflow`: Ray Tune's own logger callbacks, set up for a sweep.

One experiment (MLflow) or group (W&B) per sweep, named after it; one run per Tune trial, named by
the trial (a group of trials by its first, `+N` for the others), with the grid point as parameters
and every numeric value a trial reports as a metric (the per-epoch curves). Long or structured
values (the final row's JSON) are not logged: they live in OUT/rows.

    MLflow  MLFLOW_TRACKING_URI if set, else a local SQLite store OUT/mlruns/mlflow.db (MLflow 3
            refuses new plain-directory stores); browse with
            `mlflow ui --backend-store-uri sqlite:///OUT/mlruns/mlflow.db`.
    W&B     project WANDB_PROJECT if set, else the sweep's name; WANDB_MODE is honoured
            (`offline` needs no network or key: runs land in OUT/wandb, `wandb sync` uploads them);
            run files go to WANDB_DIR if set, else OUT.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from orchestrator.config import ConfigError

KINDS = ("wandb", "mlflow")

# What a trial reports but no tracker should log: the finished row and other long or structured
# values (kept in OUT/rows), Tune's echo of the trial config (logged once, as parameters) and its
# wall-clock stamp (both trackers record the time of every point themselves).
EXCLUDED = ("rows_json", "row_json", "config_json", "measurements", "config", "timestamp")

# Tune's bookkeeping in every result: not metrics (W&B's callback files them under config itself).
_BOOKKEEPING = (
    "done",
    "group_next",
    "rows_compute_s",
    "rows_cost",
    "should_checkpoint",
    "trial_id",
    "experiment_tag",
    "node_ip",
    "experiment_id",
    "hostname",
    "pid",
    "date",
    "checkpoint_dir_name",
)


def callbacks(kind: str | None, *, experiment: str, out_dir: str | Path) -> list:
    """Ray Tune logger callbacks for `--tracking kind` (None: none). `experiment` (the sweep's name)
    names the MLflow experiment / W&B group; the local defaults (MLflow store, W&B files) go in `out_dir`."""
    if kind is None:
        return []
    if kind not in KINDS:
        raise ConfigError(f"unknown tracking {kind!r}: use one of {', '.join(KINDS)} (or leave --tracking out)")
    try:
        importlib.import_module(kind)
    except ImportError as e:
        raise ConfigError(f"--tracking {kind} needs the {kind} package: pip install 'instill[{kind}]' ({e})") from None
    return [_mlflow(experiment, out_dir) if kind == "mlflow" else _wandb(experiment, out_dir)]


def _local(out_dir: str | Path, what: str, env: str) -> Path:
    if "://" in str(out_dir):
        raise ConfigError(f"OUT is not a local path ({out_dir}): set {env} to say where {what} should go")
    return Path(out_dir).resolve()


def _mlflow(experiment: str, out_dir: str | Path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class _Callback(MLflowLoggerCallback):
        """Ray's MLflow callback, less the values that are not metrics (it has no `excludes`)."""

        def log_trial_result(self, iteration, trial, result):
            # Keep what MLflow can plot; the step comes from `training_iteration`, which stays.
            metrics = {k: v for k, v in result.items() if k not in EXCLUDED and k not in _BOOKKEEPING}
            super().log_trial_result(iteration, trial, metrics)

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        store = _local(out_dir, "the MLflow store", "MLFLOW_TRACKING_URI") / "mlruns"
        store.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{store / 'mlflow.db'}"
    return _Callback(tracking_uri=uri, experiment_name=experiment, tags={"sweep": experiment})


def _wandb(experiment: str, out_dir: str | Path):
    from ray.air.integrations.wandb import WandbLoggerCallback

    run_dir = os.environ.get("WANDB_DIR") or _local(out_dir, "W&B run files", "WANDB_DIR")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    # wandb.init runs in a Ray actor, which need not see this process's environment: pass the
    # settings explicitly. Ray's callback reads its own WANDB_PROJECT_NAME; W&B users set WANDB_PROJECT.
    init = {"dir": str(run_dir)}
    if os.environ.get("WANDB_MODE"):
        init["mode"] = os.environ["WANDB_MODE"]
    return WandbLoggerCallback(
        project=os.environ.get("WANDB_PROJECT") or experiment,
        group=experiment,
        excludes=list(EXCLUDED),
        **init,
    )
