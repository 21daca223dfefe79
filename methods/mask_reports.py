"""The mask kind's report extras (`methods.reports`): do seeds, or sparsities, find the same weights
(`mask_overlap`: masks that differ only in their seed or only in their sparsity, beside random masks of
the same densities), and how much of the subtask does a mask keep at each sparsity (`sparsity_vs_subtask`)?
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
import pandas as pd

from common.config import stable_hash
from methods.reports import Figure, ReportContext, Table, pyplot, register_report

AXIS = "mask.sparsity"  # the mask kind's axis (methods/artifacts.py), a column of the results
MASKS = "Mask overlap (Jaccard)"
NOTE = (
    "Jaccard overlap |A∩B| / |A∪B| of discovered masks (all tensors together) that differ only in their seed "
    "(same sparsity) or only in their sparsity (same seed), mean [min, max] over pairs; random: "
    "d1·d2 / (d1 + d2 − d1·d2), the expected overlap of independent uniformly random masks of the same densities."
)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks; NaN when both are empty."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else float("nan")


def random_jaccard(d1, d2):
    """Expected Jaccard overlap of two independent uniformly random masks of densities d1, d2."""
    d1, d2 = np.asarray(d1, dtype=float), np.asarray(d2, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return d1 * d2 / (d1 + d2 - d1 * d2)


def load_masks(stored: list[tuple[dict, dict]]) -> list[dict[str, Any]]:
    """Stored masks, (key, tensors), as {family, seed, sparsity, bits (flat bool), density}, where
    `family` is the key without its seed and sparsity (masks of one family differ only there)."""
    masks = []
    for key, tensors in stored:
        try:
            family = copy.deepcopy(key)
            seed, sparsity = family["source"].pop("seed"), float(family["reads"]["mask"].pop("sparsity"))
        except (KeyError, TypeError, AttributeError):  # a mask stored by other code: not comparable
            continue
        flat = np.concatenate([tensors[name].reshape(-1).numpy() != 0 for name in sorted(tensors)])
        masks.append({"family": family, "seed": seed, "sparsity": sparsity, "bits": flat, "density": flat.mean()})
    return masks


def mask_overlap(masks: list[dict[str, Any]], differences) -> pd.DataFrame:
    """One row per pair of masks that differ only in their seed, or only in their sparsity.
    `differences(families)`: what tells each family apart from the others (its `masks` column)."""
    families = {stable_hash(m["family"]): m["family"] for m in masks}
    names = dict(zip(families, differences(list(families.values())), strict=True))
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
                rows.append({"pair": pair, "masks": names[family] or "all", "family": family,
                             "sparsity_a": a["sparsity"], "sparsity_b": b["sparsity"], "seed_a": a["seed"],
                             "seed_b": b["seed"], "density_a": a["density"], "density_b": b["density"],
                             "jaccard": jaccard(a["bits"], b["bits"]),
                             "jaccard_random": float(random_jaccard(a["density"], b["density"]))})  # fmt: skip
    return pd.DataFrame(rows)


def overlap_table(overlap: pd.DataFrame) -> pd.DataFrame:
    """Pairs aggregated per (masks, pair type, sparsities): observed mean [min, max] vs random."""
    groups = overlap.groupby(["masks", "pair", "sparsity_a", "sparsity_b"], sort=True)
    out = pd.DataFrame([{"masks": masks, "pair": pair, "sparsity": f"{sa:g}" if sa == sb else f"{sa:g} vs {sb:g}",
                         "pairs": len(g), "Jaccard observed": f"{g['jaccard'].mean():.3f} [{g['jaccard'].min():.3f}, "
                         f"{g['jaccard'].max():.3f}]", "Jaccard random": f"{g['jaccard_random'].mean():.3f}"}
                        for (masks, pair, sa, sb), g in groups])  # fmt: skip
    return out.drop(columns="masks") if out["masks"].nunique() == 1 else out


def plot_overlap(overlap: pd.DataFrame):
    """Bars per pair type and sparsity: observed Jaccard overlap (mean, whiskers min-max over pairs)
    beside the expectation for independent random masks of the same densities."""
    plt = pyplot()
    g = overlap.groupby(["masks", "pair", "sparsity_a", "sparsity_b"], sort=True, as_index=False)
    agg = g.agg(obs=("jaccard", "mean"), lo=("jaccard", "min"), hi=("jaccard", "max"), rnd=("jaccard_random", "mean"))
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
    return fig


def sparsity_lines(summary: pd.DataFrame) -> dict[tuple, list[str]]:
    """(task, sparsities, subtask accuracies) -> the series families drawn by that line: families with
    identical curves (controls reusing one mask) share it."""
    part = summary[summary[AXIS].notna() & summary["subtask_acc_mean"].notna()]
    points = part.groupby(["task", "family", AXIS], as_index=False)["subtask_acc_mean"].mean()
    lines: dict[tuple, list[str]] = {}
    several = points["task"].nunique() > 1
    for (task, family), group in points.groupby(["task", "family"]):
        curve = (task, tuple(group[AXIS]), tuple(np.round(group["subtask_acc_mean"], 9)))
        lines.setdefault(curve, []).append(f"{task}: {family}" if several else family)
    return lines


def sparsity_chart(summary: pd.DataFrame) -> dict:
    """`plot_sparsity` as a Vega-Lite spec for index.html: hover a point for its families and value,
    click a legend entry to show that line alone."""
    values = [{"line": " / ".join(names), "sparsity": float(x), "subtask_acc": float(y)}
              for (_task, xs, ys), names in sparsity_lines(summary).items()
              for x, y in zip(xs, ys, strict=True)]  # fmt: skip
    pick = {"name": "pick", "select": {"type": "point", "fields": ["line"]}, "bind": "legend"}
    return {
        "data": {"values": values}, "width": 320, "height": 220, "params": [pick],
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": "sparsity", "type": "quantitative", "scale": {"domain": [0, 1]},
                  "title": "mask sparsity (fraction of masked weights set to 0)"},
            "y": {"field": "subtask_acc", "type": "quantitative", "scale": {"domain": [0, 1]},
                  "title": "subtask accuracy of the masked model"},
            "color": {"field": "line", "type": "nominal", "title": None,
                      "legend": {"orient": "bottom", "labelLimit": 500}},
            "opacity": {"condition": {"param": "pick", "value": 1}, "value": 0.1},
            "tooltip": [{"field": "line"}, {"field": "sparsity"}, {"field": "subtask_acc", "format": ".3f"}],
        },
    }  # fmt: skip


def plot_sparsity(summary: pd.DataFrame):
    """The masked model's subtask accuracy against the mask's sparsity: one line per series family;
    families with identical curves (controls reusing one mask) share a line."""
    plt = pyplot()
    lines = sparsity_lines(summary)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for (_task, x, y), labels in lines.items():
        ax.plot(x, y, marker="o", label="\n".join(labels))  # series sharing masks: one line, all named
    ax.set_xlim(0, 1)
    ax.set_xlabel("mask sparsity (fraction of masked weights set to 0)")
    ax.set_ylabel("subtask accuracy of the masked model")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return fig


@register_report("mask_overlap")
def _mask_overlap(ctx: ReportContext) -> list:
    masks, note = load_masks(ctx.artifacts("mask")), NOTE
    if masks:
        overlap = mask_overlap(masks, ctx.differences)
    else:  # no masks here (a committed report rebuilt from its rows): keep its own table, if any
        overlap = ctx.previous("mask_overlap")
        note = NOTE + " Kept from the report this one was rebuilt from: its masks are not in these folders."
    if overlap is None or overlap.empty:
        return []
    caption = "Jaccard overlap of discovered masks against random masks"
    return [Table("mask_overlap", MASKS, overlap, overlap_table(overlap), note),
            Figure("mask_overlap", caption, plot_overlap(overlap))]  # fmt: skip


@register_report("sparsity_vs_subtask")
def _sparsity_vs_subtask(ctx: ReportContext) -> list:
    summary, acc = ctx.summary, ctx.summary.get("subtask_acc_mean")
    if AXIS not in summary or acc is None or not (summary[AXIS].notna() & acc.notna()).any():
        return []
    caption = "Mask sparsity against the masked model's subtask accuracy"
    return [Figure("sparsity_vs_subtask", caption, plot_sparsity(summary), vega=sparsity_chart(summary))]
