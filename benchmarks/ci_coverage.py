"""Coverage of the report's 95% intervals at the seed counts sweeps have.

Draws REPS synthetic seed tables with a known mean and counts how often each interval holds it:

  - the mean of a metric: the former percentile bootstrap, the Student t interval the report uses
    now, and scipy's BCa bootstrap, under normal noise and under Beta(45, 5) (accuracies near 0.9,
    skewed and bounded);
  - the budget needed to reach a target accuracy: the former percentile bootstrap over seeds of the
    crossing, and the inverted t bands the report uses now, on logistic curves in log budget whose
    midpoints vary (as in tests/orchestrator/report/test_statistics.py).

A well-calibrated 95% interval covers about 0.95; the count's standard error is about
sqrt(0.95 * 0.05 / REPS) (0.005 at 2000).

    python benchmarks/ci_coverage.py [--reps 2000] [--boot 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings

import numpy as np
from scipy import stats

from orchestrator.report import budget_interval, first_crossing, t_interval

SEEDS = (2, 3, 5, 10, 20)
BETA = (45.0, 5.0)
BUDGETS = np.array([0, 10, 30, 100, 300, 1000, 3000], dtype=float)
TARGET = 0.8


def draw(rng, dist: str, reps: int, seeds: int) -> tuple[np.ndarray, float]:
    """`reps` tables of `seeds` values, and their true mean."""
    if dist == "normal":
        return rng.normal(0.7, 0.1, size=(reps, seeds)), 0.7
    a, b = BETA
    return rng.beta(a, b, size=(reps, seeds)), a / (a + b)


def percentile_bootstrap(values: np.ndarray, n_boot: int, rng, chunk: int = 250):
    """The report's former interval: 2.5% and 97.5% quantiles of resampled means, per row."""
    lo, hi = [], []
    for start in range(0, len(values), chunk):  # reps x n_boot x seeds at once would be large
        part = values[start : start + chunk]
        picks = rng.integers(0, part.shape[1], size=(len(part), n_boot, part.shape[1]))
        means = np.take_along_axis(part[:, None, :], picks, axis=2).mean(axis=2)
        lo.append(np.quantile(means, 0.025, axis=1))
        hi.append(np.quantile(means, 0.975, axis=1))
    return np.concatenate(lo), np.concatenate(hi)


def bca(values: np.ndarray, n_boot: int, rng):
    """scipy's BCa bootstrap of the mean, per row; NaN where it is degenerate (few seeds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning at 2-3 seeds: counted as a miss
        res = stats.bootstrap((values,), np.mean, axis=-1, n_resamples=n_boot, method="BCa", random_state=rng, batch=50)
    return res.confidence_interval.low, res.confidence_interval.high


def coverage(lo, hi, truth) -> float:
    return float(np.mean((lo <= truth) & (truth <= hi)))  # NaN bounds count as a miss


def curve_family(rng, reps: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    """reps x seeds x budgets accuracies around logistic curves, and each mean curve's crossing."""
    x = np.log10(1 + BUDGETS)
    mean = 0.1 + 0.89 / (1 + np.exp(-3.0 * (x - rng.uniform(1.0, 2.5, size=(reps, 1)))))
    curves = mean[:, None, :] + rng.normal(0, 0.02, size=(reps, seeds, 1))
    curves = curves + rng.normal(0, 0.03, size=(reps, seeds, len(BUDGETS)))
    return curves, first_crossing(BUDGETS, mean, TARGET)


def bootstrap_crossing(curves: np.ndarray, n_boot: int, rng):
    """The former budget interval: quantiles of the crossing of resampled seeds' mean curves."""
    reps, seeds, _ = curves.shape
    lo, hi = np.empty(reps), np.empty(reps)
    for r in range(reps):
        picks = rng.integers(0, seeds, size=(n_boot, seeds))
        crossings = first_crossing(BUDGETS, curves[r][picks].mean(axis=1), TARGET)
        lo[r] = np.quantile(crossings, 0.025, method="inverted_cdf")
        hi[r] = np.quantile(crossings, 0.975, method="inverted_cdf")
    return lo, hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2000, help="synthetic tables per cell")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("$ python " + shlex.join(sys.argv))
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()

    print(f"\nCoverage of the 95% CI of a metric's mean ({args.reps} tables per cell, Beta{BETA})")
    print(f"{'seeds':>5}  {'noise':<7} {'percentile bootstrap':>20} {'Student t (report)':>18} {'BCa':>6}")
    for dist in ("normal", "beta"):
        for seeds in SEEDS:
            values, truth = draw(rng, dist, args.reps, seeds)
            old = coverage(*percentile_bootstrap(values, args.boot, rng), truth)
            new = coverage(*t_interval(values), truth)
            bc = coverage(*bca(values, args.boot, rng), truth)
            print(f"{seeds:>5}  {dist:<7} {old:>20.3f} {new:>18.3f} {bc:>6.3f}")

    print(f"\nCoverage of the 95% CI of the budget to reach {TARGET} (logistic curves, {args.reps} per cell)")
    print(f"{'seeds':>5}  {'percentile bootstrap':>20} {'inverted t bands (report)':>25}")
    for seeds in (3, 5, 10):
        curves, truth = curve_family(rng, args.reps, seeds)
        old = coverage(*bootstrap_crossing(curves, args.boot, rng), truth)
        _, lo, hi = budget_interval(BUDGETS, curves, TARGET)
        print(f"{seeds:>5}  {old:>20.3f} {coverage(lo, hi, truth):>25.3f}")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
