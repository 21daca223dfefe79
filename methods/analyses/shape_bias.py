"""`shape_bias` (Geirhos et al.): on cue-conflict images (shape of one class, texture of another),
shape decisions / (shape decisions + texture decisions). Every cue-conflict image has two different
classes, so the counts are n x accuracy against either label. Needs a task with a `cue_conflict`
evaluation split labelled `shape` and `texture`. Where the task also has `cue_conflict_val`
(validation images), `shape_bias_val` is the same measure on them: the one to choose settings on.
"""

from __future__ import annotations

from methods.analysis import Column, register_analysis
from methods.training import evaluate


@register_analysis(
    "shape_bias",
    columns={
        "shape_bias": Column("float64", summarise=True, plot=True, bounds=(0.0, 1.0)),
        "shape_bias_val": Column("float64", summarise=True, bounds=(0.0, 1.0)),
    },
    description="shape decisions / (shape + texture decisions) on cue-conflict images",
)
def shape_bias(ctx, model, config) -> dict[str, float]:
    split = ctx.data.evals.get("cue_conflict")
    if split is None or not {"shape", "texture"} <= set(split.labels):
        raise ValueError(f"shape_bias needs a task with a cue_conflict split labelled shape and texture; "
                         f"task {ctx.task.name!r} has none")  # fmt: skip
    out = {"shape_bias": _bias(model, split, ctx.eval_batch_size)}
    val = ctx.data.evals.get("cue_conflict_val")
    if val is not None:
        out["shape_bias_val"] = _bias(model, val, ctx.eval_batch_size)
    return out


def _bias(model, split, batch_size: int) -> float:
    acc = evaluate(model, split, batch_size)
    shape, texture = acc["shape"], acc["texture"]
    return shape / (shape + texture) if shape + texture > 0 else float("nan")
