"""The report's figures (matplotlib, Agg): each written as PNG and SVG beside the tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from methods.reports import pyplot
from orchestrator.report.series import coordinates
from orchestrator.report.statistics import METRIC


def save(fig, stem: Path) -> list[Path]:
    written = [stem.with_suffix(f".{ext}") for ext in ("png", "svg")]
    for file in written:
        fig.savefig(file, dpi=130, bbox_inches="tight")  # legends below the axes stay in
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


def plot_curves(summary: pd.DataFrame, stem: Path, metric: str = METRIC, ylabel: str | None = None) -> list[Path]:
    """Metric against budget: one panel per value of the series' coordinates (`series.coordinates`;
    series without coordinates in every panel), one line per series, t-interval bands. A family
    keeps one colour in every panel; each panel has its own legend, below it, so no curve is hidden."""
    plt = pyplot()
    coords = coordinates(summary.columns)
    # A series' point: its (coordinate, value) pairs; it is drawn in every panel whose point holds them.
    firsts = summary.groupby("series").first()
    point = {s: tuple((c, r[c]) for c in coords if not pd.isna(r[c])) for s, r in firsts.iterrows()}
    panels = sorted({p for p in point.values() if p}) or [()]
    names = _legend_names(summary)
    family = dict(zip(summary["series"], summary.get("family", summary["label"]), strict=True))
    families = sorted(set(family.values()))
    palette = plt.cm.tab10 if len(families) <= 10 else plt.cm.tab20
    colours = {f: palette(i % palette.N) for i, f in enumerate(families)}
    members = [[s for s, p in point.items() if set(p) <= set(panel)] for panel in panels]
    rows = max(len(m) for m in members)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6 + 0.2 * rows), squeeze=False, sharey=True)
    for ax, panel, inside in zip(axes[0], panels, members, strict=True):
        part = summary[summary["series"].isin(inside)]
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
        ax.set_title(", ".join(f"{c} = {v:g}" if isinstance(v, float) else f"{c} = {v}" for c, v in panel))
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=labels.__getitem__)
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7,
                  loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)  # fmt: skip
    axes[0][0].set_ylabel(ylabel or metric)
    fig.subplots_adjust(wspace=0.06)  # the legends sit below the panels; savefig's tight box keeps them
    return save(fig, stem)


def plot_profiles(long: pd.DataFrame, stem: Path, xlabel: str, ylabel: str) -> list[Path]:
    """One panel per line (feature), value against depth, one curve per series with CI bars. Series
    with different layer lists are placed on relative depth; otherwise the layers name the ticks."""
    plt = pyplot()
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
    return save(fig, stem)
