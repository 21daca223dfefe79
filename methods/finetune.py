"""The fine-tuning baselines of the CBFT comparison (seed 003: Lubana et al., "Mechanistic mode
connectivity", ICML 2023, arXiv 2211.08422): the source model (the "cue model", trained where a cue
predicts the class) fine-tuned on the downstream data.

- `naive_finetune`: the whole source model, every parameter trained on cross-entropy. It is
  `full_transfer` exactly (same build, same objective, bit for bit), registered again so that the
  CBFT family reads as one group in a sweep and a report.
- `llrt` (last-layer retraining): the source with its classification head re-initialised (from the
  trial's fresh model, so the new head is seeded like `scratch`'s) and everything else frozen; only
  the head trains, on cross-entropy. The model runs in eval mode throughout (`train_mode=False`):
  batch norm normalises with the source's running statistics and never updates them, dropout is
  off, so the features the head reads are exactly the source's.
- `lpft` (linear probe, then fine-tune; Kumar et al. 2022): `llrt` for `lpft.probe_epochs` epochs
  (with the training block's settings overlaid by `lpft.probe_training`), then every parameter
  trained on cross-entropy with the training block, in train mode. Two `fit` calls with one
  generator; each restores its kept epoch (by `training.select`). The result holds both phases'
  history and measurements (each row marked `probe`: 1 or 0), `best_epoch` counted over both; its
  score (`best_val_acc`) is the fine-tuning phase's.

The head is the module that produces the logits: the one the model names in `head_name` (every
model in `tasks.models` does), checked on one training input to output the logits exactly; for a
model without `head_name`, the one `nn.Linear` whose output is the logits (an error names the
candidates when there are none or several).

Optimisers (the authors' code, as configs/compare-shapes-cue.yaml sets them through each method's
`training:` overlay and `lpft.probe_training`): naive fine-tuning and LPFT's second phase SGD lr
0.01, momentum 0.9, weight decay 1e-4, cosine to 0, 20 epochs of batch 256; LLRT and LPFT's probe
SGD lr 30, momentum 0.9, no weight decay, cosine to 0, 200 epochs, on a fresh linear head over the
features of the network in eval mode, as here. They report the last epoch (`training.select: last`).

Departures from the paper (and its code):
- Batch 64 with a minimum number of iterations (`training.min_steps`) at every budget, not batch
  256 over 2,500 clean images (10 iterations an epoch).
- LLRT's barrier to its source is 0 by construction (only the head moves, so the loss along the
  path is convex in t): `lmc_barrier` reports it as NaN with `lmc_barrier_head_only` = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from common.config import Frozen
from methods.registry import Method, MethodContext, register_method, source_copy
from methods.training import Objective, TrainConfig, TrainResult, cross_entropy, fit

# --- the head ----------------------------------------------------------------------------------


def find_head(model: nn.Module, example: torch.Tensor) -> str:
    """Name of the submodule that produces `model`'s logits, exactly, on `example` (a small batch of
    inputs): the module named in `head_name`, else the one such `nn.Linear` (see the module doc)."""
    modules = dict(model.named_modules())
    kind = type(model).__name__
    declared = getattr(model, "head_name", None)
    if declared is not None:
        if not declared or declared not in modules:
            raise ValueError(f"{kind}.head_name = {declared!r} names no submodule of the model")
        candidates = [declared]
    else:
        candidates = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
        if not candidates:
            raise ValueError(f"{kind} has no nn.Linear layer and declares no head_name; set head_name on the class")
    producing = _producing_logits(model, {name: modules[name] for name in candidates}, example)
    if declared is not None:
        if not producing:
            raise ValueError(f"{kind}.head_name = {declared!r}, but that module's output is not the model's logits")
        return declared
    if len(producing) != 1:
        found = f"several do ({', '.join(producing)})" if producing else f"none of {', '.join(candidates)} does"
        raise ValueError(f"cannot tell {kind}'s head: the head is the nn.Linear whose output is the logits, and "
                         f"{found}; set head_name on the class")  # fmt: skip
    return producing[0]


@torch.no_grad()
def _producing_logits(model: nn.Module, candidates: dict[str, nn.Module], example: torch.Tensor) -> list[str]:
    outputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, _name=name: outputs.__setitem__(_name, out))
        for name, module in candidates.items()
    ]
    was_training = model.training
    model.eval()  # no batch-norm update, no dropout draw
    try:
        device = next(model.parameters()).device
        logits = model(example.to(device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    def is_logits(out) -> bool:
        return isinstance(out, torch.Tensor) and out.shape == logits.shape and torch.equal(out, logits)

    return [name for name in candidates if is_logits(outputs.get(name))]


# --- the methods -------------------------------------------------------------------------------


@register_method(
    "naive_finetune",
    needs=("source",),
    description="CBFT baseline: the whole source (cue) model fine-tuned on cross-entropy; full_transfer exactly",
)
def _naive_finetune(ctx: MethodContext) -> nn.Module:
    return source_copy(ctx)


def probe_model(ctx: MethodContext) -> nn.Module:
    """A copy of the source with a fresh head (the trial's fresh model's) and every other parameter frozen."""
    model = source_copy(ctx)
    name = find_head(model, ctx.data.train.x[:1])
    fresh_head = dict(ctx.fresh.named_modules()).get(name)
    if fresh_head is None:
        raise ValueError(f"the fresh model has no module {name!r} to take a new head from")
    head = dict(model.named_modules())[name]
    head.load_state_dict(fresh_head.state_dict())
    if not list(head.parameters()):
        raise ValueError(f"the head {name!r} of {type(model).__name__} has no parameters to train")
    model.requires_grad_(False)
    head.requires_grad_(True)
    return model


def probe_objective(ctx: MethodContext, model: nn.Module) -> Objective:
    """Cross-entropy on the head's parameters only, the model in eval mode (frozen features)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the probe has no trainable parameters: build the model with probe_model")
    return dataclasses.replace(cross_entropy(model, ctx.data, ctx.training.eval_batch_size, params), train_mode=False)


