"""The report's numbers: per series and budget, the mean and interval over seeds of every summarised
column (`orchestrator.results.summarised_columns`); per series, the budget to reach a target
accuracy, the curve area and the data saved against its reference; paired differences from another
method's series; means over a sweep axis.

Intervals of a mean over seeds (`interval`) are Student t intervals, mean ± t(0.975, k-1) · s / sqrt(k),
widened from `BCA_FROM` (10) seeds on to also hold the BCa bootstrap interval: below 10 seeds every
bootstrap undercovers even normal data, and from 10 seeds on bimodal outcomes (a share of failing
seeds) skew the mean, which BCa follows and t does not. Measured coverages, per process and seed
count, and the choice: docs/STATISTICS.md. No interval covers a low mode the seeds have not shown,
so `summarise` flags cells with fewer than `FEW_SEEDS` (15) seeds (`few_seeds`), the count the
chosen interval needs for about 95% on bimodal outcomes whose failures are not rare (p >= 0.2).
One seed gives no interval: NaN bounds, not (v, v). The budget-to-target
interval inverts the pointwise t bands of the mean curve, [where the upper band first reaches the
target, where the lower band does], so it is not exactly 95% (`tests/orchestrator/report/test_statistics.py`
holds its coverage to 0.9). The log-budget axis is x = log10(1 + n), so that n = 0 has a place on it.
An accuracy's interval is kept inside [0, 1] and a difference of accuracies inside [-1, 1]
(`bounds`): clipping a bound at the range never excludes a value the metric can take, so it cannot
lower coverage. Where the t interval of a mean reaches past its metric's bound (accuracies at the
ceiling), the values pile up against the bound and t undercovers (0.92 at 3 seeds); the mean's
interval (`bounded_interval`) then also holds the t interval on the logit scale of the range.

Findings (`findings`) turn each paired difference into a verdict: `better` / `worse` when its
interval excludes 0, `equivalent` only when the whole interval lies inside ±margin, a margin
declared before the data are read (two one-sided tests, each at 2.5%), `gated` when a quality gate
of either side failed, `undecided` otherwise, one seed included: "not detected" is never "absent"."""

from __future__ import annotations

import fnmatch
import json
import re
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from methods import ANALYSES
from orchestrator import results
from orchestrator.config import ConfigError
from orchestrator.report.series import axis_groups, has_versus, partner, prepare, reference_for, versus_setting

METRIC = "test_acc"
LEVEL = 0.95
BCA_FROM = 10  # seeds from which `interval` also holds the BCa interval (docs/STATISTICS.md)
FEW_SEEDS = 15  # fewer seeds: the interval undercovers bimodal outcomes (docs/STATISTICS.md)
BOOT = 2000  # BCa resamples, drawn from a fixed seed so that a report is reproducible


