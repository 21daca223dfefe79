"""Coverage of candidate 95% intervals at the seed counts sweeps have, on processes like our rows.

Draws REPS synthetic seed tables with a known truth and counts how often each interval holds it:

  - the mean of one series, and the mean of a paired difference between two series (the report's
    verdicts rest on those), under these processes (values clipped to [0, 1] as accuracies are):
      normal      N(0.7, 0.1)
      beta        Beta(45, 5): accuracies near 0.9, skewed and bounded
      mask p      bimodal: a seed fails with probability p, landing at N(0.70, 0.03) instead of
                  N(0.97, 0.01), as per-seed mask qualities do (0.70 vs 0.96-0.98)
      acc p       bimodal: failing seeds at N(0.40, 0.05), others at N(0.82, 0.02), as accuracies
                  spread over 0.35-0.84
      ceiling     N(0.99, 0.01) clipped at 1: accuracies 0.97-1.0, 16% of seeds exactly 1
    In a pair, the method (A) follows the process and its partner (B) is unimodal (mask: N(0.95, 0.01),
    acc: N(0.78, 0.02), ceiling: N(0.98, 0.01)); a seed effect shared by both (sd 0.01, 0.02, 0.005)
    is added to both before clipping, as a shared source model and data draw give;
  - the budget needed to reach a target accuracy: the former percentile bootstrap over seeds of the
    crossing, and the inverted t bands the report uses, on logistic curves in log budget.

Intervals: Student t; percentile bootstrap (rliable's stratified bootstrap with one stratum);
bootstrap-t (studentized resamples); scipy's BCa; for a mean of accuracies, a t interval on the logit
scale (delta method: logit(m) ± t · se / (m (1 - m)), mapped back); and the report's
(`orchestrator.report.statistics.interval`: Student t, widened from BCA_FROM seeds on to hold BCa's
interval too; for a mean of accuracies `bounded_interval`, which also holds the logit t interval
where the t interval reaches past 0 or 1). Each is clipped to the range of the values ([0, 1], or
[-1, 1] for a difference) as the report clips, and shown as coverage (median width); NaN bounds
count as a miss. A well-calibrated 95% interval covers about 0.95; the count's standard error is
about sqrt(0.95 * 0.05 / REPS) (0.005 at 2000).

    python benchmarks/ci_coverage.py [--reps 2000] [--boot 1000] [--seed 0] [--seeds 3 5 10 15 20]
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
from orchestrator.report.statistics import BCA_FROM, bounded_interval, interval, logit_t_interval

SEEDS = (3, 5, 10, 15, 20)
BETA = (45.0, 5.0)
BUDGETS = np.array([0, 10, 30, 100, 300, 1000, 3000], dtype=float)
TARGET = 0.8

MASK = ((0.70, 0.03), (0.97, 0.01))  # (low mode, high mode): (mean, sd)
ACC = ((0.40, 0.05), (0.82, 0.02))
# name: (A's modes as (weight, mean, sd), B's (mean, sd), shared seed sd)
PROCESSES = {
    **{f"mask {p:.2f}": (((p, *MASK[0]), (1 - p, *MASK[1])), (0.95, 0.01), 0.01) for p in (0.1, 0.2, 0.33)},
    "acc 0.20": (((0.2, *ACC[0]), (0.8, *ACC[1])), (0.78, 0.02), 0.02),
    "ceiling": (((1.0, 0.99, 0.01),), (0.98, 0.01), 0.005),
}


def clipped_mean(mean, sd) -> float:
    """E[clip(X, 0, 1)] for X ~ N(mean, sd)."""
    a, b = (0 - mean) / sd, (1 - mean) / sd
    inside = mean * (stats.norm.cdf(b) - stats.norm.cdf(a)) + sd * (stats.norm.pdf(a) - stats.norm.pdf(b))
    return inside + stats.norm.sf(b)  # values above 1 count as 1


def draw_pairs(rng, process: str, reps: int, seeds: int):
    """reps x seeds values of A and of B (clipped to [0, 1]), and their true means."""
    modes, (b_mean, b_sd), shared = PROCESSES[process]
    weights = np.array([w for w, _, _ in modes])
    pick = rng.choice(len(modes), p=weights / weights.sum(), size=(reps, seeds))
    means, sds = np.array([m for _, m, _ in modes])[pick], np.array([s for _, _, s in modes])[pick]
    seed = rng.normal(0, shared, size=(reps, seeds))
    a = np.clip(seed + rng.normal(means, sds), 0, 1)
    b = np.clip(seed + rng.normal(b_mean, b_sd, size=(reps, seeds)), 0, 1)
    truth_a = sum(w * clipped_mean(m, np.hypot(s, shared)) for w, m, s in modes)
    return a, b, truth_a, clipped_mean(b_mean, np.hypot(b_sd, shared))


def draw(rng, process: str, reps: int, seeds: int) -> tuple[np.ndarray, float]:
    """reps tables of `seeds` values of one series, and their true mean."""
    if process == "normal":
        return rng.normal(0.7, 0.1, size=(reps, seeds)), 0.7
    if process == "beta":
        return rng.beta(*BETA, size=(reps, seeds)), BETA[0] / sum(BETA)
    a, _, truth, _ = draw_pairs(rng, process, reps, seeds)
    return a, truth


def bootstraps(values: np.ndarray, n_boot: int, rng, chunk: int = 250):
    """Percentile and bootstrap-t 95% intervals of the mean, per row: ((lo, hi), (lo, hi))."""
    k = values.shape[1]
    out = [], [], [], []
    for start in range(0, len(values), chunk):  # reps x n_boot x seeds at once would be large
        part = values[start : start + chunk]
        mean, se = part.mean(axis=1, keepdims=True), part.std(axis=1, ddof=1, keepdims=True) / np.sqrt(k)
        picks = np.take_along_axis(part[:, None, :], rng.integers(0, k, size=(len(part), n_boot, k)), axis=2)
        means, ses = picks.mean(axis=2), picks.std(axis=2, ddof=1) / np.sqrt(k)
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample of one value: t = ±inf (0/0 -> 0)
            t = np.nan_to_num((means - mean) / ses, nan=0.0, posinf=np.inf, neginf=-np.inf)
            t_lo, t_hi = np.quantile(t, [0.025, 0.975], axis=1)
            out[2].append(mean[:, 0] - t_hi * se[:, 0])
            out[3].append(mean[:, 0] - t_lo * se[:, 0])
        out[0].append(np.quantile(means, 0.025, axis=1))
        out[1].append(np.quantile(means, 0.975, axis=1))
    lo, hi, tlo, thi = (np.concatenate(o) for o in out)
    return (lo, hi), (np.where(np.isnan(tlo), -np.inf, tlo), np.where(np.isnan(thi), np.inf, thi))


def bca(values: np.ndarray, n_boot: int, rng):
    """scipy's BCa bootstrap of the mean, per row; NaN where it is degenerate (few seeds)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning at 2-3 seeds: counted as a miss
        res = stats.bootstrap((values,), np.mean, axis=-1, n_resamples=n_boot, method="BCa", random_state=rng, batch=50)
    return res.confidence_interval.low, res.confidence_interval.high