@register_method(
    "llrt",
    needs=("source",),
    description="CBFT baseline: last-layer retraining; the source's head re-initialised and trained on frozen features",
)
class LLRT(Method):
    def build(self, ctx: MethodContext) -> nn.Module:
        return probe_model(ctx)

    def objective(self, ctx: MethodContext, model: nn.Module) -> Objective:
        return probe_objective(ctx, model)


class LPFTConfig(Frozen):
    """The `lpft:` block of a sweep file."""

    probe_epochs: int = Field(
        20, ge=0, description="epochs of last-layer retraining before fine-tuning (0: fine-tune a fresh head at once)"
    )
    probe_training: dict[str, Any] = Field(
        {}, description="fields of the training block for the probe phase only, e.g. {optimizer: sgd, lr: 30}"
    )

    @field_validator("probe_training")
    @classmethod
    def _training_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "epochs" in v:
            raise ValueError("the probe's epochs are lpft.probe_epochs, not probe_training.epochs")
        TrainConfig(**v)  # each field as the training block would validate it (unknown names refused)
        return v


@register_method(
    "lpft",
    needs=("source",),
    config=LPFTConfig,
    description="CBFT baseline: llrt for lpft.probe_epochs, then the whole model fine-tuned for training.epochs",
)
class LPFT(Method):
    def build(self, ctx: MethodContext) -> nn.Module:
        return probe_model(ctx)

    def train(
        self, ctx: MethodContext, model: nn.Module, generator: torch.Generator, mixed_precision: bool = False
    ) -> TrainResult:
        if not isinstance(ctx.config, LPFTConfig):
            raise TypeError(f"lpft needs its LPFTConfig block in ctx.config, got {type(ctx.config).__name__}")
        phases: list[tuple[bool, TrainResult]] = []
        if ctx.config.probe_epochs > 0:
            probe_cfg = TrainConfig(
                **{**ctx.training.model_dump(), **ctx.config.probe_training, "epochs": ctx.config.probe_epochs}
            )
            result = fit(probe_objective(ctx, model), ctx.data, probe_cfg, generator, mixed_precision=mixed_precision)
            phases.append((True, result))
        model.requires_grad_(True)
        objective = cross_entropy(model, ctx.data, ctx.training.eval_batch_size)
        phases.append((False, fit(objective, ctx.data, ctx.training, generator, mixed_precision=mixed_precision)))
        return merge_phases(phases)


def merge_phases(phases: list[tuple[bool, TrainResult]]) -> TrainResult:
    """One result for consecutive `fit` runs: histories and measurements (rows marked `probe`)
    concatenated, epochs and steps summed, the last phase's score and best epoch (counted over all)."""
    before = sum(result.epochs_run for _, result in phases[:-1])
    last = phases[-1][1]
    return TrainResult(
        best_val_acc=last.best_val_acc,
        best_epoch=before + last.best_epoch,
        epochs_run=before + last.epochs_run,
        steps=sum(result.steps for _, result in phases),
        history=[score for _, result in phases for score in result.history],
        measurements=[{**row, "probe": float(probe)} for probe, result in phases for row in result.measurements],
        last_state=last.last_state,
    )
