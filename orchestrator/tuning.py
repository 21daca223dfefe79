"""`instill tune`: the same tuning effort for every method, by Optuna search in Ray Tune.

For each method of the sweep, an Optuna search (OptunaSearch, seeded) runs `tuning.budget` trials
over `tuning.space`; each trial runs the method at the tuning budgets and seeds and scores the mean
*validation* accuracy (never test). The best values go to a YAML file that `instill run --tuned`
applies as per-method overrides, so baselines are tuned as hard as the method.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from common.config import stable_hash
from methods import ARTIFACTS, METHODS, get_method
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import ConfigError, SweepConfig, load_sweep, resolve_path, shared_blocks
from orchestrator.trial import TrialSpec, identity_blocks, run_trial


def _key(path: str) -> str:
    return path.replace(".", "__")


def method_space(sweep: SweepConfig, method: str) -> dict[str, tuple[float, float]]:
    """The part of the tuning space that applies to `method`: shared artifact settings only for
    the methods that own them, a method's own block only for that method."""
    owned = set(get_method(method).owns)
    out = {}
    for path, bounds in sweep.tuning_space.items():
        head = path.split(".")[0]
        if (head not in shared_blocks() or head in owned) and (head not in METHODS or head == method):
            out[path] = bounds
    return out


def _with_shared(sweep: SweepConfig, best: dict[str, dict[str, Any]]) -> SweepConfig:
    """`sweep` with the shared artifact settings tuned so far applied as overrides."""
    shared = {m: {k: v for k, v in values.items() if k.split(".")[0] in shared_blocks()} for m, values in best.items()}
    shared = {m: v for m, v in shared.items() if v}
    if not shared:
        return sweep
    return sweep.model_copy(update={"method_overrides": _merged(sweep.method_overrides, shared)})


def _merged(overrides: dict[str, dict[str, Any]], values: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-method `overrides` with `values` applied path by path (their other overrides stay)."""
    merged = {m: dict(v) for m, v in overrides.items()}
    for method, paths in values.items():
        merged.setdefault(method, {}).update(paths)
    return merged


def _kind(sweep: SweepConfig, path: str) -> type:
    return int if isinstance(resolve_path(sweep, path), int) else float


def _objective(config: dict[str, Any], sweep_json: str, method: str, store_root: str) -> None:
    import torch
    from ray import tune

    base = load_sweep(json.loads(sweep_json))
    torch.set_num_threads(max(1, int(base.resources.cpu)))
    values = {path: config[_key(path)] for path in base.tuning_space if _key(path) in config}
    sweep = base.model_copy(update={"method_overrides": _merged(base.method_overrides, {method: values})})
    store = ArtifactStore(store_root)
    scores = []
    # The method's artifacts at the first value of each axis they declare (the sweep's first, as listed).
    blocks = set(identity_blocks(sweep, method))
    kind_axes = {path for _, kind in ARTIFACTS.items() for path in kind.axes}
    point = {p: sweep.axes[p][0] for p in sweep.axes if p in kind_axes and sweep.axis_heads(p) & blocks}
    for fraction in sweep.tuning.data_fractions:
        for seed in sweep.tuning.seeds:
            spec = TrialSpec(method=method, data_fraction=fraction, seed=seed, axes=point)
            row = run_trial(sweep, spec, store, tuning=True)  # never reads a test split
            scores.append(row["val_acc"])
    tune.report({"val_acc": sum(scores) / len(scores)})


def tune_methods(sweep: SweepConfig, out_dir: str | Path, *, address: str | None = None, num_cpus: int | None = None):
    """Tune every method of `sweep`; write and return OUT/tuned.yaml."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.outdir import store_for
    from orchestrator.ray_session import start_ray
    from orchestrator.worker_loss import survive_worker_loss

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = store_for(sweep, out_dir)
    start_ray(address, num_cpus=num_cpus)
    import ray

    from orchestrator.threads import resolve

    sweep = resolve(sweep, store)
    concurrency = max(1, int(ray.cluster_resources().get("CPU", 1) // sweep.resources.cpu))
    best: dict[str, dict[str, float]] = {}
    scores: dict[str, float] = {}
    # Methods that own shared artifact settings (the mask's discovery) go first, and what they tune
    # is fed to the searches after them: the controls are tuned against the mask they will run with.
    base = sweep
    for method in sorted(base.methods, key=lambda m: not get_method(m).owns):
        sweep = _with_shared(base, best)
        space = {}
        for path, (low, high) in method_space(sweep, method).items():
            space[_key(path)] = (
                tune.randint(int(low), int(high) + 1) if _kind(sweep, path) is int else tune.loguniform(low, high)
            )
        if not space:
            continue
        print(f"[instill] tuning {method}: {sweep.tuning.budget} trials over {sorted(space)}", file=sys.stderr)
        trainable = tune.with_resources(
            tune.with_parameters(
                _objective, sweep_json=json.dumps(sweep.canonical()), method=method, store_root=store.location
            ),
            {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(metric="val_acc", mode="max", seed=int(stable_hash(method, 8), 16)),
                num_samples=sweep.tuning.budget,
                max_concurrent_trials=concurrency,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{method}", storage_path=str(out_dir / "tune"), verbose=0, log_to_file=True
            ),
        )
        survive_worker_loss()  # a worker killed for memory fails its Tune trial, not the search
        result = tuner.fit().get_best_result(metric="val_acc", mode="max")
        if result.metrics is None or "val_acc" not in result.metrics:
            raise RuntimeError(f"tuning {method}: no trial finished; see {out_dir / 'tune'}")
        best[method] = {
            p: _kind(sweep, p)(result.config[_key(p)]) for p in sweep.tuning_space if _key(p) in result.config
        }
        scores[method] = float(result.metrics["val_acc"])
    record = {
        "sweep": base.name,
        "config_hash": base.config_hash,
        "objective": "mean validation accuracy over tuning.data_fractions x tuning.seeds",
        "budget_per_method": sweep.tuning.budget,
        "best_val_acc": scores,
        "method_overrides": best,
    }
    path = out_dir / "tuned.yaml"
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path


def apply_tuned(sweep: SweepConfig, tuned_file: str | Path) -> SweepConfig:
    """`sweep` with the per-method values of a `tuned.yaml` written by `instill tune`."""
    path = Path(tuned_file)
    if not path.is_file():
        raise ConfigError(f"{path}: no such tuned-values file; write one with `instill tune SWEEP --out DIR`")
    try:
        record = yaml.safe_load(path.read_text())
        overrides = {m: v for m, v in record["method_overrides"].items() if m in sweep.methods}
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path}: not a tuned-values file from `instill tune` ({err})") from None
    raw = sweep.canonical()
    raw["method_overrides"] = _merged(raw.get("method_overrides", {}), overrides)
    return load_sweep(raw, str(path))
