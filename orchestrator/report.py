"""Reports: what a sweep says, as numbers with confidence intervals and as pictures.

`write_report([OUT, ...])` merges the results of one or more output directories and writes
`REPORT/` (default `OUT/report/`):

- `summary.parquet`: per task x method x sparsity x budget, for every metric column: seeds, mean,
  std and a 95% percentile-bootstrap CI of the mean.
- `headline.parquet`: per task x method x sparsity, the budget needed to reach a target accuracy
  (default 0.9, interpolated on the log-budget axis, with a bootstrap CI over seeds), the area under
  the data-efficiency curve, and the sample-efficiency ratio against `scratch`.
- `summary.md`: both as Markdown tables.
- `data_efficiency.png/.svg` (one panel per sparsity, one line per method, CI bands),
  `sparsity_vs_subtask.png/.svg`, and `shape_bias.png/.svg` when the results have a shape-bias column.
- `index.html`: all of the above on one page that reads offline.

The log-budget axis is x = log10(1 + n), so that n = 0 (no disambiguating data) has a place on it.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator import results

METRIC = "test_acc"
KEYS = ["task", "method", "sparsity", "n_train"]
_NOT_METRICS = {
    "data_fraction", "n_train", "seed", "sparsity", "best_epoch", "epochs_run", "started_at", "finished_at",
}  # fmt: skip


# --- statistics --------------------------------------------------------------------------


def bootstrap_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; (nan, nan) for no values, (v, v) for one."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_boot, len(values)), replace=True).mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def log_budget(n) -> np.ndarray:
    return np.log10(1.0 + np.asarray(n, dtype=float))


def budget_to_reach(n: np.ndarray, acc: np.ndarray, target: float) -> float:
    """The budget at which the curve (n ascending) first reaches `target`, linear in log10(1 + n)
    between the two measured budgets around the crossing; inf if it never does."""
    n, acc = np.asarray(n, dtype=float), np.asarray(acc, dtype=float)
    above = np.nonzero(acc >= target)[0]
    if len(above) == 0:
        return float("inf")
    i = above[0]
    if i == 0:
        return float(n[0])
    x0, x1 = log_budget(n[i - 1]), log_budget(n[i])
    t = (target - acc[i - 1]) / (acc[i] - acc[i - 1])
    return float(10 ** (x0 + t * (x1 - x0)) - 1.0)


def curve_area(n: np.ndarray, acc: np.ndarray) -> float:
    """Mean accuracy over the log-budget axis (trapezoids), in [0, 1]; acc itself for one budget."""
    x, acc = log_budget(n), np.asarray(acc, dtype=float)
    if len(x) == 1 or x[-1] == x[0]:
        return float(acc.mean())
    return float(np.trapezoid(acc, x) / (x[-1] - x[0]))


def _seed_matrix(group: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Budgets (ascending) and a seeds x budgets matrix of `metric` (NaN where a trial is missing)."""
    wide = group.pivot_table(index="seed", columns="n_train", values=metric, aggfunc="mean").sort_index(axis=1)
    return wide.columns.to_numpy(dtype=float), wide.to_numpy(dtype=float)


