"""The report's figures (matplotlib, Agg): each written as PNG and SVG beside the tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from methods.reports import pyplot
from orchestrator.report import palette
from orchestrator.report.layout import layout
from orchestrator.report.statistics import METRIC, bounds


def save(fig, stem: Path, tight: bool = True) -> list[Path]:
    """`fig` as `stem`.png and .svg; `tight`: cropped to what is drawn (a figure whose margins are set
    need not be: cropping draws it once more)."""
    written = [stem.with_suffix(f".{ext}") for ext in ("png", "svg")]
    for file in written:
        fig.savefig(file, dpi=130, bbox_inches="tight" if tight else None)  # legends below the axes stay in
    pyplot().close(fig)
    return written


def _legend_names(frame: pd.DataFrame) -> dict[str, str]:
    """Series -> legend entry: its label, prefixed by its task when the report has several."""
    several = frame["task"].nunique() > 1
    pairs = frame.drop_duplicates("series")
    return {
        s: (f"{t}: {lab}" if several else lab)
        for s, t, lab in zip(pairs["series"], pairs["task"], pairs["label"], strict=True)
    }


def _limits(values: list[np.ndarray], metric: str) -> tuple[float, float] | None:
    """The y range that shows `values`, never beyond the metric's own range (`statistics.bounds`)."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if not finite.size:
        return None
    lo, hi = bounds(metric)
    pad = 0.04 * max(finite.max() - finite.min(), 1e-9)
    return max(finite.min() - pad, lo - 0.02 * (hi - lo) if np.isfinite(lo) else -np.inf), min(
        finite.max() + pad, hi + 0.02 * (hi - lo) if np.isfinite(hi) else np.inf
    )


def plot_curves(
    summary: pd.DataFrame,
    stem: Path,
    metric: str = METRIC,
    ylabel: str | None = None,
    seeds: pd.DataFrame | None = None,
) -> list[Path]:
    """Metric against budget as small multiples (`layout`: one panel per value of the axes the series
    differ in), a line per series coloured by its method (`palette`), its 95% interval as a band (kept
    inside the metric's range), each seed's value as a point under it (`seeds`: rows with `series`,
    `n_train` and `metric`), one legend for the figure."""
    plt = pyplot()
    part = summary[summary[f"{metric}_mean"].notna()] if f"{metric}_mean" in summary else summary.iloc[:0]
    plan = layout(part if not part.empty else summary)
    n_cols = min(len(plan.panels), 4)
    n_rows = -(-len(plan.panels) // n_cols)
    legend_rows = -(-len(plan.lines()) // 3)
    width, height = 3.9 * n_cols + 0.9, 3.0 * n_rows + 0.28 * legend_rows + 0.75
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False, sharey=True, sharex=True)
    # Fixed margins in inches (not tight_layout, which draws the figure once more: slow for many panels).
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, top=1 - 0.3 / height,
                        bottom=(0.28 * legend_rows + 0.6) / height, wspace=0.08, hspace=0.35)  # fmt: skip
    by_series = dict(tuple(seeds.groupby("series"))) if seeds is not None and metric in seeds else {}
    shown: list[np.ndarray] = []
    handles: dict[str, object] = {}
    for ax, (title, inside) in zip(axes.flat, plan.panels, strict=False):
        lines = sorted({plan.line[s] for s in inside}, key=lambda n: (plan._method_of(n), n))
        for series, group in part[part["series"].isin(inside)].groupby("series", sort=False):
            group = group.sort_values("n_train")
            colour = plan.colour[plan.method[series]]
            dash = palette.DASHES[plan.dash[plan.line[series]]][0]
            x = group["n_train"].to_numpy(dtype=float)
            offset = lines.index(plan.line[series]) - (len(lines) - 1) / 2  # points of one budget side by side
            if series in by_series:
                pts = by_series[series]
                values = pd.to_numeric(pts[metric], errors="coerce").to_numpy(dtype=float)
                px = pts["n_train"].to_numpy(dtype=float)
                ax.scatter(np.where(px > 0, px * 1.05**offset, 0.4 * offset), values, s=7, color=colour, alpha=0.35,
                           lw=0, zorder=1)  # fmt: skip
                shown.append(values)
            (handle,) = ax.plot(x, group[f"{metric}_mean"], marker="o", ms=3, color=colour, ls=dash, lw=1.6, zorder=3)
            handles.setdefault(plan.line[series], handle)
            ax.fill_between(x, group[f"{metric}_ci_lo"], group[f"{metric}_ci_hi"], alpha=0.13, color=colour, lw=0)
            shown += [group[f"{metric}_{k}"].to_numpy(dtype=float) for k in ("mean", "ci_lo", "ci_hi")]
        ax.set_xscale("symlog", linthresh=10)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(plan.panels) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training budget n (log scale)")
    for row in axes:
        row[0].set_ylabel(ylabel or metric)
    if (limits := _limits(shown, metric)) is not None:
        axes.flat[0].set_ylim(*limits)
    names = [n for n in plan.lines() if n in handles]
    fig.legend([handles[n] for n in names], names, fontsize=8, loc="lower center", ncol=min(3, len(names)),
               frameon=False, bbox_to_anchor=(0.5, 0))  # fmt: skip
    return save(fig, stem, tight=False)


def plot_profiles(long: pd.DataFrame, stem: Path, xlabel: str, ylabel: str) -> list[Path]:
    """One panel per line (feature), value against depth, one curve per series with CI bars. Series
    with different layer lists are placed on relative depth; otherwise the layers name the ticks."""
    plt = pyplot()
    lines = list(dict.fromkeys(long["line"]))
    shared = long.groupby("series")["position"].apply(tuple).nunique() == 1
    x_col = "depth" if shared else "relative_depth"
    names = _legend_names(long)
    methods = long.drop_duplicates("series").set_index("series")["method"] if "method" in long else None
    colours = palette.colours(methods.unique()) if methods is not None else {}
    by_method: dict[str, list[str]] = {}
    for series in long["series"].unique():
        by_method.setdefault(methods[series] if methods is not None else "", []).append(series)
    dash = palette.dashes(by_method)
    cols = min(len(lines), 3)
    n_rows = -(-len(lines) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.4 * cols, 3.2 * n_rows + 0.25 * long["series"].nunique()),
                             squeeze=False, sharey=True)  # fmt: skip
    for ax, line in zip(axes.flat, lines, strict=False):
        for series, group in long[long["line"] == line].groupby("series", sort=False):
            group = group.sort_values("depth")
            err = np.vstack([group["mean"] - group["ci_lo"], group["ci_hi"] - group["mean"]])
            err = np.where(np.isfinite(err), err, 0)
            colour = colours.get(methods[series]) if methods is not None else None
            ax.errorbar(group[x_col], group["mean"], yerr=err, marker="o", ms=3, capsize=2, label=names[series],
                        color=colour, ls=palette.DASHES[dash[series]][0] or "-")  # fmt: skip
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
    return save(fig, stem)
