"""The report's figures (matplotlib, Agg): each written as PNG and SVG beside the tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.report.series import coordinates
from orchestrator.report.statistics import METRIC


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
    """Metric against budget: one panel per value of the series' coordinates (`series.coordinates`,
    e.g. one per mask sparsity; series without coordinates in every panel), one line per series,
    t-interval bands. A series family (the label without its coordinates) keeps one colour in every
    panel; each panel has its own legend, below it, so no curve is hidden."""
    plt = _pyplot()
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
    return _save(fig, stem)


def plot_sparsity(summary: pd.DataFrame, stem: Path) -> list[Path]:
    """The masked model's subtask accuracy against the mask's sparsity: one line per series family
    (a series without its sparsity); families with identical curves (controls reusing one mask)
    share a line."""
    plt = _pyplot()
    summary = summary.rename(columns={"mask.sparsity": "sparsity"})
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
