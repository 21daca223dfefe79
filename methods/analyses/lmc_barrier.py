"""`lmc_barrier`: linear mode connectivity between the trained downstream model and its source.

Along the straight line θ(t) = (1 − t)·θ_trained + t·θ_source (every floating tensor of the two
effective state dicts; integer buffers such as batch norm's `num_batches_tracked` are the trained
model's), the loss L(t) is the mean cross-entropy on one downstream evaluation split. The barrier is
the largest excess over the chord, max_t [L(t) − ((1 − t)·L(0) + t·L(1))]: 0 when the two ends sit
in one linearly connected basin, large when the path climbs over a ridge (Frankle et al. 2020).

- `split` (default "test": do the two solutions generalise as one basin?) is "val" for the
  validation split, else one of the task's evaluation splits.
- Models with batch norm get their statistics re-estimated at every point, the endpoints included
  (Jordan et al. 2023, REPAIR): interpolated statistics are not a model anyone trained, and the ends
  take the same code path. Running statistics are reset and averaged cumulatively (momentum None)
  over `bn_images` training images (default 1,000; CBFT's paper: clean training data), norms in
  train mode and everything else in eval mode: the first of the source's training split
  (`task.base_data(seed).train`, the data the source was trained on; `bn_data: source`, the
  default) or the downstream training split (`bn_data: train`; 20 to 300 images at small budgets,
  too few for stable statistics).
- A model that differs from its source only in its head (the module that produces the logits, e.g.
  `llrt`'s retrained last layer over frozen features) has a barrier of 0 by construction: along the
  path the logits are linear in t and the cross-entropy of linear logits is convex in t, so it never
  rises above the chord. Its `lmc_barrier` is NaN (no evidence either way: nothing but the head
  moved; the path is not evaluated) and `lmc_barrier_head_only` is 1; the midpoint columns are
  measured as for any model.
- A model that is not a point of its architecture's weight space (it declares
  `weight_space_point = False`, e.g. `linearized_gp`'s GP predictor, whose function no network
  weights compute) has no straight line to its source: every column is NaN. Any other model whose
  state differs from the source's in names or shapes is an error.
- Every point, the ends included, is evaluated by the same code, so the chord term is exactly 0 at
  t = 0 and t = 1 and the barrier is ≥ 0 without clamping. t = 0.5 is always evaluated (added to
  the grid when `points` is even) for the midpoint columns.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from common.config import Frozen
from methods.analysis import Column, register_analysis
from methods.masking import check_same_architecture, effective_state_dict
from methods.training import evaluate_with_loss
from tasks.base import Split, StageData


class LMCConfig(Frozen):
    points: int = Field(11, ge=3, description="evenly spaced points on the path, both ends included")
    split: str = Field("test", description="evaluation split whose cross-entropy is the loss; 'val' for validation")
    bn_data: Literal["source", "train"] = Field(
        "source", description="batch-norm statistics from the source's training data, or the downstream training split"
    )
    bn_images: int = Field(1000, ge=1, description="at most this many images for the batch-norm statistics")


@register_analysis(
    "lmc_barrier",
    needs=("source",),
    config=LMCConfig,
    columns={
        "lmc_barrier": Column(
            "float64", summarise=True, plot=True, description="max loss excess over the chord, trained -> source"
        ),
        "lmc_barrier_loss_mid": Column("float64", summarise=True, description="loss at the midpoint t = 0.5"),
        "lmc_barrier_acc_mid": Column("float64", summarise=True, description="accuracy at the midpoint t = 0.5"),
        "lmc_barrier_head_only": Column(
            "float64",
            summarise=True,
            description="1: only the head differs from the source (barrier 0 by construction, NaN)",
        ),
    },
    description="loss barrier on the linear path between the trained model and its source",
)
def lmc_barrier(ctx, model: nn.Module, config: LMCConfig | None) -> dict[str, float]:
    config = config or LMCConfig()
    nan = float("nan")
    if not getattr(model, "weight_space_point", True):
        return {"lmc_barrier": nan, "lmc_barrier_loss_mid": nan, "lmc_barrier_acc_mid": nan,
                "lmc_barrier_head_only": nan}  # fmt: skip
    split = _split(ctx.data, config.split)
    trained = effective_state_dict(model)
    source = effective_state_dict(ctx.artifact("source"))
    check_same_architecture(trained, source, "lmc_barrier (trained model vs source)")
    head_only = only_head_differs(model, trained, source, ctx.data.train.x[:1])
    probe = ctx.fresh_model("init").to(ctx.device)
    norm_data = _norm_data(ctx, probe, config)

    n = config.points
    ts = sorted({i / (n - 1) for i in range(n)} | {0.5})  # i / (n - 1): exactly 0.0 and 1.0 at the ends
    if head_only:  # no barrier to measure: the midpoint alone, for its columns
        ts = [0.5]
    losses, accs = {}, {}
    for t in ts:
        probe.load_state_dict(interpolate(trained, source, t))
        recalibrate_batch_norm(probe, norm_data, ctx.eval_batch_size)
        acc, losses[t] = evaluate_with_loss(probe, split, ctx.eval_batch_size)  # one forward pass per batch
        accs[t] = acc["y"]
    barrier = nan if head_only else max(losses[t] - ((1 - t) * losses[0.0] + t * losses[1.0]) for t in ts)
    return {"lmc_barrier": barrier, "lmc_barrier_loss_mid": losses[0.5], "lmc_barrier_acc_mid": accs[0.5],
            "lmc_barrier_head_only": float(head_only)}  # fmt: skip


def only_head_differs(model: nn.Module, trained: dict, source: dict, example: torch.Tensor) -> bool:
    """Whether every tensor that differs between the two state dicts belongs to `model`'s head (the
    module producing its logits, `methods.finetune.find_head`), and some tensor differs. False for a
    model whose head cannot be told."""
    from methods.finetune import find_head

    differing = [k for k, v in trained.items() if not torch.equal(v, source[k].to(v.device))]
    if not differing:
        return False
    try:
        head = find_head(model, example)
    except ValueError:
        return False
    return all(k.startswith(f"{head}.") for k in differing)


def _norm_data(ctx, model: nn.Module, config: LMCConfig) -> Split | None:
    """The images batch norm's statistics are re-estimated on (None for a model without batch norm)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    data = ctx.data.train if config.bn_data == "train" else ctx.task.base_data(ctx.seed).train
    return data.take(torch.arange(min(len(data), config.bn_images)))


@torch.no_grad()
def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """(1 − t)·a + t·b for floating tensors (exactly a at t = 0, b at t = 1); a's value otherwise."""
    return {k: (1 - t) * v + t * b[k].to(v.device) if v.is_floating_point() else v.clone() for k, v in a.items()}


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, split: Split, batch_size: int) -> None:
    """Replace every batch norm's running statistics by those of `model` on `split` (a no-op for a
    model without batch norm). Leaves the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    device = next(model.parameters()).device
    # Near-equal batches: a cumulative average weights batches alike, and a last batch of one row
    # would make batch norm refuse to train.
    n_batches = max(1, -(-len(split) // batch_size))
    for idx in torch.arange(len(split)).tensor_split(n_batches):
        model(split.x[idx].to(device))
    model.eval()


def _split(data: StageData, name: str) -> Split:
    if name == "val":
        return data.val
    if name not in data.evals:
        raise ValueError(f"lmc_barrier: the task has no evaluation split {name!r}; use one of: "
                         f"{', '.join(['val', *data.evals])}")  # fmt: skip
    return data.evals[name]
