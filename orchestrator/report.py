"""Reports: what a sweep says, as numbers with confidence intervals and as pictures.

`write_report([OUT, ...])` merges the results of one or more output directories and writes
`REPORT/` (default `OUT/report/`):

- `summary.parquet`: per series x budget, for every summarised column: seeds, mean, std and a 95%
  Student t confidence interval of the mean over seeds.
- `headline.parquet`: per series, the budget needed to reach a target accuracy (default 0.9,
  interpolated on the log-budget axis, with a 95% CI), the area under the data-efficiency curve, and
  the sample-efficiency ratio against the no-transfer reference series of the same task (a method
  registered with `reference=True`; of several, the one whose config differs from the series' in
  the fewest fields both have; named in `reference_label`).
- `mask_overlap.parquet`: Jaccard overlap of the discovered masks across seeds and across
  sparsities, beside the overlap two independent random masks of the same densities would have
  (only when the sweep's artifact store holds at least two masks).
- `summary.md`: the tables above in Markdown.
- `data_efficiency.png/.svg` (one panel per sparsity, one line per series, CI bands),
  `sparsity_vs_subtask.png/.svg`, one `<column>.png/.svg` per column an analysis declares with
  `plot=True`, and `mask_overlap.png/.svg`.
- `index.html`: all of the above on one page that reads offline.

Series. A series is one effective, result-determining trial config minus its seed and data fraction:
the rows' `series` column, a stable hash of `config_json` without `seed` and `data_fraction`
(computed here for result files older than that column). Statistics are taken per series, never
across series: two depths, learning rates, models or merged directories with different settings are
reported side by side, and two rows for one (series, seed, budget) are an error, not averaged. Each
series has a short `label`: the method (`@sparsity`), plus the config fields that differ between
the series of the same task that share that method label (`<method> @0.75
[model.n_layers=4]`); `family` is the same without the sparsity (a line of the sparsity figure).
Both tables carry `series`, `task`, `method`, `sparsity`, `label`, `family` and one column per
sweep axis (the dotted result columns, `model.n_layers`). The summarised columns are those
`orchestrator.results.summarised_columns` names: the core metrics and what analyses declare.

Intervals. Sweeps have few seeds (often 3). A percentile bootstrap of 3 values can form only 10
distinct means, and its "95%" interval covers the true mean about 75% of the time. We use the
Student t interval on the seed values, mean ± t(0.975, k-1) · s / sqrt(k), at every seed count k:
it is exact for normal noise and covers 0.93-0.95 for skewed, bounded accuracies from 2 seeds on.
BCa (`scipy.stats.bootstrap`) still undercovers at 10 and 20 seeds (about 0.89 and 0.92), so one
rule serves all k; `python benchmarks/ci_coverage.py` prints the comparison. One seed gives no
interval: its bounds are NaN, not (v, v).

The budget-to-target interval inverts the pointwise t bands of the mean curve: the interval for
`n_to_target` runs from the budget where the upper band first reaches the target to the budget
where the lower band first reaches it (inf when the lower band never does). If the true mean curve
lies inside both bands at the budgets around the crossing, the true crossing lies inside this
interval. The bands are pointwise, so this is not an exact 95% interval; its coverage depends on
the curves (about 0.98 at 3-5 seeds on the curve family of `tests/test_statistics.py`, whose bar
is 0.9), where the former percentile bootstrap of the crossing covered about 0.75 at 3 seeds.

The log-budget axis is x = log10(1 + n), so that n = 0 (no disambiguating data) has a place on it.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from common.config import stable_hash
from methods import ARTIFACTS, METHODS
from orchestrator import results
from orchestrator.artifacts import ArtifactStore, CorruptArtifact
from orchestrator.config import ConfigError

log = logging.getLogger(__name__)

METRIC = "test_acc"
LEVEL = 0.95
# Per-trial fields that vary inside a series; a series is everything else of the config.
PER_TRIAL = ("seed", "data_fraction")
# Keys of the old whole-sweep `config_json` (before rows carried their own effective config) that
# describe the grid or the machinery, not what a trial computed.
_SWEEP_ONLY = (
    "name", "plugins", "resources", "storage", "max_failures", "tuning", "method_overrides",
    "methods", "sparsities", "data_fractions", "seeds",
)  # fmt: skip
_MAX_LABEL_FIELDS = 3
MASK_OVERLAP_NOTE = (
    "Jaccard overlap |A∩B| / |A∪B| of discovered masks (all tensors together) that differ only in their seed "
    "(same sparsity) or only in their sparsity (same seed), mean [min, max] over pairs; random: "
    "d1·d2 / (d1 + d2 − d1·d2), the expected overlap of independent uniformly random masks of the same densities."
)


# --- statistics --------------------------------------------------------------------------


def t_interval(values, level: float = LEVEL, axis: int = -1):
    """Student t CI of the mean of `values` along `axis`, ignoring non-finite entries.

    Returns (lo, hi): floats for 1-D input, arrays otherwise. Fewer than two finite values give
    NaN bounds: one value says nothing about the spread.
    """
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
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def log_budget(n) -> np.ndarray:
    return np.log10(1.0 + np.asarray(n, dtype=float))


def first_crossing(n: np.ndarray, acc: np.ndarray, target: float) -> np.ndarray:
    """`budget_to_reach` for every curve along the last axis of `acc` at once."""
    n = np.asarray(n, dtype=float)
    acc = np.asarray(acc, dtype=float)
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
    """(n_to_target, lo, hi) from a seeds x budgets matrix (NaN where a trial is missing).

    The CI inverts the pointwise t bands of the mean curve: [where the upper band first reaches
    `target`, where the lower band first does]. Works on stacks of matrices (..., seeds, budgets).
    """
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
    if np.ndim(point) == 0:
        return float(point), float(lo), float(hi)
    return point, lo, hi


def curve_area(n: np.ndarray, acc: np.ndarray) -> float:
    """Mean accuracy over the log-budget axis (trapezoids), in [0, 1]; acc itself for one budget."""
    x, acc = log_budget(n), np.asarray(acc, dtype=float)
    if len(x) == 1 or x[-1] == x[0]:
        return float(acc.mean())
    return float(np.trapezoid(acc, x) / (x[-1] - x[0]))


# --- series ------------------------------------------------------------------------------


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.path: leaf}; lists are leaves."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, path) if isinstance(value, dict) and value else {path: value})
    return out


def series_config(row: dict[str, Any]) -> dict[str, Any]:
    """A row's effective config without its seed and data fraction: what its series is a hash of.

    Rows that carry a per-trial `config_json` (top-level `method`) are used as they are. Older rows
    carried the whole sweep's config: its grid keys are dropped and the row's own method, sparsity
    and transfer settings put in, so that old files never pool two methods or two settings.
    """
    text = row.get("config_json")
    config = json.loads(text) if isinstance(text, str) and text else {}
    if "method" not in config:
        config = {k: v for k, v in config.items() if k not in _SWEEP_ONLY}
        config["method"] = row["method"]
        config["sparsity"] = None if pd.isna(row.get("sparsity")) else float(row["sparsity"])
        config.setdefault("task", {"name": row.get("task")})
        config.setdefault("model", {"name": row.get("model")})
        if "transfer" not in config and not pd.isna(row.get("unmasked")):
            config["transfer"] = {
                "unmasked": row.get("unmasked"),
                "trainable_subnetwork": bool(row.get("trainable_subnetwork")),
            }
    return {k: v for k, v in config.items() if k not in PER_TRIAL}


def axis_columns(table: pd.DataFrame) -> list[str]:
    """The sweep's extra axes: columns named by a dotted config path (`model.n_layers`), and `variant`."""
    return results.axis_columns(table.columns)