def headline(
    table: pd.DataFrame, target: float = 0.9, metric: str = METRIC, n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per (task, method, sparsity): budget to reach `target` with CI, curve area, ratio to scratch."""
    done = _done(table)
    rng = np.random.default_rng(seed)
    rows = []
    for (task, method, sparsity), group in done.groupby(["task", "method", "sparsity"], dropna=False, sort=True):
        n, m = _seed_matrix(group, metric)
        mean = np.nanmean(m, axis=0)
        picks = rng.integers(0, len(m), size=(n_boot, len(m)))
        boots = np.array([budget_to_reach(n, np.nanmean(m[p], axis=0), target) for p in picks])
        rows.append(
            {
                "task": task,
                "method": method,
                "sparsity": sparsity,
                "seeds": len(m),
                "target": target,
                "n_to_target": budget_to_reach(n, mean, target),
                "n_to_target_ci_lo": float(np.quantile(boots, 0.025, method="inverted_cdf")),  # inf-safe
                "n_to_target_ci_hi": float(np.quantile(boots, 0.975, method="inverted_cdf")),
                "max_budget": float(n.max()),
                "area": curve_area(n, mean),
            }
        )
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["ratio_vs_scratch"] = np.nan
    out["ratio_is_lower_bound"] = False
    for _task, part in out.groupby("task"):
        scratch = part[part["method"] == "scratch"]
        if scratch.empty:
            continue
        n_scratch = float(scratch["n_to_target"].iloc[0])
        bound = not np.isfinite(n_scratch)
        reference = float(scratch["max_budget"].iloc[0]) if bound else n_scratch
        for idx, row in part.iterrows():
            if np.isfinite(row["n_to_target"]) and row["n_to_target"] > 0:
                # Scratch needs `ratio` times the data; a lower bound when scratch never got there.
                out.loc[idx, "ratio_vs_scratch"] = reference / row["n_to_target"]
                out.loc[idx, "ratio_is_lower_bound"] = bound
    return out


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Numeric result columns worth summarising (accuracies, densities, shape bias, times)."""
    cols = []
    for col in table.columns:
        if col in _NOT_METRICS or col in KEYS:
            continue
        values = pd.to_numeric(table[col], errors="coerce")
        if table[col].dtype == bool or values.notna().sum() == 0:
            continue
        if col.endswith(("_acc", "_density", "_bias", "_s")) or "_acc_" in col or col.startswith("acc"):
            cols.append(col)
    return cols


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method, sparsity, n_train): seeds, and mean/std/95% CI of every metric column."""
    done = _done(table)
    metrics = metric_columns(done)
    out = []
    for key, group in done.groupby(KEYS, dropna=False, sort=True):
        row = {**dict(zip(KEYS, key, strict=True)), "seeds": int(group["seed"].nunique())}
        for metric in metrics:
            values = pd.to_numeric(group[metric], errors="coerce").to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                continue
            lo, hi = bootstrap_ci(values)
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            row[f"{metric}_ci_lo"], row[f"{metric}_ci_hi"] = lo, hi
        out.append(row)
    return pd.DataFrame(out)


def _done(table: pd.DataFrame) -> pd.DataFrame:
    """Finished rows; a method run with non-default transfer settings is reported as its own series
    (`subtask_induction [reinit]`), so merged result directories never average different settings."""
    done = table[table["status"] == "done"].copy()
    done["sparsity"] = pd.to_numeric(done["sparsity"], errors="coerce")
    masked = done["sparsity"].notna()
    reinit = masked & (done["unmasked"] == "reinit")
    trainable = masked & done["trainable_subnetwork"].fillna(False).astype(bool)
    done.loc[reinit, "method"] = done.loc[reinit, "method"] + " [reinit]"
    done.loc[trainable, "method"] = done.loc[trainable, "method"] + " [trainable]"
    return done


# --- tables ------------------------------------------------------------------------------


def _label(method: str, sparsity) -> str:
    return method if pd.isna(sparsity) else f"{method} @{sparsity:g}"


def curve_table(summary: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Budgets as rows, methods (with sparsity) as columns, cells `mean ± std`."""
    if summary.empty or f"{metric}_mean" not in summary:
        return pd.DataFrame()
    cells = summary.assign(
        label=[_label(m, s) for m, s in zip(summary["method"], summary["sparsity"], strict=True)],
        cell=[
            f"{mu:.3f} ± {sd:.3f}" if k > 1 else f"{mu:.3f}"
            for mu, sd, k in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], summary["seeds"], strict=True)
        ],
    )
    wide = cells.pivot_table(index=["task", "n_train"], columns="label", values="cell", aggfunc="first")
    wide.columns.name = None
    return wide.fillna("").reset_index()


