"""One trial: source -> discovery -> transfer -> downstream training -> evaluation.

`run_trial` is a plain function of (sweep config, trial spec, artifact store): it runs and is
tested without Ray; the Tune layer only adapts it. Upstream work (the source model, the mask) comes
from the artifact store, keyed by exactly the config fields that determine it, so it is computed
once per sweep whatever the number of trials that need it.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
from pydantic import Field
from torch import nn

from methods import MethodInputs, discover, evaluate, get_method, train
from methods.masking import Mask
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import SweepConfig
from common.config import Frozen, stable_hash
from common.seeding import seeded_init, torch_generator

Report = Callable[[dict[str, Any]], None]


class TrialSpec(Frozen):
    """A point of the grid. `sparsity` is None for methods that use no mask."""

    method: str
    sparsity: float | None = Field(None, ge=0, lt=1)
    data_fraction: float = Field(ge=0, le=1)
    seed: int

    @property
    def name(self) -> str:
        sparsity = "" if self.sparsity is None else f"-s{self.sparsity:g}"
        return f"{self.method}{sparsity}-f{self.data_fraction:g}-seed{self.seed}"


def expand(sweep: SweepConfig) -> list[TrialSpec]:
    """The trials of a sweep: methods x sparsities x data fractions x seeds, where a method that
    uses no mask runs once per (fraction, seed) instead of once per sparsity."""
    specs = []
    for method in sweep.methods:
        sparsities = sweep.sparsities if get_method(method).uses_mask else (None,)
        for sparsity in sparsities:
            for fraction in sweep.data_fractions:
                for seed in sweep.seeds:
                    specs.append(TrialSpec(method=method, sparsity=sparsity, data_fraction=fraction, seed=seed))
    return specs


# --- artifact keys -----------------------------------------------------------------------


def source_key(sweep: SweepConfig, seed: int) -> dict[str, Any]:
    task = sweep.build_task()
    return {
        "task": task.key_fields("source"),
        "model": sweep.model.canonical(),
        "training": sweep.source.canonical(),
        "seed": seed,
    }


def mask_key(sweep: SweepConfig, seed: int, sparsity: float) -> dict[str, Any]:
    task = sweep.build_task()
    return {
        "source": source_key(sweep, seed),
        "subtask": task.key_fields("subtask"),
        "discovery": sweep.discovery.canonical(),
        "sparsity": sparsity,
    }


def upstream_keys(sweep: SweepConfig, spec: TrialSpec) -> list[tuple[str, str]]:
    """(kind, key hash) of every artifact the trial needs, in the order it needs them."""
    method = get_method(spec.method)
    sweep = sweep.for_method(spec.method)
    keys = []
    if method.uses_source:
        keys.append(("source", stable_hash(source_key(sweep, spec.seed), 24)))
    if method.uses_mask:
        keys.append(("mask", stable_hash(mask_key(sweep, spec.seed, spec.sparsity), 24)))
    return keys


# --- stages ------------------------------------------------------------------------------


def fresh_model(sweep: SweepConfig, task, seed: int, stage: str) -> nn.Module:
    """A new model whose default init is a function of (seed, stage) only."""
    with seeded_init(seed, stage):
        return task.build_model(sweep.model)


def get_source(sweep: SweepConfig, task, seed: int, store: ArtifactStore, device: torch.device):
    """The trained source model for (task, model, source training, seed); trained at most once."""

    def compute():
        model = fresh_model(sweep, task, seed, "source_init").to(device)
        result = train(
            model,
            task.base_data(seed),
            sweep.source,
            torch_generator(seed, "source_train"),
            mixed_precision=sweep.resources.mixed_precision,
        )
        meta = {
            "val_acc": result.best_val_acc,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
        }
        return model.state_dict(), meta

    fetched = store.get_or_compute("source", source_key(sweep, seed), compute)
    model = fresh_model(sweep, task, seed, "source_init")
    model.load_state_dict(fetched.tensors)
    return model.to(device), fetched


def get_mask(sweep: SweepConfig, task, seed: int, sparsity: float, source: nn.Module, store: ArtifactStore):
    """The mask discovered in `source` at `sparsity`; discovered at most once per key."""

    def compute():
        found = discover(
            copy.deepcopy(source),
            task.subtask_data(seed),
            sweep.discovery,
            sparsity,
            torch_generator(seed, "discovery"),
        )
        meta = {
            "subtask_acc": found.subtask_acc,
            "density": found.density,
            "natural_density": found.natural_density,
            "best_epoch": found.best_epoch,
            "history": found.history,
        }
        return found.mask, meta

    fetched = store.get_or_compute("mask", mask_key(sweep, seed, sparsity), compute)
    mask: Mask = {name: t.bool() for name, t in fetched.tensors.items()}
    return mask, fetched


def pick_device(sweep: SweepConfig) -> torch.device:
    """cuda when the trial was given a GPU and one is visible, else cpu."""
    if sweep.resources.gpu > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def run_trial(
    sweep: SweepConfig,
    spec: TrialSpec,
    store: ArtifactStore,
    report: Report | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Run one trial and return its result row (see `orchestrator.results.COLUMNS`)."""
    report = report or (lambda metrics: None)
    device = device or pick_device(sweep)
    task = sweep.build_task()
    method = get_method(spec.method)
    seed = spec.seed
    row: dict[str, Any] = base_row(sweep, spec, task)
    sweep = sweep.for_method(spec.method)  # tuned values, if any, from here on
    row["started_at"] = time.time()
    row["worker"] = f"{platform.node()}:{os.getpid()}"
    times: dict[str, float] = {"wait_s": 0.0}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[f"{stage}_s"] = times.get(f"{stage}_s", 0.0) + now - clock
        clock = now

    source = mask = None
    if method.uses_source:
        source, fetched = get_source(sweep, task, seed, store, device)
        times["wait_s"] += fetched.wait_s
        row.update(source_val_acc=fetched.meta["val_acc"], source_computed=fetched.computed)
    lap("source")
    report({"stage": "source", **times})
    if method.uses_mask:
        mask, fetched = get_mask(sweep, task, seed, spec.sparsity, source, store)
        times["wait_s"] += fetched.wait_s
        row.update(
            mask_density=fetched.meta["density"],
            subtask_acc=fetched.meta["subtask_acc"],
            natural_density=fetched.meta["natural_density"],
            mask_computed=fetched.computed,
        )
    lap("discovery")
    report({"stage": "discovery", **times})

    inputs = MethodInputs(
        fresh=fresh_model(sweep, task, seed, "init").to(device),
        source=source,
        mask=mask,
        transfer=sweep.transfer,
        generator=torch_generator(seed, f"method:{spec.method}"),
    )
    model = method.build(inputs).to(device)
    lap("transfer")
    report({"stage": "transfer", **times})

    data = task.downstream_data(seed, spec.data_fraction)
    result = train(
        model,
        data,
        sweep.training,
        torch_generator(seed, "downstream_train"),
        mixed_precision=sweep.resources.mixed_precision,
    )
    row.update(val_acc=result.best_val_acc, best_epoch=result.best_epoch, epochs_run=result.epochs_run)
    lap("train")
    report({"stage": "train", "val_acc": result.best_val_acc, **times})

    for split_name, split in data.evals.items():
        for label, acc in evaluate(model, split, sweep.training.eval_batch_size).items():
            row[f"{split_name}_acc" if label == "y" else f"{split_name}_acc_{label}"] = acc
    row.update(task.derived_metrics(row))
    val_readings = evaluate(model, data.val, sweep.training.eval_batch_size)
    row.update({f"val_acc_{label}": acc for label, acc in val_readings.items() if label != "y"})
    lap("eval")
    # Compute time: the stages' wall time less the time spent waiting on another trial's lock.
    times["total_s"] = sum(v for k, v in times.items() if k != "wait_s") - times["wait_s"]
    row.update(times, status="done", device=str(device), finished_at=time.time())
    report({"stage": "done", "row_json": json.dumps(row), **{k: row[k] for k in ("val_acc", "test_acc")}})
    return row