def logit_t(values: np.ndarray):
    """t interval of a mean of accuracies on the logit scale (delta method), per row; the plain t
    interval where the mean is 0 or 1."""
    (lo, hi), (t_lo, t_hi) = logit_t_interval(values), t_interval(values)
    return np.where(np.isnan(lo), t_lo, lo), np.where(np.isnan(hi), t_hi, hi)


def coverage(interval, truth) -> float:
    lo, hi = interval
    return float(np.mean((lo <= truth) & (truth <= hi)))  # NaN bounds count as a miss


def scored(interval, truth, low: float, high: float) -> tuple[float, float]:
    """(coverage, median width) of `interval` clipped to [low, high], as the report clips."""
    lo, hi = np.clip(interval[0], low, high), np.clip(interval[1], low, high)
    return coverage((lo, hi), truth), float(np.nanmedian(hi - lo))


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


def table(title: str, rows, columns: list[str]) -> None:
    """Print a markdown table: one row per (process, seeds), one column per interval: its coverage
    (median width)."""
    print(f"\n{title}\n\n| process | seeds | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for process, seeds, values in rows:
        print(f"| {process} | {seeds} | " + " | ".join(f"{c:.3f} ({w:.3f})" for c, w in values) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2000, help="synthetic tables per cell")
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seed counts")
    args = parser.parse_args()
    print("$ python " + shlex.join(sys.argv))
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()

    rows = []
    for process in ("normal", "beta", *PROCESSES):
        for seeds in args.seeds:
            values, truth = draw(rng, process, args.reps, seeds)
            percentile, boot_t = bootstraps(values, args.boot, rng)
            bc = bca(values, args.boot, rng)
            report = bounded_interval(values, 0.0, 1.0)
            intervals = (t_interval(values), logit_t(values), percentile, boot_t, bc, report)
            rows.append((process, seeds, [scored(i, truth, 0.0, 1.0) for i in intervals]))
    print(f"\n(the report's interval holds BCa's from {BCA_FROM} seeds on, and logit t's where t passes 0 or 1)")
    report = "report: t ∪ BCa ∪ logit near a bound"
    columns = ["Student t", "logit t", "percentile bootstrap", "bootstrap-t", "BCa", report]
    table(f"Coverage of the 95% CI of a series' mean ({args.reps} tables per cell)", rows, columns)

    rows = []
    for process in PROCESSES:
        for seeds in args.seeds:
            a, b, truth_a, truth_b = draw_pairs(rng, process, args.reps, seeds)
            diff, truth = a - b, truth_a - truth_b
            percentile, boot_t = bootstraps(diff, args.boot, rng)
            intervals = (t_interval(diff), percentile, boot_t, bca(diff, args.boot, rng), interval(diff))
            rows.append((process, seeds, [scored(i, truth, -1.0, 1.0) for i in intervals]))
    columns = ["Student t", "percentile bootstrap", "bootstrap-t", "BCa", "report: t ∪ BCa"]
    table(f"Coverage of the 95% CI of a paired difference's mean ({args.reps} tables per cell)", rows, columns)

    print(f"\nCoverage of the 95% CI of the budget to reach {TARGET} (logistic curves, {args.reps} per cell)\n")
    print(f"{'seeds':>5}  {'percentile bootstrap':>20} {'inverted t bands (report)':>25}")
    for seeds in (3, 5, 10):
        curves, truth = curve_family(rng, args.reps, seeds)
        old = coverage(bootstrap_crossing(curves, args.boot, rng), truth)
        _, lo, hi = budget_interval(BUDGETS, curves, TARGET)
        print(f"{seeds:>5}  {old:>20.3f} {coverage((lo, hi), truth):>25.3f}")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