def headline_table(head: pd.DataFrame) -> pd.DataFrame:
    if head.empty:
        return head

    def n_text(row):
        if not np.isfinite(row["n_to_target"]):
            return f"not reached (> {row['max_budget']:.0f})"
        return f"{row['n_to_target']:.0f} [{row['n_to_target_ci_lo']:.0f}, {_fmt_n(row['n_to_target_ci_hi'])}]"

    def ratio_text(row):
        if not np.isfinite(row["ratio_vs_scratch"]):
            return ""
        return (">" if row["ratio_is_lower_bound"] else "") + f"{row['ratio_vs_scratch']:.1f}x"

    return pd.DataFrame(
        {
            "task": head["task"],
            "method": [_label(m, s) for m, s in zip(head["method"], head["sparsity"], strict=True)],
            "seeds": head["seeds"],
            f"n to {head['target'].iloc[0]:g} [95% CI]": head.apply(n_text, axis=1),
            "area (log budget)": head["area"].map(lambda v: f"{v:.3f}"),
            "data saved vs scratch": head.apply(ratio_text, axis=1),
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
        fig.savefig(file, dpi=130)
        written.append(file)
    _pyplot().close(fig)
    return written


def plot_curves(summary: pd.DataFrame, stem: Path, metric: str = METRIC, ylabel: str | None = None) -> list[Path]:
    """Metric against budget: one panel per sparsity (mask-free methods in every panel), CI bands."""
    plt = _pyplot()
    masked = summary[summary["sparsity"].notna()]
    panels = sorted(masked["sparsity"].unique()) or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False, sharey=True)
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(sorted(summary["method"].unique()))}
    for ax, sparsity in zip(axes[0], panels, strict=True):
        part = summary[summary["sparsity"].isna() | (summary["sparsity"] == sparsity)]
        for method, group in part.groupby("method"):
            group = group.sort_values("n_train")
            if f"{metric}_mean" not in group or group[f"{metric}_mean"].isna().all():
                continue
            x = group["n_train"].to_numpy(dtype=float)
            ax.plot(x, group[f"{metric}_mean"], marker="o", ms=3, label=method, color=colours[method])
            ax.fill_between(
                x, group[f"{metric}_ci_lo"], group[f"{metric}_ci_hi"], alpha=0.2, color=colours[method], lw=0
            )
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("training budget n (log scale)")
        ax.set_title("no mask" if sparsity is None else f"mask sparsity {sparsity:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel or metric)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, stem)


def plot_sparsity(summary: pd.DataFrame, stem: Path) -> list[Path]:
    """The masked model's subtask accuracy against the mask's sparsity."""
    plt = _pyplot()
    part = summary[summary["sparsity"].notna() & summary.get("subtask_acc_mean", pd.Series(dtype=float)).notna()]
    part = part.groupby(["task", "sparsity"], as_index=False)["subtask_acc_mean"].mean()
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for task, group in part.groupby("task"):
        ax.plot(group["sparsity"], group["subtask_acc_mean"], marker="o", label=task)
    ax.set_xlim(0, 1)
    ax.set_xlabel("mask sparsity (fraction of masked weights set to 0)")
    ax.set_ylabel("subtask accuracy of the masked model")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, stem)


# --- the report --------------------------------------------------------------------------


def load_tables(out_dirs: list[Path]) -> pd.DataFrame:
    from orchestrator.config import ConfigError

    tables = []
    for out in out_dirs:
        path = Path(out) / "results.parquet"
        if not path.exists():
            raise ConfigError(f"{path}: missing; run `instill run SWEEP --out {out}` first")
        tables.append(results.read(path))
    return pd.concat(tables, ignore_index=True)


def write_report(out_dirs: list[Path], report_dir: Path | None = None, target: float = 0.9) -> Path:
    """Summarise the results of `out_dirs` (merged) into `report_dir` (default: first dir's report/)."""
    table = load_tables(out_dirs)
    report_dir = Path(report_dir or Path(out_dirs[0]) / "report")
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(table)
    head = headline(table, target=target)
    summary.to_parquet(report_dir / "summary.parquet", index=False)
    head.to_parquet(report_dir / "headline.parquet", index=False)
    curves, heads = curve_table(summary), headline_table(head)
    (report_dir / "summary.md").write_text(
        f"## {METRIC} (mean ± std over seeds)\n\n{_markdown(curves)}\n## Headline\n\n{_markdown(heads)}"
    )
    figures: list[tuple[str, str]] = []
    if not summary.empty:
        plot_curves(summary, report_dir / "data_efficiency", ylabel="test accuracy")
        figures.append(("data_efficiency.svg", "Data-efficiency curves (mean, 95% bootstrap CI over seeds)"))
        if "subtask_acc_mean" in summary and summary["subtask_acc_mean"].notna().any():
            plot_sparsity(summary, report_dir / "sparsity_vs_subtask")
            figures.append(("sparsity_vs_subtask.svg", "Mask sparsity against the masked model's subtask accuracy"))
        if "shape_bias_mean" in summary and summary["shape_bias_mean"].notna().any():
            plot_curves(summary, report_dir / "shape_bias", metric="shape_bias", ylabel="shape bias")
            figures.append(("shape_bias.svg", "Shape bias on cue-conflict images against budget"))
    sources = ", ".join(str(Path(d)) for d in out_dirs)
    (report_dir / "index.html").write_text(_html(sources, figures, curves, heads, len(table)))
    return report_dir


def _html(sources: str, figures, curves: pd.DataFrame, heads: pd.DataFrame, n_rows: int) -> str:
    def table_html(frame: pd.DataFrame) -> str:
        if frame.empty:
            return "<p>(no finished trials)</p>"
        return frame.to_html(index=False, border=0, classes="t", escape=True)

    figs = "\n".join(
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}'
        f"</figcaption></figure>"
        for src, cap in figures
    )
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
<p>Results from {html.escape(sources)} ({n_rows} rows). Budgets on a log axis; bands are 95% bootstrap
confidence intervals over seeds.</p>
<h2>Headline</h2>
{table_html(heads)}
<h2>Figures</h2>
{figs}
<h2>Test accuracy by budget (mean ± std over seeds)</h2>
{table_html(curves)}
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
