"""Synthetic result tables whose answers are known, for the report's tests."""

import json

import pandas as pd

from common.config import stable_hash
from orchestrator import results


def curves_table(curves: dict[str, dict[int, list[float]]], sparsity=None) -> pd.DataFrame:
    """Finished rows without `config_json` (as older result files have): {method: {budget: accuracy
    per seed}}, one series per method."""
    rows = []
    for method, by_n in curves.items():
        for n, accs in by_n.items():
            for seed, acc in enumerate(accs):
                rows.append(
                    {
                        "trial": f"{method}-{n}-{seed}",
                        "task": "t",
                        "model": "m",
                        "method": method,
                        "mask.sparsity": None if method == "scratch" else sparsity,
                        "data_fraction": n / 1000,
                        "n_train": n,
                        "seed": seed,
                        "status": "done",
                        "test_acc": acc,
                        "val_acc": acc,
                        "subtask_acc": 0.99 if method != "scratch" else None,
                    }
                )
    return results.frame(rows)


def write_results(dir_, table):
    """`table` as OUT/results.parquet of a new output directory `dir_`."""
    dir_.mkdir(parents=True)
    results.write(table, dir_ / "results.parquet")


def _config(method, sparsity, seed, fraction, task="t", **model) -> dict:
    """A trial's effective config as the rows carry it in `config_json`."""
    config = {
        "method": method,
        "data_fraction": fraction,
        "seed": seed,
        "task": {"name": task},
        "model": {"name": "mlp", "n_layers": 2, **model},
        "training": {"lr": 2e-4, "epochs": 10},
    }
    if sparsity is not None:
        config["mask"] = {"sparsity": sparsity}
        config["discovery"] = {"l0_lambda": 1e-3}
        config["transfer"] = {"unmasked": "keep"}
    return config


def series_rows(method, sparsity, curve: dict[int, list[float]], task="t", with_series=True, **model) -> pd.DataFrame:
    """Rows of one series, in the schema with `config_json`, `series` and dotted axis columns."""
    rows = []
    for n, accs in curve.items():
        for seed, acc in enumerate(accs):
            config = _config(method, sparsity, seed, n / 1000, task, **model)
            row = {
                "trial": f"{method}-{n}-{seed}",
                "task": task,
                "model": "mlp",
                "method": method,
                "mask.sparsity": sparsity,
                "data_fraction": n / 1000,
                "n_train": n,
                "seed": seed,
                "status": "done",
                "test_acc": acc,
                "val_acc": acc,
                "config_json": json.dumps(config, sort_keys=True),
                "model.n_layers": config["model"]["n_layers"],
            }
            if with_series:
                row["series"] = stable_hash({k: v for k, v in config.items() if k not in ("seed", "data_fraction")})
            rows.append(row)
    return results.frame(rows)