def t_interval(values, level: float = LEVEL, axis: int = -1):
    """Student t CI of the mean of `values` along `axis`, ignoring non-finite entries: (lo, hi),
    floats for 1-D input, arrays otherwise; NaN bounds where fewer than two values are finite."""
    v = np.asarray(values, dtype=float)
    v = np.where(np.isfinite(v), v, np.nan)
    k = np.sum(np.isfinite(v), axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices and k = 1 give NaN, as meant
        mean = np.nanmean(v, axis=axis)
        sd = np.nanstd(v, axis=axis, ddof=1)
        half = stats.t.ppf(0.5 + level / 2, np.maximum(k - 1, 1)) * sd / np.sqrt(np.maximum(k, 1))
    lo = np.where(k >= 2, mean - half, np.nan)
    hi = np.where(k >= 2, mean + half, np.nan)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def interval(values, level: float = LEVEL, axis: int = -1):
    """The report's CI of the mean of `values` along `axis`: `t_interval`, widened where there are at
    least `BCA_FROM` values to also hold scipy's BCa bootstrap interval (a row with a non-finite or
    constant value keeps the t interval). Bounds as `t_interval`'s."""
    v = np.asarray(values, dtype=float)
    lo, hi = t_interval(v, level, axis)
    if v.shape[axis] < BCA_FROM:
        return lo, hi
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate rows (constant values): NaN bounds, the t interval stands
        ci = stats.bootstrap((v,), np.mean, axis=axis, confidence_level=level, n_resamples=BOOT, method="BCa",
                             random_state=np.random.default_rng(0), batch=200).confidence_interval  # fmt: skip
    lo, hi = np.fmin(lo, ci.low), np.fmax(hi, ci.high)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def bounded_interval(values, low: float = -np.inf, high: float = np.inf, level: float = LEVEL, axis: int = -1):
    """The report's CI of the mean of a metric that lies in [`low`, `high`] (an accuracy: [0, 1]):
    `interval`, widened where the t interval reaches past a bound to also hold the t interval on the
    logit scale of the range (delta method: logit(m) ± t · se / (m (1 - m)), m and se scaled to
    [0, 1], mapped back), then clipped to the range. Near a bound the values pile up against it, the
    mean's sampling distribution is skewed away from it, and symmetric t undercovers (0.92 at 3-5
    seeds on accuracies at the ceiling); the logit interval reaches further from the bound (0.96).
    Where t stays inside the range, or the range is not finite, this is `interval`, clipped, so the
    interval jumps where t first reaches the bound; where seeds sit exactly at the bound the logit
    interval is wide (seeds 1, 1, 0.97: [0.56, 1]). Bounds as `t_interval`'s. Measured:
    docs/STATISTICS.md."""
    v = np.asarray(values, dtype=float)
    lo, hi = interval(v, level, axis)
    if np.isfinite(low) and np.isfinite(high):
        t_lo, t_hi = t_interval(v, level, axis)
        l_lo, l_hi = logit_t_interval(v, low, high, level, axis)
        use = ((t_lo < low) | (t_hi > high)) & np.isfinite(l_lo) & np.isfinite(l_hi)
        lo, hi = np.where(use, np.fmin(lo, l_lo), lo), np.where(use, np.fmax(hi, l_hi), hi)
    lo = np.where(np.isnan(lo), lo, np.maximum(lo, low))
    hi = np.where(np.isnan(hi), hi, np.minimum(hi, high))
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def logit_t_interval(values, low: float = 0.0, high: float = 1.0, level: float = LEVEL, axis: int = -1):
    """The t interval of the mean of values in [`low`, `high`] on the logit scale of the range (delta
    method: logit(m) ± t · se / (m (1 - m)), m and se scaled to [0, 1]), mapped back: (lo, hi) as
    `t_interval`'s, NaN where fewer than two values are finite or the mean lies on a bound."""
    v = np.asarray(values, dtype=float)
    v = np.where(np.isfinite(v), v, np.nan)
    k = np.sum(np.isfinite(v), axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # k < 2 and means on a bound: NaN
        u = (v - low) / (high - low)
        m, se = np.nanmean(u, axis=axis), np.nanstd(u, axis=axis, ddof=1) / np.sqrt(np.maximum(k, 1))
        half = stats.t.ppf(0.5 + level / 2, np.maximum(k - 1, 1)) * se / (m * (1 - m))
        centre = np.log(m) - np.log1p(-m)
        lo = low + (high - low) * stats.logistic.cdf(centre - half)
        hi = low + (high - low) * stats.logistic.cdf(centre + half)
    ok = (k >= 2) & (m > 0) & (m < 1) & np.isfinite(half)
    lo, hi = np.where(ok, lo, np.nan), np.where(ok, hi, np.nan)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def bounds(metric: str) -> tuple[float, float]:
    """The range `metric` can take: accuracies (columns named `*acc`) lie in [0, 1], an analysis'
    column in the `bounds` it declares (a share such as shape bias: [0, 1]); others are unbounded."""
    if metric.endswith("acc"):
        return 0.0, 1.0
    for _, analysis in ANALYSES.items():
        for pattern, column in analysis.columns.items():
            if column.bounds is not None and fnmatch.fnmatchcase(metric, pattern):
                return column.bounds
    return -np.inf, np.inf


def clipped(interval: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    """`interval` inside [low, high]; NaN bounds stay NaN."""
    lo, hi = interval
    return (lo if np.isnan(lo) else max(lo, low), hi if np.isnan(hi) else min(hi, high))


def log_budget(n) -> np.ndarray:
    return np.log10(1.0 + np.asarray(n, dtype=float))


def first_crossing(n: np.ndarray, acc: np.ndarray, target: float) -> np.ndarray:
    """`budget_to_reach` for every curve along the last axis of `acc` at once."""
    n, acc = np.asarray(n, dtype=float), np.asarray(acc, dtype=float)
    above = acc >= target  # NaN counts as not reached
    reached = above.any(axis=-1)
    i = np.argmax(above, axis=-1)
    prev = np.maximum(i - 1, 0)
    a0 = np.take_along_axis(acc, prev[..., None], axis=-1)[..., 0]
    a1 = np.take_along_axis(acc, i[..., None], axis=-1)[..., 0]
    x = log_budget(n)
    x0, x1 = x[prev], x[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(a1 > a0, (target - a0) / (a1 - a0), 1.0)
    crossing = 10 ** (x0 + t * (x1 - x0)) - 1.0
    crossing = np.where(i == 0, n[0], crossing)
    return np.where(reached, crossing, np.inf)


def budget_to_reach(n: np.ndarray, acc: np.ndarray, target: float) -> float:
    """The budget at which the curve (n ascending) first reaches `target`, linear in log10(1 + n)
    between the two measured budgets around the crossing; inf if it never does."""
    return float(first_crossing(n, acc, target))


def budget_interval(n: np.ndarray, seeds_by_budget: np.ndarray, target: float, level: float = LEVEL):
    """(n_to_target, lo, hi) from a seeds x budgets matrix (NaN where a trial is missing), the CI
    from the t bands (module docstring). Works on stacks of matrices (..., seeds, budgets)."""
    m = np.asarray(seeds_by_budget, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(m, axis=-2)
    lo_band, hi_band = t_interval(m, level, axis=-2)
    point = first_crossing(n, mean, target)
    # A band that is NaN at some budget (one seed there) cannot be inverted.
    defined = np.all(np.isfinite(lo_band), axis=-1)
    lo = np.where(defined, first_crossing(n, hi_band, target), np.nan)
    hi = np.where(defined, first_crossing(n, lo_band, target), np.nan)
    return (float(point), float(lo), float(hi)) if np.ndim(point) == 0 else (point, lo, hi)


def curve_area(n: np.ndarray, acc: np.ndarray) -> float:
    """Mean accuracy over the log-budget axis (trapezoids), in [0, 1]; acc itself for one budget."""
    x, acc = log_budget(n), np.asarray(acc, dtype=float)
    if len(x) == 1 or x[-1] == x[0]:
        return float(acc.mean())
    return float(np.trapezoid(acc, x) / (x[-1] - x[0]))


def summarise(table: pd.DataFrame, level: float = LEVEL, columns: list[str] | None = None) -> pd.DataFrame:
    """Per (series, n_train): seeds, `few_seeds` (fewer than `FEW_SEEDS`: the interval may undercover
    bimodal outcomes), and mean/std/CI (`bounded_interval` in the column's `bounds`, `level`) of every
    summarised column (or of `columns`)."""
    done, info = prepare(table)
    metrics = [c for c in (columns or results.summarised_columns(done)) if c in done.columns]
    out = []
    for (series, n_train), group in done.groupby(["series", "n_train"], sort=False):
        seeds = int(group["seed"].nunique())
        row = {**_ident(info, series), "n_train": n_train, "seeds": seeds, "few_seeds": seeds < FEW_SEEDS}
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                continue
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[f"{metric}_ci_lo"], row[f"{metric}_ci_hi"] = bounded_interval(values, *bounds(metric), level)
        out.append(row)
    return _ordered(pd.DataFrame(out), ["n_train"])


def _ident(info: pd.DataFrame, series: str) -> dict[str, Any]:
    """The identifying columns every summary row of a series starts with."""
    return {k: v for k, v in info.loc[series].items() if k not in ("flat", "own")}


def _ordered(frame: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame.sort_values(["task", "label", *extra], kind="stable").reset_index(drop=True)


def _seed_frames(done: pd.DataFrame, metric: str) -> dict[str, pd.DataFrame]:
    """Per series, `metric` as seeds (rows) x budgets (columns, ascending); NaN where a trial is missing."""
    frames = {}
    for series, group in done.groupby("series", sort=False):
        values = group.assign(_v=pd.to_numeric(group[metric], errors="coerce"))
        wide = values.pivot_table(index="seed", columns="n_train", values="_v", aggfunc="first", dropna=False)
        frames[series] = wide.sort_index(axis=1)
    return frames


def headline(table: pd.DataFrame, target: float = 0.9, metric: str = METRIC, level: float = LEVEL) -> pd.DataFrame:
    """Per series: budget to reach `target` with its CI, curve area, and ratio to the reference."""
    done, info = prepare(table)
    rows = []
    for series, wide in _seed_frames(done, metric).items():
        n, m = wide.columns.to_numpy(dtype=float), wide.to_numpy(dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(m, axis=0)
        point, lo, hi = budget_interval(n, m, target, level)
        rows.append({**_ident(info, series), "seeds": len(m), "target": target, "n_to_target": point,
                     "n_to_target_ci_lo": lo, "n_to_target_ci_hi": hi, "max_budget": float(n.max()),
                     "area": curve_area(n, mean)})  # fmt: skip
    out = _ordered(pd.DataFrame(rows), [])
    return out if out.empty else _with_ratio(out, info)


def _with_ratio(head: pd.DataFrame, info: pd.DataFrame) -> pd.DataFrame:
    """Sample-efficiency ratio of each series against its closest reference series of the same task."""
    head = head.assign(ratio_vs_reference=np.nan, ratio_is_lower_bound=False, reference_label=None)
    by_series = head.set_index("series")
    for idx, row in head.iterrows():
        ref = reference_for(row["series"], info)
        if ref is None or ref not in by_series.index:
            continue
        n_ref = float(by_series.loc[ref, "n_to_target"])
        bound = not np.isfinite(n_ref)
        reference = float(by_series.loc[ref, "max_budget"]) if bound else n_ref
        head.loc[idx, "reference_label"] = info.loc[ref, "label"]
        if np.isfinite(row["n_to_target"]) and row["n_to_target"] > 0:
            # The reference needs `ratio` times the data; a lower bound when it never got there.
            head.loc[idx, "ratio_vs_reference"] = reference / row["n_to_target"]
            head.loc[idx, "ratio_is_lower_bound"] = bound
    return head


def _check_versus(info: pd.DataFrame, versus: str) -> None:
    if has_versus(info, versus):
        return
    if (setting := versus_setting(versus)) is None:
        have = ", ".join(sorted(set(info["method"]))) or "none"
        raise ConfigError(f"--versus {versus}: no finished trial ran {versus!r}; methods with results: {have}")
    path, _ = setting
    values = sorted({json.dumps(flat[path], default=str) for flat in info["flat"] if path in flat})
    have = f"its values here: {', '.join(values)}" if values else "no finished trial's config has that path"
    raise ConfigError(f"--versus {versus}: no finished trial has that value at {path}; {have}")


def paired_differences(table: pd.DataFrame, versus: str, metric: str = METRIC, level: float = LEVEL) -> pd.DataFrame:
    """Each series against its `series.partner` of `versus`, a method (the same settings wherever both
    have them) or `PATH=VALUE` (the same method and settings but VALUE at PATH): per budget, the
    difference of `metric` paired by seed (a seed's two trials share its source model and data draw),
    its mean and CI (`interval`) over the seeds both have. A series without a partner is left out,
    never paired with another. ConfigError when no finished trial has `versus`."""
    done, info = prepare(table)
    _check_versus(info, versus)
    by_series, gated = _seed_frames(done, metric), _gated(done)
    low, high = bounds(metric)
    rows = []
    for series in info.index:
        ref = partner(series, info, versus) if info.loc[series, "method"] != versus else None
        if ref is None:
            continue
        a, b = by_series[series], by_series[ref]
        for n in sorted(set(a.columns) & set(b.columns)):
            diff = (a[n] - b[n]).dropna().to_numpy(dtype=float)  # aligned on seed: pairs only
            if len(diff) == 0:
                continue
            lo, hi = clipped(interval(diff, level), low - high, high - low)
            failed = sorted(gated.get((series, n), set()) | gated.get((ref, n), set()))
            rows.append({**_ident(info, series), "versus": info.loc[ref, "label"], "n_train": n, "pairs": len(diff),
                         "diff_mean": float(diff.mean()), "diff_ci_lo": lo, "diff_ci_hi": hi,
                         "gates_failed": ",".join(failed)})  # fmt: skip
    return _ordered(pd.DataFrame(rows), ["n_train"])


def _gated(done: pd.DataFrame) -> dict[tuple[str, Any], set[str]]:
    """(series, budget) -> the quality gates that failed in any of its rows (`gates_failed` column)."""
    if "gates_failed" not in done:
        return {}
    out: dict[tuple[str, Any], set[str]] = {}
    for series, n, failed in done[["series", "n_train", "gates_failed"]].itertuples(index=False):
        if isinstance(failed, str) and failed:
            out.setdefault((series, n), set()).update(failed.split(","))
    return out


VERDICTS = ("better", "worse", "equivalent", "undecided", "gated")


def verdict(lo: float, hi: float, margin: float | None = None, gated: bool = False) -> str:
    """The verdict on a difference with interval [lo, hi] (module docstring)."""
    if gated:
        return "gated"
    # An infinite bound is one side left open (`headline_differences`): the other side still decides.
    if lo > 0 and not np.isnan(hi):
        return "better"
    if hi < 0 and not np.isnan(lo):
        return "worse"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "undecided"
    if margin is not None and -margin < lo and hi < margin:
        return "equivalent"
    return "undecided"


def finding_id(label: str, versus: str, n_train: float, metric: str = METRIC) -> str:
    """A finding's anchor (`findings.md`) and key (`findings.parquet`'s `id`): `{label}-vs-{versus}-n{n}`
    (`{metric}-{label}-vs-...` for a metric other than test accuracy), lower case, each run of
    characters other than letters, digits, `.` and `_` as one `-`."""
    text = f"{label}-vs-{versus}-n{float(n_train):g}"
    text = text if metric == METRIC else f"{metric}-{text}"
    return re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-")


def findings(diffs: pd.DataFrame, metric: str = METRIC, margin: float | None = None) -> pd.DataFrame:
    """One finding per paired difference (`paired_differences`, `mean_over_differences`): `series`,
    `label`, `versus`, `metric`, `n_train`, `diff`, `ci_lo`, `ci_hi`, `seeds`, `margin`, `verdict`, `id`
    (`finding_id`, which documents cite)."""
    if margin is not None and not margin > 0:
        raise ConfigError(f"--margin {margin}: an equivalence margin must be positive, e.g. 0.03")
    if diffs is None or diffs.empty:
        return pd.DataFrame(columns=["series", "label", "versus", "metric", "n_train", "diff", "ci_lo", "ci_hi",
                                     "seeds", "margin", "verdict", "id"])  # fmt: skip
    gates = diffs["gates_failed"] if "gates_failed" in diffs else pd.Series("", index=diffs.index)
    out = pd.DataFrame({
        "series": diffs["series"] if "series" in diffs else diffs["label"],
        "label": diffs["label"], "versus": diffs["versus"], "metric": metric, "n_train": diffs["n_train"],
        "diff": diffs["diff_mean"], "ci_lo": diffs["diff_ci_lo"], "ci_hi": diffs["diff_ci_hi"],
        "seeds": diffs["pairs"], "margin": np.nan if margin is None else margin, "gates_failed": gates.fillna(""),
    })  # fmt: skip
    if "censored" in diffs:  # headline findings: seeds whose d is only a bound (`headline_differences`)
        out["censored"] = diffs["censored"].to_numpy()
    cells = zip(out["ci_lo"], out["ci_hi"], out["gates_failed"], strict=True)
    out["verdict"] = [verdict(lo, hi, margin, bool(gates)) for lo, hi, gates in cells]
    out["id"] = [finding_id(*key, metric) for key in zip(out["label"], out["versus"], out["n_train"], strict=True)]
    return out


def headline_metric(target: float) -> str:
    """The `metric` of the headline's findings: `budget_to_{target}`."""
    return f"budget_to_{target:g}"


def headline_differences(
    table: pd.DataFrame, versus: str, target: float = 0.9, metric: str = METRIC, level: float = LEVEL
) -> pd.DataFrame:
    """The headline as paired differences: each series against its `versus` partner (as
    `paired_differences` pairs them), per seed the data its curve saves in reaching `target`,
    d = log10(1 + n_partner) - log10(1 + n_series) (each n from `first_crossing` on that seed's curve,
    over the budgets both have; d > 0: the series reaches the target with less data, 10**d the factor),
    then the mean and CI (`interval`) of d over the seeds both have. A curve that never reaches the
    target only bounds its n from below by the largest budget, one already at the target at the first
    budget only from above by it: d is then a bound from one side, and the side of the interval it
    cannot support is left open (-inf or +inf; both when a seed's d is bounded from neither or both
    sides). `censored`: the seeds whose d is such a bound. `n_train` is the largest budget, the range
    the crossing was sought in. Pairs with fewer than two budgets in common, or where neither curve
    reaches the target in any seed, are left out."""
    done, info = prepare(table)
    _check_versus(info, versus)
    by_series, gated = _seed_frames(done, metric), _gated(done)
    rows = []
    for series in info.index:
        ref = partner(series, info, versus) if info.loc[series, "method"] != versus else None
        if ref is None:
            continue
        budgets = sorted(set(by_series[series].columns) & set(by_series[ref].columns))
        if len(budgets) < 2:  # one budget has no crossing to find
            continue
        a, b = by_series[series][budgets], by_series[ref][budgets]
        seeds = a.index.intersection(b.index)
        a, b = a.loc[seeds], b.loc[seeds]
        both = a.notna().all(axis=1) & b.notna().all(axis=1)  # a seed counts with its whole curve on both sides
        a, b = a[both].to_numpy(dtype=float), b[both].to_numpy(dtype=float)
        if len(a) == 0:
            continue
        n = np.asarray(budgets, dtype=float)
        mine, theirs = first_crossing(n, a, target), first_crossing(n, b, target)
        # Above the range: n is only known to exceed the largest budget; at the first budget, only to be
        # at most it. Each makes d a bound from one side.
        above_mine, above_theirs = ~np.isfinite(mine), ~np.isfinite(theirs)
        below_mine, below_theirs = (a[:, 0] >= target) & (n[0] > 0), (b[:, 0] >= target) & (n[0] > 0)
        x_mine = log_budget(np.where(above_mine, n.max(), mine))
        x_theirs = log_budget(np.where(above_theirs, n.max(), theirs))
        d = np.where(above_mine & above_theirs, np.nan, x_theirs - x_mine)
        if np.isnan(d).all():  # neither curve reaches the target in any seed: nothing to compare
            continue
        lo, hi = interval(d[np.isfinite(d)], level) if np.isfinite(d).sum() >= 2 else (np.nan, np.nan)
        d_low, d_high = above_theirs | below_mine, above_mine | below_theirs  # d only a lower / upper bound
        if np.isnan(d).any() or (d_low & d_high).any():
            lo, hi = -np.inf, np.inf
        else:
            lo = -np.inf if d_high.any() else lo
            hi = np.inf if d_low.any() else hi
        failed = sorted(set().union(*(gated.get((s, m), set()) for s in (series, ref) for m in budgets)))
        rows.append({**_ident(info, series), "versus": info.loc[ref, "label"], "n_train": float(n.max()),
                     "pairs": len(d), "diff_mean": float(np.nanmean(d)) if np.isfinite(d).any() else np.nan,
                     "diff_ci_lo": lo, "diff_ci_hi": hi, "target": target,
                     "censored": int((d_low | d_high).sum()),
                     "gates_failed": ",".join(failed)})  # fmt: skip
    return _ordered(pd.DataFrame(rows), ["n_train"])


def mean_over(table: pd.DataFrame, axis: str, metric: str = METRIC, level: float = LEVEL) -> pd.DataFrame:
    """Series that differ only in the axis column `axis` (e.g. `model.n_layers`), combined: per budget
    and seed the mean over the axis values (where every value has that seed and budget), then the
    mean and CI (`interval`) of those over seeds (the paper's "mean of six depths"), reported beside the
    series. Raises ConfigError when `axis` is not an axis column of the results."""
    done, _, groups = axis_groups(table, axis)
    by_series = _seed_frames(done, metric)
    rows = []
    for members, label, first in groups:
        for n, k, mean, lo, hi in _per_seed_means([by_series[m] for m in members], level, bounds(metric)):
            rows.append({"task": first["task"], "method": first["method"], "label": label, "n_train": n,
                         "seeds": k, f"{metric}_mean": mean, f"{metric}_ci_lo": lo, f"{metric}_ci_hi": hi})  # fmt: skip
    return _ordered(pd.DataFrame(rows), ["n_train"])


def mean_over_differences(
    table: pd.DataFrame, axis: str, versus: str, metric: str = METRIC, level: float = LEVEL
) -> pd.DataFrame:
    """`paired_differences` averaged over `axis` as `mean_over` averages levels (the paper's gap "on
    the mean of six depths"), each axis value paired with its own `versus` partner. A group is left
    out unless every axis value has a partner."""
    done, info, groups = axis_groups(table, axis)
    _check_versus(info, versus)
    by_series = _seed_frames(done, metric)
    rows = []
    for members, label, first in groups:
        if first["method"] == versus:
            continue
        partners = [partner(m, info, versus) for m in members]
        if None in partners:
            continue
        frames = [by_series[m] - by_series[ref] for m, ref in zip(members, partners, strict=True)]
        for n, k, mean, lo, hi in _per_seed_means(frames, level):
            rows.append({"task": first["task"], "method": first["method"], "label": label, "versus": versus,
                         "n_train": n, "pairs": k, "diff_mean": mean, "diff_ci_lo": lo, "diff_ci_hi": hi})  # fmt: skip
    return _ordered(pd.DataFrame(rows), ["n_train"])


def _per_seed_means(frames: list[pd.DataFrame], level: float, limits: tuple[float, float] | None = None):
    """For each budget every frame has: (budget, seeds, mean, lo, hi) of the per-seed means over
    `frames`, over the seeds every frame has there; the interval is `bounded_interval`'s in `limits`
    (a metric's `bounds`), else `interval`'s inside [-1, 1], as `mean_over_differences` has always
    clipped it."""
    for n in sorted(set.intersection(*(set(f.columns) for f in frames))):
        per_value = pd.concat([f[n] for f in frames], axis=1).dropna()
        if not per_value.empty:
            seed_means = per_value.mean(axis=1).to_numpy(dtype=float)
            if limits is None:
                ci = clipped(interval(seed_means, level), -1.0, 1.0)
            else:
                ci = bounded_interval(seed_means, *limits, level)
            yield n, len(seed_means), float(seed_means.mean()), *ci
