"""`splits`: accuracy of the trained model on each of the task's evaluation splits, against every
label set (the target `y` and alternative readings such as a competing rule), and on validation
against the alternative readings. Which solution the model learnt, not just whether it is right.

Columns: `splits_<split>_acc` (against the target) and `splits_<split>_acc_<reading>`, e.g.
`splits_test_acc_2a2`, `splits_silhouette_acc`, `splits_cue_conflict_acc_shape`.
"""

from __future__ import annotations

from methods.analysis import Column, register_analysis
from methods.training import evaluate


@register_analysis(
    "splits",
    columns={"splits_*": Column("float64", summarise=True)},
    description="accuracy on every evaluation split, against the target and every alternative reading",
)
def splits(ctx, model, config) -> dict[str, float]:
    out = {}
    for split_name, split in [*ctx.data.evals.items(), ("val", ctx.data.val)]:
        for label, acc in evaluate(model, split, ctx.eval_batch_size).items():
            if split_name == "val" and label == "y":
                continue  # the training loop's val_acc already is this
            out[f"splits_{split_name}_acc" if label == "y" else f"splits_{split_name}_acc_{label}"] = acc
    return out
