"""`calibration`: how well the model's predicted probabilities match its accuracy, on the test split.

- Probabilities: `model.predict_proba(x)` where the model has one (a model that predicts with an
  average over a posterior, e.g. `linearized_gp`), else the softmax of its logits; eval mode.
- `calibration_nll`: the mean negative log-probability of the true class (natural log), the
  probability floored at 1e-12 so that one confident error gives a large, finite value.
- `calibration_ece`: expected calibration error with 15 equal-width bins on the top probability
  (bin b holds confidences in (b/15, (b+1)/15], the first bin also 0): Σ_b (n_b / N) |acc_b − conf_b|.
- `calibration_bins`: the bins themselves, a JSON list of [count, mean confidence, accuracy] per bin
  (not summarised), which the report pools over seeds into a reliability diagram
  (`calibration_reliability`, one panel per method at its largest budget).
"""

from __future__ import annotations

import json
import math

import torch
from torch.nn import functional as F

from methods.analysis import Column, register_analysis
from methods.reports import Figure, ReportContext, method_colours, pyplot, register_report
from methods.training import _eval_pass

NAME = "calibration"
BINS = 15
FLOOR = 1e-12


def probabilities(model, split, batch_size: int) -> torch.Tensor:
    """(N, C) predicted probabilities on `split`: `predict_proba` where the model has it, else softmax."""
    proba = getattr(model, "predict_proba", None)
    fn = (lambda x, idx: proba(x).double().cpu()) if callable(proba) else (
        lambda x, idx: F.softmax(model(x).double(), dim=-1).cpu())  # fmt: skip
    parts = _eval_pass(model, split, batch_size, fn)
    return torch.cat(parts) if parts else torch.empty(0, 0, dtype=torch.float64)


def bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = BINS) -> list[list[float]]:
    """[count, mean confidence, accuracy] per equal-width bin of `confidence` (NaN means when empty)."""
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    out = []
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        conf = float(confidence[inside].mean()) if count else math.nan
        acc = float(correct[inside].double().mean()) if count else math.nan
        out.append([count, conf, acc])
    return out


def expected_calibration_error(table: list[list[float]]) -> float:
    """Σ_b (n_b / N) |acc_b − conf_b| over the bins of `bins`."""
    total = sum(count for count, _, _ in table)
    if not total:
        return math.nan
    return sum(count / total * abs(acc - conf) for count, conf, acc in table if count)


@register_analysis(
    NAME,
    columns={
        "calibration_nll": Column(
            "float64", summarise=True, plot=True, description="mean −log p(true class), test split"
        ),
        "calibration_ece": Column(
            "float64",
            summarise=True,
            plot=True,
            bounds=(0.0, 1.0),
            description="15-bin ECE on the top probability, test",
        ),
        "calibration_bins": Column("string", summarise=False, description="[count, confidence, accuracy] per bin"),
    },
    description="negative log-likelihood and expected calibration error of the predicted probabilities on test",
)
def calibration(ctx, model, config) -> dict:
    split = ctx.data.evals.get("test")
    if split is None:
        raise ValueError(f"calibration needs a task with a test split; task {ctx.task.name!r} has none")
    probs = probabilities(model, split, ctx.eval_batch_size)
    y = split.y.cpu().long()
    if probs.ndim != 2 or len(probs) != len(y) or (len(y) and int(y.max()) >= probs.shape[1]):
        raise ValueError(f"calibration needs class probabilities (N, C) with labels below C; got {tuple(probs.shape)} "
                         f"for labels up to {int(y.max()) if len(y) else None}")  # fmt: skip
    nll = float(-probs.gather(1, y[:, None]).clamp_min(FLOOR).log().mean()) if len(y) else math.nan
    confidence, predicted = probs.max(1)
    table = bins(confidence, predicted == y)
    return {"calibration_nll": nll, "calibration_ece": expected_calibration_error(table),
            "calibration_bins": json.dumps(table)}  # fmt: skip


# --- the report extra: reliability diagrams ----------------------------------------------------------


def pooled(table) -> list[dict]:
    """Per method at its largest budget (n_train), the bins pooled over seeds (and over the series
    of one method, e.g. axis values): [{method, n, seeds, bins: [[count, confidence, accuracy]], ece}]."""
    column = f"{NAME}_bins"
    if column not in table or "method" not in table:
        return []
    rows = table.dropna(subset=[column])
    if "status" in rows:
        rows = rows[rows["status"] == "done"]
    out = []
    for method, group in rows.groupby("method", sort=True):
        top = group[group["n_train"] == group["n_train"].max()] if "n_train" in group else group
        counts = [0] * BINS
        conf_sum, hit_sum = [0.0] * BINS, [0.0] * BINS
        for text in top[column]:
            for b, (count, conf, acc) in enumerate(json.loads(text)):
                if count:
                    counts[b] += count
                    conf_sum[b] += count * conf
                    hit_sum[b] += count * acc
        merged = [
            [c, conf_sum[b] / c if c else math.nan, hit_sum[b] / c if c else math.nan] for b, c in enumerate(counts)
        ]
        n = int(top["n_train"].iloc[0]) if "n_train" in top else None
        seeds = int(top["seed"].nunique()) if "seed" in top else len(top)
        out.append(
            {"method": method, "n": n, "seeds": seeds, "bins": merged, "ece": expected_calibration_error(merged)}
        )
    return out


def plot_reliability(panels: list[dict]):
    plt = pyplot()
    colours = method_colours([p["method"] for p in panels])
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.9 * rows), squeeze=False, sharex=True, sharey=True)
    centres = [(b + 0.5) / BINS for b in range(BINS)]
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels, strict=False):
        acc = [a if c else 0.0 for c, _, a in panel["bins"]]
        ax.bar(
            centres, acc, width=1 / BINS, color=colours[panel["method"]], edgecolor="white", lw=0.5, label="accuracy"
        )
        conf = [(x, c) for (count, c, _), x in zip(panel["bins"], centres, strict=True) if count]
        ax.plot(
            [c for _, c in conf], [c for _, c in conf], ls="none", marker="_", color="black", ms=8, label="confidence"
        )
        ax.plot([0, 1], [0, 1], ls=":", color="0.5", lw=1)
        seeds = f"{panel['seeds']} seed{'s' * (panel['seeds'] != 1)}"
        ax.set_title(f"{panel['method']}, n = {panel['n']}\nECE {panel['ece']:.3f}, {seeds}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("top probability (15 bins)")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy in the bin")
    fig.tight_layout()
    return fig


@register_report(f"{NAME}_reliability")
def _reliability_extra(ctx: ReportContext) -> list:
    panels = pooled(ctx.table)
    if not panels:
        return []
    caption = ("Reliability diagrams on the test split: accuracy per bin of the top predicted probability (bars) "
               "against the bin's mean probability (ticks), each method at its largest budget, bins pooled over "
               "seeds (instill's calibration analysis)")  # fmt: skip
    return [Figure(f"{NAME}_reliability", caption, plot_reliability(panels))]
