"""`subnetwork_ablation`: how much the trained downstream model still relies on the transplanted
subnetwork. The transferred weights (`transplanted_mask`: ones are the source's weights) are put
back to the model's own initial values (the same positions of `ctx.fresh_model("init")`, the
trained model's own fresh init) and the test accuracy is measured again.

- `subnetwork_ablation_acc`: test accuracy with the subnetwork ablated;
- `subnetwork_ablation_drop`: accuracy of the trained model minus that;
- `subnetwork_ablation_random_drop`: the same for a uniformly random set of as many positions among
  the masked parameters (`sample_like`, drawn from the analysis's generator), the control that
  tells a subnetwork that matters from any equally large set of weights.

Everything is computed on plain models loaded with effective weights (`effective_state_dict`), the
trained model's accuracy included, so the three accuracies come from one code path. Batch norm
statistics are the trained model's (not re-estimated): the ablation asks what the trained model
loses, all else fixed. A model without a transplant (scratch, full transfer) gets NaN in every
column.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.analysis import Column, register_analysis
from methods.masking import Mask, effective_state_dict, sample_like, transplanted_mask
from methods.training import evaluate

COLUMNS = ("subnetwork_ablation_drop", "subnetwork_ablation_random_drop", "subnetwork_ablation_acc")


@register_analysis(
    "subnetwork_ablation",
    columns={
        "subnetwork_ablation_drop": Column(
            "float64", summarise=True, plot=True, description="test accuracy lost when the transplant is reset to init"
        ),
        "subnetwork_ablation_random_drop": Column(
            "float64", summarise=True, plot=True, description="the same for a random set of as many masked weights"
        ),
        "subnetwork_ablation_acc": Column(
            "float64", summarise=True, description="test accuracy with the transplant reset to init"
        ),
    },
    description="test accuracy drop when the transplanted subnetwork is reset to its fresh init",
)
def subnetwork_ablation(ctx, model: nn.Module, config) -> dict[str, float]:
    mask = transplanted_mask(model)
    if mask is None:
        return dict.fromkeys(COLUMNS, float("nan"))
    if "test" not in ctx.data.evals:
        raise ValueError(f"subnetwork_ablation needs a 'test' evaluation split; task {ctx.task.name!r} has "
                         f"{sorted(ctx.data.evals)}")  # fmt: skip
    split = ctx.data.evals["test"]
    trained = effective_state_dict(model)
    init = ctx.fresh_model("init").state_dict()
    probe = ctx.fresh_model("init").to(ctx.device)

    def accuracy(state: dict[str, torch.Tensor]) -> float:
        probe.load_state_dict(state)
        return evaluate(probe, split, ctx.eval_batch_size)["y"]

    base = accuracy(trained)
    ablated = accuracy(ablate(trained, init, mask))
    random = accuracy(ablate(trained, init, sample_like(mask, ctx.generator)))
    return {
        "subnetwork_ablation_drop": base - ablated,
        "subnetwork_ablation_random_drop": base - random,
        "subnetwork_ablation_acc": ablated,
    }


@torch.no_grad()
def ablate(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """`state` with the positions where `mask` is 1 set to `init`'s values."""
    out = dict(state)
    for name, m in mask.items():
        w = state[name]
        out[name] = torch.where(m.to(w.device), init[name].to(w.device, w.dtype), w)
    return out
