"""Paired-by-seed figures of the linearised GP that the report does not compute (docs/COMPARISON.md,
"The linearised GP as its paper classifies"): its test accuracy at the largest budget minus at the
smallest, and on validation (which its fit never chooses with) its accuracy minus its prior's (the
untouched source's) and minus its MAP's (without the predictive average), each as the mean of the
per-seed differences with the report's 95% interval (`orchestrator.report.statistics.interval`).

    python docs/compare-shapes-gp/paired.py docs/compare-shapes-gp/results.parquet > docs/compare-shapes-gp/paired.md
"""

import json
import sys

import numpy as np
import pandas as pd

from orchestrator.report.statistics import interval


def line(name: str, values) -> str:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]  # rows without the measurement (older code) are left out
    if not len(values):
        return f"| {name} | 0 | not measured | | |"
    lo, hi = interval(values) if len(values) > 1 else (np.nan, np.nan)
    spread = f"{values.min():+.4f} | {values.max():+.4f}"
    return f"| {name} | {len(values)} | {values.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] | {spread} |"


def main(path: str) -> None:
    rows = pd.read_parquet(path)
    rows = rows[(rows["method"] == "linearized_gp") & (rows["status"] == "done")].copy()
    measured = rows["measurements_json"].map(lambda text: json.loads(text)[0])
    for key in ("prior_val_acc", "map_val_acc", "prior_precision_relative", "at_bound"):
        rows[key] = measured.map(lambda m, k=key: m.get(k, np.nan))
    budgets = sorted(rows["n_train"].unique())
    print("| difference (paired by seed) | seeds | mean [95% CI] | min | max |")
    print("|---|---|---|---|---|")
    by_seed = rows.pivot_table(index="seed", columns="n_train", values="test_acc")
    low, high = budgets[0], budgets[-1]
    both = by_seed[[low, high]].dropna()
    print(line(f"test accuracy, n = {high} minus n = {low}", both[high] - both[low]))
    for n in budgets:
        at = rows[rows["n_train"] == n]
        print(line(f"validation accuracy minus the prior's, n = {n}", at["val_acc"] - at["prior_val_acc"]))
    for n in budgets:
        at = rows[rows["n_train"] == n]
        print(line(f"validation accuracy minus the MAP's, n = {n}", at["val_acc"] - at["map_val_acc"]))
    print()
    print("| n | seeds | prior precision δ / mean kernel diagonal: median [min, max] | at the bound 10^4 |")
    print("|---|---|---|---|")
    for n in budgets:
        at = rows[rows["n_train"] == n]["prior_precision_relative"]
        bound = int(rows[rows["n_train"] == n]["at_bound"].sum())
        print(f"| {n} | {len(at)} | {at.median():.3g} [{at.min():.3g}, {at.max():.3g}] | {bound} |")


if __name__ == "__main__":
    main(sys.argv[1])