def base_row(sweep: SweepConfig, spec: TrialSpec, task=None) -> dict[str, Any]:
    """The identifying columns of a trial's row, filled for done and failed trials alike."""
    task = task or sweep.build_task()
    effective = sweep.for_method(spec.method)
    return {
        "trial": spec.name,
        "task": sweep.task.name,
        "model": sweep.model.name,
        "method": spec.method,
        "sparsity": spec.sparsity,
        "data_fraction": spec.data_fraction,
        "n_train": task.downstream_size(spec.data_fraction),
        "seed": spec.seed,
        "unmasked": effective.transfer.unmasked,
        "trainable_subnetwork": effective.transfer.trainable_subnetwork,
        "config_hash": sweep.config_hash,  # the sweep's, so that a resumed sweep recognises its rows
        "config_json": json.dumps(effective.canonical(), sort_keys=True),  # what this trial ran with
        "versions": json.dumps(versions(), sort_keys=True),
    }


def failed_row(sweep: SweepConfig, spec: TrialSpec, error: BaseException | str) -> dict[str, Any]:
    message = error if isinstance(error, str) else "".join(traceback.format_exception_only(error)).strip()
    return {**base_row(sweep, spec), "status": "failed", "error": message}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("instill", "torch", "ray", "numpy", "pyarrow", "pydantic"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out
