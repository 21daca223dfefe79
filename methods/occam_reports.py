"""OccamNets' exits (seed 001): which exit inference takes, as an analysis and a report table.

- Analysis `occam_exits`: for a model with exits (`exit_choice(x)`, `tasks/models/occam.py`), the
  share of the test images that inference answers from each exit 1-3 (`occam_exits_test_exit{i}`),
  and the accuracy of the answers given there (`occam_exits_test_exit{i}_acc`, NaN where no image
  takes the exit); the same on `bias_aligned` where the task has that split (the bias variant of
  `shapes`). A model without exits (a plain ResNet run beside it) gets no columns.
- Report extra `occam_exits`: one row per series and budget with the mean share [95% interval] of
  each exit, from the report's summary.
"""

from __future__ import annotations

import math

import torch

from methods.analysis import Column, register_analysis
from methods.reports import ReportContext, Table, register_report
from methods.training import _eval_pass

EXITS = (1, 2, 3)
SPLITS = ("test", "bias_aligned")
NOTE = (
    "Share of the images inference answers from each exit (the first exit from 1 whose gate is open, else "
    "exit 3), mean [95% interval] over seeds; the accuracy there is in the occam_exits_*_acc columns of "
    "results.parquet. Exit 0 is never used at inference."
)


def _columns() -> dict[str, Column]:
    out = {}
    for split in SPLITS:
        for i in EXITS:
            out[f"occam_exits_{split}_exit{i}"] = Column("float64", description=f"share of {split} images at exit {i}")
            out[f"occam_exits_{split}_exit{i}_acc"] = Column("float64", description=f"accuracy at exit {i}")
    return out


def exit_shares(model, split, batch_size: int) -> dict[str, float]:
    """{exit{i}: share of `split` answered from exit i, exit{i}_acc: accuracy of those answers}."""
    chosen = torch.cat(_eval_pass(model, split, batch_size, lambda x, idx: model.exit_choice(x).cpu()))
    preds = torch.cat(_eval_pass(model, split, batch_size, lambda x, idx: model(x).argmax(-1).cpu()))
    correct = preds == split.y
    out = {}
    for i in EXITS:
        at = chosen == i
        out[f"exit{i}"] = float(at.float().mean())
        out[f"exit{i}_acc"] = float(correct[at].float().mean()) if at.any() else math.nan
    return out


@register_analysis(
    "occam_exits",
    columns=_columns(),
    description="share of test (and bias-aligned) images each OccamNet exit answers, and its accuracy",
)
def occam_exits(ctx, model, config) -> dict[str, float]:
    if not hasattr(model, "exit_choice"):
        return {}  # no exits (a plain model, or a masked wrapper): nothing to count
    out = {}
    for split in SPLITS:
        data = ctx.data.evals.get(split)
        if data is not None:
            shares = exit_shares(model, data, ctx.eval_batch_size)
            out |= {f"occam_exits_{split}_{k}": v for k, v in shares.items()}
    return out


def exits_table(summary):
    """(frame, shown) of the exit shares per series and budget; None where no row has them."""
    import pandas as pd

    columns = [f"occam_exits_{s}_exit{i}" for s in SPLITS for i in EXITS]
    present = [c for c in columns if f"{c}_mean" in summary]
    if not present:
        return None
    keys = [k for k in ("task", "label", "n_train", "seeds") if k in summary]
    frame = summary[keys + [f"{c}_{s}" for c in present for s in ("mean", "ci_lo", "ci_hi")]]
    frame = frame[frame[[f"{c}_mean" for c in present]].notna().any(axis=1)]
    if frame.empty:
        return None
    frame = frame.sort_values([k for k in ("task", "label", "n_train") if k in keys]).reset_index(drop=True)

    def cell(row, c):
        mean, lo, hi = row[f"{c}_mean"], row[f"{c}_ci_lo"], row[f"{c}_ci_hi"]
        if pd.isna(mean):
            return "n/a"
        return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else f"{mean:.2f}"

    shown = frame[keys].copy()
    for c in present:
        split, exit_ = c.removeprefix("occam_exits_").rsplit("_", 1)
        shown[f"{split}: {exit_}"] = [cell(row, c) for _, row in frame.iterrows()]
    return frame, shown


@register_report("occam_exits")
def _exits_report(ctx: ReportContext) -> list:
    made = exits_table(ctx.summary)
    if made is None:
        return []
    frame, shown = made
    return [Table("occam_exits", "OccamNets: which exit answers", frame, shown, NOTE)]
