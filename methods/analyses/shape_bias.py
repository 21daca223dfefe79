"""`shape_bias` (Geirhos et al.): on cue-conflict images (shape of one class, texture of another),
shape decisions / (shape decisions + texture decisions). Every cue-conflict image has two different
classes, so the counts are n x accuracy against either label. Needs a task with a `cue_conflict`
evaluation split labelled `shape` and `texture`.
"""

from __future__ import annotations

from methods.analysis import Column, register_analysis
from methods.training import evaluate


@register_analysis(
    "shape_bias",
    columns={"shape_bias": Column("float64", summarise=True, plot=True)},
    description="shape decisions / (shape + texture decisions) on cue-conflict images",
)
def shape_bias(ctx, model, config) -> dict[str, float]:
    split = ctx.data.evals.get("cue_conflict")
    if split is None or not {"shape", "texture"} <= set(split.labels):
        raise ValueError(f"shape_bias needs a task with a cue_conflict split labelled shape and texture; "
                         f"task {ctx.task.name!r} has none")  # fmt: skip
    acc = evaluate(model, split, ctx.eval_batch_size)
    shape, texture = acc["shape"], acc["texture"]
    return {"shape_bias": shape / (shape + texture) if shape + texture > 0 else float("nan")}
