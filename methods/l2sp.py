"""L2-SP (Li, Grandvalet, Davoine 2018, "Explicit inductive bias for transfer learning with
convolutional networks"): full transfer with a pull towards the source's weights.

The whole source model is copied and fine-tuned, as in `full_transfer`, on cross-entropy plus
`alpha * ||w - w_source||^2`, where `w_source` are the source's (detached) values of the same
parameters. With `alpha = 0` it is `full_transfer`, bit for bit.

Departures from the paper:
- The paper penalises the transferred parameters with L2-SP (`alpha/2 * ||w_S - w0_S||^2`) and the
  new, task-specific head with plain L2 (`beta/2 * ||w_new||^2`). Here the head is transferred with
  the rest (the downstream task has the source's output classes), so one `alpha` covers every
  parameter, and the penalty carries no factor 1/2 (the paper's alpha is twice ours).
- The paper fine-tunes with SGD, where a penalty in the loss and a decay of the weights are the same
  thing. Here the shared loop's AdamW runs with the downstream block's decoupled weight decay (as
  `full_transfer` does) and the penalty enters the loss, so Adam rescales its gradient per parameter
  like the cross-entropy's.
"""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field
from torch import nn

from common.config import Frozen
from methods.registry import Method, MethodContext, register_method, source_copy
from methods.training import Objective


class L2SPConfig(Frozen):
    """The `l2sp:` block of a sweep file."""

    # 0.01: the coefficient L2-SP reimplementations commonly default to (alpha = beta = 0.01); the
    # paper chooses it on the target task, which a sweep can do too (`l2sp.alpha` is an ordinary
    # field). Our penalty sums over every parameter of the model, head included.
    alpha: float = Field(0.01, ge=0, description="weight of ||w - w_source||^2 in the loss")


@register_method(
    "l2sp",
    needs=("source",),
    config=L2SPConfig,
    description="the whole source model, fine-tuned with alpha * ||w - w_source||^2 added to the loss (L2-SP)",
)
class L2SP(Method):
    def build(self, ctx: MethodContext) -> nn.Module:
        return source_copy(ctx)

    def objective(self, ctx: MethodContext, model: nn.Module) -> Objective:
        base = super().objective(ctx, model)  # cross-entropy on the training split, val accuracy
        source = dict(ctx.artifact("source").named_parameters())
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, _ in named if n not in source]
        if missing:
            raise KeyError(f"l2sp: the model has parameters the source lacks: {missing}")
        params = [p for _, p in named]
        anchors = [source[n].detach().clone().to(p.device) for n, p in named]
        if not isinstance(ctx.config, L2SPConfig):
            raise TypeError(f"l2sp needs its L2SPConfig block in ctx.config, got {type(ctx.config).__name__}")
        alpha = ctx.config.alpha

        def loss(batch, step):
            ce, measured = base.loss(batch, step)
            penalty = l2sp_penalty(params, anchors)
            return ce + alpha * penalty, {**measured, "l2sp": penalty}

        return dataclasses.replace(base, loss=loss, params=params)


def l2sp_penalty(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """sum_i ||params[i] - anchors[i]||^2, with one fused kernel per op over the whole list."""
    if not params:
        raise ValueError("l2sp: no trainable parameters to penalise")
    norms = torch._foreach_norm(torch._foreach_sub(params, anchors))
    return torch.stack(norms).float().square().sum()