def prepare(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Finished rows with a `series` column, and one row per series (indexed by series) with its
    task, method, sparsity, axis values, `label` and flattened config (`flat`).

    Raises ConfigError when two finished rows are the same trial (series, seed, n_train).
    """
    done = table[table["status"] == "done"].copy()
    done["sparsity"] = pd.to_numeric(done["sparsity"], errors="coerce")
    records = done.to_dict("records")
    configs = [series_config(r) for r in records]
    given = done["series"] if "series" in done else pd.Series([None] * len(done), index=done.index)
    done["series"] = [s if isinstance(s, str) and s else stable_hash(c) for s, c in zip(given, configs, strict=True)]
    info = _series_info(done, configs)
    _check_duplicates(done, info)
    return done, info


def _series_info(done: pd.DataFrame, configs: list[dict]) -> pd.DataFrame:
    axes = axis_columns(done)
    rows = {}
    for (_, row), config in zip(done.iterrows(), configs, strict=True):
        if row["series"] in rows:
            continue
        rows[row["series"]] = {
            "series": row["series"],
            "task": row["task"],
            "method": row["method"],
            "sparsity": row["sparsity"],
            **{axis: row[axis] for axis in axes},
            "flat": {k: v for k, v in flatten(config).items() if k not in ("method", "sparsity")},
        }
    info = pd.DataFrame(list(rows.values()), columns=["series", "task", "method", "sparsity", *axes, "flat"])
    base = [_label(m, s) for m, s in zip(info["method"], info["sparsity"], strict=True)]
    # Named axes (`variant`: not a config path) label a series by name where the name alone tells it apart.
    named = [
        " ".join(f"{a}={row[a]}" for a in axes if "." not in a and not pd.isna(row[a])) for _, row in info.iterrows()
    ]
    info["label"] = _labels(info["task"], base, info["flat"], info["series"], axes, named)
    # The family is the series without its sparsity: one line of the sparsity figure.
    info["family"] = _labels(info["task"], info["method"], info["flat"], info["series"], axes, named)
    return info.set_index("series", drop=False)


def _labels(tasks, bases, flats, series, axes: list[str], named: list[str] | None = None) -> list[str]:
    """Each base label, plus what tells apart the distinct configs of one task sharing it: their
    `named` tags (e.g. `variant=torch_init`) where those alone do, else the fields that differ."""
    tasks, bases, flats, series = list(tasks), list(bases), list(flats), list(series)
    labels = list(bases)
    groups: dict[tuple, dict[str, list[int]]] = {}
    for i, (task, base, flat) in enumerate(zip(tasks, bases, flats, strict=True)):
        groups.setdefault((task, base), {}).setdefault(_exact(flat), []).append(i)
    for configs in groups.values():
        if len(configs) < 2:
            continue
        members = list(configs.values())
        if named is not None:
            tags = [{named[i] for i in m} for m in members]
            if all(len(t) == 1 and "" not in t for t in tags) and len(set().union(*tags)) == len(members):
                for same in members:
                    for i in same:
                        labels[i] = f"{bases[i]} [{named[i]}]"
                continue
        fields = differing_fields([flats[m[0]] for m in members], first=axes)
        for same, differ in zip(members, fields, strict=True):
            for i in same:
                labels[i] = bases[i] + _bracket(differ)
    # Two series whose configs differ only in ways flattening cannot see still get distinct labels.
    count: dict[tuple, set] = {}
    for task, label, flat in zip(tasks, labels, flats, strict=True):
        count.setdefault((task, label), set()).add(_exact(flat))
    return [
        label if len(count[(t, label)]) == 1 else f"{label} #{s[:6]}"
        for t, label, s in zip(tasks, labels, series, strict=True)
    ]


def differing_fields(flats: list[dict[str, Any]], first: Sequence[str] = ()) -> list[list[str]]:
    """For each flattened config, `path=value` of the paths whose values are not the same in all;
    paths in `first` lead, the rest follow in name order."""
    paths = sorted(set().union(*flats))
    differ = [p for p in paths if len({_exact(f.get(p, "-")) for f in flats}) > 1]
    # A field only some configs have, in a block whose `name` differs (model.cam_suppression when
    # model.name differs), follows from that name: the name tells the series apart.
    names = {p.rsplit(".", 1)[0] for p in differ if p.endswith(".name")}
    differ = [p for p in differ if not (p.rsplit(".", 1)[0] in names and any(p not in f for f in flats))]
    differ.sort(key=lambda p: (p not in first, p))
    return [[f"{p}={_fmt_value(f.get(p, '-'))}" for p in differ] for f in flats]


def _bracket(fields: list[str]) -> str:
    if not fields:
        return ""
    shown = fields[:_MAX_LABEL_FIELDS]
    more = len(fields) - len(shown)
    return " [" + ", ".join(shown) + (f", +{more}" if more else "") + "]"


def _exact(value: Any) -> str:
    """A value as text for comparing: exact, unlike `_fmt_value`'s short floats."""
    return json.dumps(value, sort_keys=True, default=str)


def _fmt_value(value: Any) -> str:
    """A value as text for a label."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _check_duplicates(done: pd.DataFrame, info: pd.DataFrame) -> None:

    dup = done[done.duplicated(["series", "seed", "n_train"], keep=False)]
    if dup.empty:
        return
    series, seed, n_train = dup.iloc[0][["series", "seed", "n_train"]]
    same = dup[(dup["series"] == series) & (dup["seed"] == seed) & (dup["n_train"] == n_train)]
    fractions = sorted(set(pd.to_numeric(same["data_fraction"], errors="coerce")))
    cause = (
        f"data fractions {fractions} give the same budget; keep one of them in the sweep"
        if len(fractions) > 1
        else "two result directories ran the same trial; report one of them"
    )
    raise ConfigError(
        f"{info.loc[series, 'label']} (task {info.loc[series, 'task']}): {len(same)} finished rows for seed "
        f"{seed}, n_train {n_train} ({len(dup)} duplicate rows in all); {cause}"
    )


# --- summaries ---------------------------------------------------------------------------


def summarised(table: pd.DataFrame) -> list[str]:
    """The columns to summarise, as `orchestrator.results.summarised_columns` declares them."""

    return [c for c in results.summarised_columns(table) if c in table.columns]


def _ident(info: pd.DataFrame, series: str) -> dict[str, Any]:
    """The identifying columns every summary row of a series starts with."""
    return {k: v for k, v in info.loc[series].items() if k != "flat"}


def summarise(table: pd.DataFrame, level: float = LEVEL) -> pd.DataFrame:
    """Per (series, n_train): seeds, and mean/std/CI (Student t, `level`) of every summarised column."""
    done, info = prepare(table)
    metrics = summarised(done)
    out = []
    for (series, n_train), group in done.groupby(["series", "n_train"], sort=False):
        row = {**_ident(info, series), "n_train": n_train, "seeds": int(group["seed"].nunique())}
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                continue
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[f"{metric}_ci_lo"], row[f"{metric}_ci_hi"] = t_interval(values, level)
        out.append(row)
    return _ordered(pd.DataFrame(out), ["n_train"])


def _ordered(frame: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame.sort_values(["task", "label", *extra], kind="stable").reset_index(drop=True)


def _seed_frame(group: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`metric` as seeds (rows) x budgets (columns, ascending); NaN where a trial is missing."""
    values = group.assign(_v=pd.to_numeric(group[metric], errors="coerce"))
    wide = values.pivot_table(index="seed", columns="n_train", values="_v", aggfunc="first", dropna=False)
    return wide.sort_index(axis=1)


def _seed_matrix(group: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Budgets (ascending) and a seeds x budgets matrix of `metric` (NaN where a trial is missing)."""
    wide = _seed_frame(group, metric)
    return wide.columns.to_numpy(dtype=float), wide.to_numpy(dtype=float)


def headline(table: pd.DataFrame, target: float = 0.9, metric: str = METRIC, level: float = LEVEL) -> pd.DataFrame:
    """Per series: budget to reach `target` with its CI, curve area, and ratio to the reference."""
    done, info = prepare(table)
    rows = []
    for series, group in done.groupby("series", sort=False):
        n, m = _seed_matrix(group, metric)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(m, axis=0)
        point, lo, hi = budget_interval(n, m, target, level)
        rows.append(
            {
                **_ident(info, series),
                "seeds": len(m),
                "target": target,
                "n_to_target": point,
                "n_to_target_ci_lo": lo,
                "n_to_target_ci_hi": hi,
                "max_budget": float(n.max()),
                "area": curve_area(n, mean),
            }
        )
    out = _ordered(pd.DataFrame(rows), [])
    if out.empty:
        return out
    return _with_ratio(out, info)


def reference_methods() -> set[str]:
    """Methods registered as the no-transfer reference (`reference=True`) that data savings are measured against."""

    return {name for name, method in METHODS.items() if method.reference}


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


def reference_for(series: str, info: pd.DataFrame, methods: set[str] | None = None) -> str | None:
    """The reference series to compare `series` with: same task, a method of `methods` (default: the
    registered references), and of those the one whose config differs from it in the fewest fields
    both have (method-specific blocks do not count; nor does sparsity where one has none)."""
    task = info.loc[series, "task"]
    methods = reference_methods() if methods is None else methods
    candidates = info[info["method"].isin(methods) & (info["task"] == task)]
    if candidates.empty:
        return None
    ranked = sorted(candidates.itertuples(), key=lambda c: (distance(info, series, c.series), c.label))
    return ranked[0].series


def distance(info: pd.DataFrame, a: str, b: str) -> int:
    """How many settings two series differ in: fields both configs have, and sparsity where both have one."""
    fa, fb = info.loc[a, "flat"], info.loc[b, "flat"]
    sa, sb = info.loc[a, "sparsity"], info.loc[b, "sparsity"]
    differ = sum(_exact(fa[p]) != _exact(fb[p]) for p in set(fa) & set(fb))
    return differ + int(not pd.isna(sa) and not pd.isna(sb) and sa != sb)


def paired_differences(table: pd.DataFrame, versus: str, metric: str = METRIC, level: float = LEVEL) -> pd.DataFrame:
    """Each series against the series of method `versus` with the same settings wherever both have
    them (`distance` 0: same task, model, source, depth, variant, ...): per budget, the difference
    of `metric` paired by seed (a seed's two trials share its source model and its draw of the
    downstream data), its mean and Student t CI over the seeds both have. A series without such a
    partner (e.g. its partner has no finished trial yet) is left out, never paired with another.

    Raises ConfigError when no finished trial ran `versus`.
    """
    done, info = prepare(table)
    if versus not in set(info["method"]):
        have = ", ".join(sorted(set(info["method"]))) or "none"
        raise ConfigError(f"--versus {versus}: no finished trial ran {versus!r}; methods with results: {have}")
    by_series = {s: _seed_frame(g, metric) for s, g in done.groupby("series", sort=False)}
    rows = []
    for series in info.index:
        if info.loc[series, "method"] == versus:
            continue
        ref = reference_for(series, info, {versus})
        if ref is None or distance(info, series, ref) > 0:
            continue
        a, b = by_series[series], by_series[ref]
        for n in sorted(set(a.columns) & set(b.columns)):
            diff = (a[n] - b[n]).dropna().to_numpy(dtype=float)  # aligned on seed: pairs only
            if len(diff) == 0:
                continue
            lo, hi = t_interval(diff, level)
            rows.append(
                {
                    **_ident(info, series),
                    "versus": info.loc[ref, "label"],
                    "n_train": n,
                    "pairs": len(diff),
                    "diff_mean": float(diff.mean()),
                    "diff_ci_lo": lo,
                    "diff_ci_hi": hi,
                }
            )
    return _ordered(pd.DataFrame(rows), ["n_train"])


def versus_table(diffs: pd.DataFrame) -> pd.DataFrame:
    """Budgets as rows, series (`label − versus`) as columns, cells `mean [95% CI]`."""
    if diffs.empty:
        return pd.DataFrame()
    cells = diffs.assign(
        column=[f"{a} − {b}" for a, b in zip(diffs["label"], diffs["versus"], strict=True)],
        cell=[f"{m:+.3f}" if pd.isna(lo) else f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
              for m, lo, hi in zip(diffs["diff_mean"], diffs["diff_ci_lo"], diffs["diff_ci_hi"], strict=True)],
    )  # fmt: skip
    order = list(dict.fromkeys(cells["column"]))
    wide = cells.pivot_table(index=["task", "n_train"], columns="column", values="cell", aggfunc="first")
    wide = wide[[c for c in order if c in wide.columns]]
    wide.columns.name = None
    return wide.fillna("").reset_index()


def mean_over(table: pd.DataFrame, axis: str, metric: str = METRIC, level: float = LEVEL) -> pd.DataFrame:
    """Series that differ only in the value of the axis column `axis` (e.g. `model.n_layers`),
    combined: per budget and seed the mean over the axis values, then the mean and Student t CI of
    those per-seed means over seeds. A derived quantity (the paper's "mean of six depths"), reported
    beside the series, never in their place. A (seed, budget) is used only where every axis value
    has it. Raises ConfigError when `axis` is not an axis column of the results.
    """
    done, info, groups = _axis_groups(table, axis)
    by_series = {s: _seed_frame(g, metric) for s, g in done.groupby("series", sort=False)}
    rows = []
    for members, label, first in groups:
        values = sorted(info.loc[members, axis].tolist())
        for n, seed_means in _per_seed_means([by_series[m] for m in members]):
            lo, hi = t_interval(seed_means, level)
            rows.append({"task": first["task"], "method": first["method"], "sparsity": first["sparsity"],
                         "label": f"{label} [mean over {axis} = {', '.join(_fmt_value(v) for v in values)}]",
                         "n_train": n, "seeds": len(seed_means), f"{metric}_mean": float(seed_means.mean()),
                         f"{metric}_ci_lo": lo, f"{metric}_ci_hi": hi})  # fmt: skip
    return _ordered(pd.DataFrame(rows), ["n_train"])


def mean_over_differences(
    table: pd.DataFrame, axis: str, versus: str, metric: str = METRIC, level: float = LEVEL
) -> pd.DataFrame:
    """`paired_differences` averaged over `axis` as `mean_over` averages levels: per budget and
    seed, each axis value's difference from its `versus` partner (same settings, same axis value),
    the mean of those over the axis values, then the mean and Student t CI over seeds (the paper's
    gap "on the mean of six depths"). A group is left out unless every axis value has a partner."""
    done, info, groups = _axis_groups(table, axis)
    if versus not in set(info["method"]):
        raise ConfigError(f"--versus {versus}: no finished trial ran {versus!r}")
    by_series = {s: _seed_frame(g, metric) for s, g in done.groupby("series", sort=False)}
    rows = []
    for members, label, first in groups:
        if first["method"] == versus:
            continue
        partners = [reference_for(m, info, {versus}) for m in members]
        if any(ref is None or distance(info, m, ref) > 0 for m, ref in zip(members, partners, strict=True)):
            continue
        frames = [by_series[m] - by_series[ref] for m, ref in zip(members, partners, strict=True)]
        values = sorted(info.loc[members, axis].tolist())
        for n, seed_means in _per_seed_means(frames):
            lo, hi = t_interval(seed_means, level)
            rows.append({"task": first["task"], "method": first["method"], "sparsity": first["sparsity"],
                         "label": f"{label} [mean over {axis} = {', '.join(_fmt_value(v) for v in values)}]",
                         "versus": versus, "n_train": n, "pairs": len(seed_means),
                         "diff_mean": float(seed_means.mean()), "diff_ci_lo": lo, "diff_ci_hi": hi})  # fmt: skip
    return _ordered(pd.DataFrame(rows), ["n_train"])


def _axis_groups(table: pd.DataFrame, axis: str) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[list[str], str, Any]]]:
    """(finished rows, series info with `axis` filled in, groups): each group is the series that
    differ only in `axis` (two or more), with its label and first member's info."""
    done, info = prepare(table)
    paths = [a for a in axis_columns(done) if "." in a]
    if axis not in paths:
        raise ConfigError(
            f"--mean-over {axis}: not a config path these results vary along; their axes: {', '.join(paths) or 'none'}"
        )
    # The value from each series' config where a merged older file lacks the column.
    values = [v if not pd.isna(v) else f.get(axis) for v, f in zip(info[axis], info["flat"], strict=True)]
    info = info.assign(**{axis: values})
    info = info[info[axis].notna()]
    rest = {series: {k: v for k, v in flat.items() if k != axis} for series, flat in info["flat"].items()}
    groups: dict[tuple, list[str]] = {}
    for series, row in info.iterrows():
        key = (row["task"], row["method"], _exact(row["sparsity"]), _exact(rest[series]))
        groups.setdefault(key, []).append(series)
    firsts = [info.loc[members[0]] for members in groups.values()]
    labels = _labels(
        [f["task"] for f in firsts],
        [_label(f["method"], f["sparsity"]) for f in firsts],
        [rest[f["series"]] for f in firsts],
        [f["series"] for f in firsts],
        [a for a in axis_columns(done) if a != axis],
    )
    kept = [(m, label, first) for m, label, first in zip(groups.values(), labels, firsts, strict=True) if len(m) >= 2]
    return done, info, kept  # a group of one has nothing to average: the axis does not vary inside it


def _per_seed_means(frames: list[pd.DataFrame]):
    """(budget, per-seed means over `frames`) for each budget every frame has, over the seeds every
    frame has there."""
    for n in sorted(set.intersection(*(set(f.columns) for f in frames))):
        per_value = pd.concat([f[n] for f in frames], axis=1).dropna()
        if not per_value.empty:
            yield n, per_value.mean(axis=1).to_numpy(dtype=float)


# --- mask overlap ------------------------------------------------------------------------


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks; NaN when both are empty."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else float("nan")


def random_jaccard(d1, d2):
    """Expected Jaccard overlap of two independent uniformly random masks of densities d1, d2."""
    d1, d2 = np.asarray(d1, dtype=float), np.asarray(d2, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return d1 * d2 / (d1 + d2 - d1 * d2)


def artifact_roots(out_dirs: list) -> list[str]:
    """Each output directory's artifact store: sweep.json's storage.artifacts, else OUT/artifacts."""
    from orchestrator.outdir import as_outdir

    roots = []
    for location in out_dirs:
        out = as_outdir(location)
        text = out.read_text("sweep.json")
        config = (json.loads(text).get("config") or {}) if text else {}
        root = str((config.get("storage") or {}).get("artifacts") or out.join("artifacts"))
        if root not in roots:
            roots.append(root)
    return roots


def load_masks(roots: list[str]) -> list[dict[str, Any]]:
    """Every readable mask in the stores at `roots`: {key, seed, sparsity, mask (flat bool), density}.

    A store that does not exist or cannot be reached contributes nothing (the figure is optional).
    """

    masks, seen = [], set()
    for root in roots:
        if "://" not in root and not Path(root.removeprefix("file://")).is_dir():
            continue
        try:
            store = ArtifactStore(root)
            entries = [(kind, e) for kind in mask_kinds() for e in store.entries(kind.name)]
        except (OSError, ValueError) as err:  # unreachable or unauthorised remote store
            log.info("mask overlap: skipping artifact store %s (%s)", root, err)
            continue
        for kind, (key, _meta, path) in entries:
            if path in seen:
                continue
            seen.add(path)
            try:
                tensors, _ = store.load(kind.name, key)
                where = kind.describe(key)
                seed, sparsity, family = where["seed"], float(where["sparsity"]), where["family"]
            except (OSError, CorruptArtifact, KeyError, TypeError) as err:
                log.warning("mask overlap: skipping %s (%s)", path, err)
                continue
            flat = np.concatenate([tensors[name].reshape(-1).numpy() != 0 for name in sorted(tensors)])
            masks.append({"family": {"kind": kind.name, **family}, "seed": seed, "sparsity": sparsity,
                          "bits": flat, "density": float(flat.mean())})  # fmt: skip
    return masks


def mask_kinds() -> list:
    """Artifact kinds whose tensors are masks over parameters (`is_mask`)."""

    return [kind for _, kind in ARTIFACTS.items() if kind.is_mask]


def mask_overlap(masks: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per pair of masks that differ only in their seed, or only in their sparsity."""
    families = {stable_hash(m["family"]): m["family"] for m in masks}
    family_flats = {f: flatten(k) for f, k in families.items()}
    names = dict(zip(family_flats, differing_fields(list(family_flats.values())), strict=True))
    rows = []
    for pair, same in (("across seeds", "sparsity"), ("across sparsities", "seed")):
        groups: dict[str, list[dict]] = {}
        for m in masks:
            groups.setdefault(stable_hash([m["family"], m[same]]), []).append(m)
        for group in groups.values():
            for a, b in itertools.combinations(sorted(group, key=lambda m: (m["sparsity"], m["seed"])), 2):
                if a["bits"].shape != b["bits"].shape:
                    continue
                family = stable_hash(a["family"])
                rows.append(
                    {
                        "pair": pair,
                        "masks": ", ".join(names[family]) or "all",
                        "family": family,
                        "sparsity_a": a["sparsity"],
                        "sparsity_b": b["sparsity"],
                        "seed_a": a["seed"],
                        "seed_b": b["seed"],
                        "density_a": a["density"],
                        "density_b": b["density"],
                        "jaccard": jaccard(a["bits"], b["bits"]),
                        "jaccard_random": float(random_jaccard(a["density"], b["density"])),
                    }
                )
    return pd.DataFrame(rows)


def mask_overlap_table(overlap: pd.DataFrame) -> pd.DataFrame:
    """Pairs aggregated per (masks, pair type, sparsities): observed mean [min, max] vs random."""
    if overlap.empty:
        return pd.DataFrame()
    rows = []
    keys = ["masks", "pair", "sparsity_a", "sparsity_b"]
    for (masks, pair, sa, sb), g in overlap.groupby(keys, sort=True):
        rows.append(
            {
                "masks": masks,
                "pair": pair,
                "sparsity": f"{sa:g}" if sa == sb else f"{sa:g} vs {sb:g}",
                "pairs": len(g),
                "Jaccard observed": f"{g['jaccard'].mean():.3f} [{g['jaccard'].min():.3f}, {g['jaccard'].max():.3f}]",
                "Jaccard random": f"{g['jaccard_random'].mean():.3f}",
            }
        )
    out = pd.DataFrame(rows)
    return out.drop(columns="masks") if out["masks"].nunique() == 1 else out


# --- tables ------------------------------------------------------------------------------


def _label(method: str, sparsity) -> str:
    return method if pd.isna(sparsity) else f"{method} @{sparsity:g}"


def curve_table(summary: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Budgets as rows, series (by label) as columns, cells `mean [95% CI]` (the mean alone for one
    seed; empty where the series has no value, e.g. an ablation of a model without a transplant)."""
    if summary.empty or f"{metric}_mean" not in summary:
        return pd.DataFrame()
    cols = [summary[f"{metric}_{s}"] for s in ("mean", "ci_lo", "ci_hi")]
    cells = summary.assign(
        cell=[
            "" if pd.isna(mu) else f"{mu:.3f}" if pd.isna(lo) else f"{mu:.3f} [{lo:.3f}, {hi:.3f}]"
            for mu, lo, hi in zip(*cols, strict=True)
        ],
    )
    order = list(dict.fromkeys(summary["label"]))
    wide = cells.pivot_table(index=["task", "n_train"], columns="label", values="cell", aggfunc="first")
    wide = wide[[c for c in order if c in wide.columns]]
    wide.columns.name = None
    return wide.fillna("").reset_index()


def _non_empty(wide: pd.DataFrame) -> pd.DataFrame:
    """`wide` without the series columns that have no value at any budget."""
    keep = [c for c in wide.columns if c in ("task", "n_train") or (wide[c] != "").any()]
    return wide[keep]


def headline_table(head: pd.DataFrame) -> pd.DataFrame:
    if head.empty:
        return head

    def n_text(row):
        if not np.isfinite(row["n_to_target"]):
            return f"not reached (> {row['max_budget']:.0f})"
        if np.isnan(row["n_to_target_ci_lo"]):
            return f"{row['n_to_target']:.0f} [no CI: one seed]"
        return f"{row['n_to_target']:.0f} [{_fmt_n(row['n_to_target_ci_lo'])}, {_fmt_n(row['n_to_target_ci_hi'])}]"

    def ratio_text(row):
        if not np.isfinite(row["ratio_vs_reference"]):
            return ""
        return (">" if row["ratio_is_lower_bound"] else "") + f"{row['ratio_vs_reference']:.1f}x"

    refs = sorted({str(label).split(" [")[0] for label in head["reference_label"].dropna()}) or ["reference"]

    return pd.DataFrame(
        {
            "task": head["task"],
            "series": head["label"],
            "seeds": head["seeds"],
            f"n to {head['target'].iloc[0]:g} [95% CI]": head.apply(n_text, axis=1),
            "area (log budget)": head["area"].map(lambda v: f"{v:.3f}"),
            f"data saved vs {', '.join(refs)}": head.apply(ratio_text, axis=1),
        }
    )


def _fmt_n(v: float) -> str:
    return "inf" if not np.isfinite(v) else f"{v:.0f}"


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no finished trials)\n"
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def _notes(summary: pd.DataFrame) -> str:
    """What the intervals are, and which series have none."""
    text = (
        "Intervals are 95% Student t intervals of the mean over seeds (mean ± t(0.975, k-1) · s/√k); "
        "the budget interval inverts the t bands of the mean curve.\n"
    )
    single = sorted(set(summary.loc[summary["seeds"] < 2, "label"])) if not summary.empty else []
    if single:
        text += (
            f"\nOne seed only, so no interval (NaN bounds) at some or all budgets: {', '.join(single)}. "
            "Run more seeds for an interval.\n"
        )
    return text


# --- plots -------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> list[Path]:
    written = []
    for ext in ("png", "svg"):
        file = stem.with_suffix(f".{ext}")
        fig.savefig(file, dpi=130, bbox_inches="tight")  # legends below the axes stay in
        written.append(file)
    _pyplot().close(fig)
    return written


def _legend_names(frame: pd.DataFrame) -> dict[str, str]:
    """Series -> legend entry: its label, prefixed by its task when the report has several."""
    several = frame["task"].nunique() > 1
    pairs = frame.drop_duplicates("series")
    return {
        s: (f"{t}: {lab}" if several else lab)
        for s, t, lab in zip(pairs["series"], pairs["task"], pairs["label"], strict=True)
    }


def plot_curves(summary: pd.DataFrame, stem: Path, metric: str = METRIC, ylabel: str | None = None) -> list[Path]:
    """Metric against budget: one panel per sparsity (mask-free series in every panel), one line
    per series, t-interval bands. A series family (the label without its sparsity) keeps one colour
    in every panel; each panel has its own legend, below it, so no curve is hidden."""
    plt = _pyplot()
    masked = summary[summary["sparsity"].notna()]
    panels = sorted(masked["sparsity"].unique()) or [None]
    names = _legend_names(summary)
    family = dict(zip(summary["series"], summary.get("family", summary["label"]), strict=True))
    families = sorted(set(family.values()))
    palette = plt.cm.tab10 if len(families) <= 10 else plt.cm.tab20
    colours = {f: palette(i % palette.N) for i, f in enumerate(families)}
    rows = max(len(summary[summary["sparsity"].isna() | (summary["sparsity"] == s)]["series"].unique()) for s in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6 + 0.2 * rows), squeeze=False, sharey=True)
    for ax, sparsity in zip(axes[0], panels, strict=True):
        part = summary[summary["sparsity"].isna() | (summary["sparsity"] == sparsity)]
        for series, group in part.groupby("series", sort=False):
            group = group.sort_values("n_train")
            if f"{metric}_mean" not in group or group[f"{metric}_mean"].isna().all():
                continue
            x = group["n_train"].to_numpy(dtype=float)
            colour = colours[family[series]]
            ax.plot(x, group[f"{metric}_mean"], marker="o", ms=3, label=names[series], color=colour)
            ax.fill_between(x, group[f"{metric}_ci_lo"], group[f"{metric}_ci_hi"], alpha=0.15, color=colour, lw=0)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("training budget n (log scale)")
        ax.set_title("no mask" if sparsity is None else f"mask sparsity {sparsity:g}")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=labels.__getitem__)
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7,
                  loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)  # fmt: skip
    axes[0][0].set_ylabel(ylabel or metric)
    fig.subplots_adjust(wspace=0.06)  # the legends sit below the panels; savefig's tight box keeps them
    return _save(fig, stem)


def plot_sparsity(summary: pd.DataFrame, stem: Path) -> list[Path]:
    """The masked model's subtask accuracy against the mask's sparsity: one line per series family
    (a series without its sparsity); families with identical curves (controls reusing one mask)
    share a line."""
    plt = _pyplot()
    part = summary[summary["sparsity"].notna() & summary.get("subtask_acc_mean", pd.Series(dtype=float)).notna()]
    points = part.groupby(["task", "family", "sparsity"], as_index=False)["subtask_acc_mean"].mean()
    lines: dict[tuple, list[str]] = {}
    several = points["task"].nunique() > 1
    for (task, family), group in points.groupby(["task", "family"]):
        curve = (task, tuple(group["sparsity"]), tuple(np.round(group["subtask_acc_mean"], 9)))
        lines.setdefault(curve, []).append(f"{task}: {family}" if several else family)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for (_task, x, y), labels in lines.items():
        ax.plot(x, y, marker="o", label="\n".join(labels))  # series sharing masks: one line, all named
    ax.set_xlim(0, 1)
    ax.set_xlabel("mask sparsity (fraction of masked weights set to 0)")
    ax.set_ylabel("subtask accuracy of the masked model")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return _save(fig, stem)


def plot_mask_overlap(overlap: pd.DataFrame, stem: Path) -> list[Path]:
    """Bars per pair type and sparsity: observed Jaccard overlap (mean, whiskers min-max over pairs)
    beside the expectation for independent random masks of the same densities."""
    plt = _pyplot()
    g = overlap.groupby(["masks", "pair", "sparsity_a", "sparsity_b"], sort=True)
    agg = g.agg(obs=("jaccard", "mean"), lo=("jaccard", "min"), hi=("jaccard", "max"), rnd=("jaccard_random", "mean"))
    agg = agg.reset_index()
    several = agg["masks"].nunique() > 1
    names = [
        (f"{m}\n" if several else "") + (f"seeds @{a:g}" if p == "across seeds" else f"sparsity {a:g} vs {b:g}")
        for m, p, a, b in zip(agg["masks"], agg["pair"], agg["sparsity_a"], agg["sparsity_b"], strict=True)
    ]
    x = np.arange(len(agg))
    fig, ax = plt.subplots(figsize=(max(4.6, 0.9 * len(agg) + 1.5), 3.8))
    err = np.vstack([agg["obs"] - agg["lo"], agg["hi"] - agg["obs"]])
    ax.bar(x - 0.2, agg["obs"], 0.4, yerr=err, capsize=2, label="observed")
    ax.bar(x + 0.2, agg["rnd"], 0.4, color="0.7", label="random masks, same densities")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Jaccard overlap |A∩B| / |A∪B|")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, stem)


def profile_table(summary: pd.DataFrame, table: pd.DataFrame, profile, columns: list[str]) -> pd.DataFrame:
    """A column family drawn as profiles (see `methods.analysis.Profile`), long: per series at its
    largest budget, per line and position, the mean and 95% CI over seeds, with the position's
    depth (its index in the model's order, 0 = input side) and the relative depth in [0, 1]."""
    done, _ = prepare(table)
    rows = []
    for series, group in summary.groupby("series", sort=False):
        top = group.loc[group["n_train"].idxmax()]
        orders = done.loc[done["series"] == series, profile.order].dropna() if profile.order in done else []
        order = str(orders.iloc[0]).split(",") if len(orders) else []
        for col in columns:
            if f"{col}_mean" not in top or pd.isna(top[f"{col}_mean"]):
                continue
            position, line = profile.split(col)
            if position not in order:
                continue
            depth = order.index(position)
            rows.append({"task": top["task"], "label": top["label"], "series": series, "n_train": top["n_train"],
                         "seeds": top["seeds"], "line": line, "position": position, "depth": depth,
                         "relative_depth": depth / max(len(order) - 1, 1), "mean": top[f"{col}_mean"],
                         "ci_lo": top[f"{col}_ci_lo"], "ci_hi": top[f"{col}_ci_hi"]})  # fmt: skip
    return pd.DataFrame(rows)


def profile_markdown(long: pd.DataFrame) -> pd.DataFrame:
    """Rows: series and line; columns: positions in depth order; cells: mean [95% CI]."""
    if long.empty:
        return long
    positions = list(dict.fromkeys(long.sort_values(["depth"], kind="stable")["position"]))
    triples = zip(long["mean"], long["ci_lo"], long["ci_hi"], strict=True)
    text = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{m:.3f}" for m, lo, hi in triples]
    cells = long.assign(cell=text)
    wide = cells.pivot_table(index=["label", "n_train", "line"], columns="position", values="cell", aggfunc="first")
    return wide.reindex(columns=positions).reset_index().rename(columns={"label": "series", "line": "feature"})


def plot_profiles(long: pd.DataFrame, stem: Path, xlabel: str, ylabel: str) -> list[Path]:
    """One panel per line (feature), value against depth, one curve per series with CI bars. Series
    with different layer lists are placed on relative depth; otherwise the layers name the ticks."""
    plt = _pyplot()
    lines = list(dict.fromkeys(long["line"]))
    shared = long.groupby("series")["position"].apply(tuple).nunique() == 1
    x_col = "depth" if shared else "relative_depth"
    names = _legend_names(long)
    cols = min(len(lines), 3)
    n_rows = -(-len(lines) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.4 * cols, 3.2 * n_rows + 0.25 * long["series"].nunique()),
                             squeeze=False, sharey=True)  # fmt: skip
    for ax, line in zip(axes.flat, lines, strict=False):
        for series, group in long[long["line"] == line].groupby("series", sort=False):
            group = group.sort_values("depth")
            err = np.vstack([group["mean"] - group["ci_lo"], group["ci_hi"] - group["mean"]])
            err = np.where(np.isfinite(err), err, 0)
            ax.errorbar(group[x_col], group["mean"], yerr=err, marker="o", ms=3, capsize=2, label=names[series])
        if shared:
            ticks = long.drop_duplicates("depth").sort_values("depth")
            ax.set_xticks(ticks["depth"], ticks["position"], rotation=30, ha="right", fontsize=7)
        ax.set_title(line)
        ax.grid(alpha=0.3)
        ax.set_xlabel(xlabel if shared else f"{xlabel}, relative depth")
    for ax in list(axes.flat)[len(lines) :]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(3, len(labels)), frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.03 * (len(labels) // 3)))  # fmt: skip
    fig.tight_layout()
    return _save(fig, stem)


# --- the report --------------------------------------------------------------------------


def load_tables(out_dirs: list) -> pd.DataFrame:
    from orchestrator.outdir import as_outdir

    tables = []
    for location in out_dirs:
        out = as_outdir(location)
        if not out.exists("results.parquet"):
            raise ConfigError(f"{out.join('results.parquet')}: missing; run `instill run SWEEP --out {out}` first")
        tables.append(pq.read_table(out.path("results.parquet"), filesystem=out.fs).to_pandas())
    return pd.concat(tables, ignore_index=True)


def write_report(
    out_dirs: list[Path],
    report_dir: Path | None = None,
    target: float = 0.9,
    versus: str | None = None,
    over: str | None = None,
) -> Path:
    """Summarise the results of `out_dirs` (merged) into `report_dir` (default: first dir's report/).
    `versus`: a method each series is also compared with, paired by seed (`paired_differences`);
    `over`: an axis the series are also averaged over (`mean_over`; with `versus`, the differences
    too: `mean_over_differences`)."""
    table = load_tables(out_dirs)
    diffs = paired_differences(table, versus) if versus else pd.DataFrame()
    means = mean_over(table, over) if over else pd.DataFrame()
    gaps = mean_over_differences(table, over, versus) if over and versus else pd.DataFrame()
    if report_dir is None and "://" in str(out_dirs[0]):
        raise ConfigError(f"{out_dirs[0]} is not a local directory: give the report a local one with --to DIR")
    report_dir = Path(report_dir or Path(out_dirs[0]) / "report")
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(table)
    head = headline(table, target=target)
    summary.to_parquet(report_dir / "summary.parquet", index=False)
    head.to_parquet(report_dir / "headline.parquet", index=False)
    curves, heads = curve_table(summary), headline_table(head)
    overlap = mask_overlap(load_masks(artifact_roots(out_dirs)))
    md = f"{_notes(summary)}\n## {METRIC} (mean [95% CI] over seeds)\n\n{_markdown(curves)}\n"
    md += f"## Headline\n\n{_markdown(heads)}"
    if over:
        means.to_parquet(report_dir / "mean_over.parquet", index=False)
        body = _markdown(curve_table(means)) if not means.empty else f"No series differ only in {over}.\n"
        md += f"\n## {METRIC}, mean over {over} (per seed, then mean [95% CI] over seeds)\n\n{body}"
    if versus:
        diffs.to_parquet(report_dir / "versus.parquet", index=False)
        body = _markdown(versus_table(diffs)) if not diffs.empty else f"No series has a {versus} partner.\n"
        md += (f"\n## {METRIC}: each series minus the {versus} series of the same settings, paired by seed "
               f"(mean [95% CI])\n\n{body}")  # fmt: skip
    if over and versus:
        gaps.to_parquet(report_dir / "versus_mean_over.parquet", index=False)
        body = _markdown(versus_table(gaps.assign(versus=f"{versus} (same {over})"))) if not gaps.empty else ""
        md += (f"\n## {METRIC}: each series minus its {versus} partner, mean over {over} (per seed, then "
               f"mean [95% CI] over seeds)\n\n{body or 'No group has a partner at every value.'}\n")  # fmt: skip
    for column in results.plotted_columns(table):
        if f"{column}_mean" in summary and summary[f"{column}_mean"].notna().any():
            md += f"\n## {column} (mean [95% CI] over seeds)\n\n{_markdown(_non_empty(curve_table(summary, column)))}"
    profiles = []
    for name, profile, columns in results.profiled_columns(table):
        long = profile_table(summary, table, profile, columns) if not summary.empty else pd.DataFrame()
        if long.empty:
            continue
        long.to_parquet(report_dir / f"{name}_profile.parquet", index=False)
        profiles.append((name, profile, long))
        md += (f"\n## {name} by depth, at each series' largest budget (mean [95% CI] over seeds)\n\n"
               f"{_markdown(profile_markdown(long))}")  # fmt: skip
    overlaps = mask_overlap_table(overlap)
    if not overlap.empty:
        overlap.to_parquet(report_dir / "mask_overlap.parquet", index=False)
        md += f"\n## Mask overlap (Jaccard)\n\n{MASK_OVERLAP_NOTE}\n\n{_markdown(overlaps)}"
    (report_dir / "summary.md").write_text(md)
    figures: list[tuple[str, str]] = []
    if not summary.empty:
        plot_curves(summary, report_dir / "data_efficiency", ylabel="test accuracy")
        figures.append(("data_efficiency.svg", "Data-efficiency curves (mean, 95% Student t CI over seeds)"))
        if "subtask_acc_mean" in summary and summary["subtask_acc_mean"].notna().any():
            plot_sparsity(summary, report_dir / "sparsity_vs_subtask")
            figures.append(("sparsity_vs_subtask.svg", "Mask sparsity against the masked model's subtask accuracy"))
        for column in results.plotted_columns(table):
            if f"{column}_mean" in summary and summary[f"{column}_mean"].notna().any():
                plot_curves(summary, report_dir / column, metric=column, ylabel=column.replace("_", " "))
                figures.append((f"{column}.svg", f"{column} against budget (mean, 95% Student t CI over seeds)"))
    for name, profile, long in profiles:
        plot_profiles(long, report_dir / f"{name}_profile", profile.xlabel, profile.ylabel)
        figures.append((f"{name}_profile.svg", f"{name} against depth at each series' largest budget (95% CI)"))
    if not overlap.empty:
        plot_mask_overlap(overlap, report_dir / "mask_overlap")
        figures.append(("mask_overlap.svg", "Jaccard overlap of discovered masks against random masks"))
    sources = ", ".join(str(Path(d)) for d in out_dirs)
    (report_dir / "index.html").write_text(_html(sources, figures, curves, heads, overlaps, len(table)))
    return report_dir


def _html(sources: str, figures, curves: pd.DataFrame, heads: pd.DataFrame, overlaps, n_rows: int) -> str:
    def table_html(frame: pd.DataFrame) -> str:
        if frame.empty:
            return "<p>(no finished trials)</p>"
        return frame.to_html(index=False, border=0, classes="t", escape=True)

    figs = "\n".join(
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}'
        f"</figcaption></figure>"
        for src, cap in figures
    )
    masks = ""
    if not overlaps.empty:
        masks = f"<h2>Mask overlap (Jaccard)</h2>\n<p>{html.escape(MASK_OVERLAP_NOTE)}</p>\n{table_html(overlaps)}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Instill report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fff; }}
figure {{ display: inline-block; margin: 1em 1em 1em 0; }} img {{ max-width: 100%; }}
table.t {{ border-collapse: collapse; font-size: 0.9em; }}
table.t td, table.t th {{ padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; text-align: left; }}
</style></head>
<body>
<h1>Instill report</h1>
<p>Results from {html.escape(sources)} ({n_rows} rows). Budgets on a log axis; bands are 95% Student t
confidence intervals of the mean over seeds (none for a single seed). A series is one configuration;
different configurations are never averaged.</p>
<h2>Headline</h2>
{table_html(heads)}
<h2>Figures</h2>
{figs}
<h2>Test accuracy by budget (mean [95% CI] over seeds)</h2>
{table_html(curves)}
{masks}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-figures", imgs.length);
  document.body.setAttribute("data-figures-loaded",
    imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length);
}});
</script>
</body></html>
"""
