"""Connectivity-based fine-tuning, CBFT (seed 003: Lubana et al., "Mechanistic mode connectivity",
ICML 2023, arXiv 2211.08422): fine-tune the cue model θ_c so that the result θ is *not* linearly
connected to it on cued data, and represents clean and cued images of a class alike.

θ starts as a copy of θ_c (the `source` artifact). As in the paper, every iteration takes two
optimiser steps on one pair of batches (a clean batch and a cued batch; the loop's
`steps_per_batch = 2`):

- barrier step (the first): t = 0.5 + 0.5·clip(z, −0.5, 0.5), z ~ N(0, 1) (t ∈ [0.25, 0.75]), from
  a generator derived from `ctx.generator`; θ_t = t·θ_c + (1 − t)·θ over every parameter, θ_c
  detached; loss |B − CE(f(x_cued; θ_t), y)|, B = `cbft.barrier`: it pushes the interior of the path
  θ → θ_c up to a loss of B on cued data, so the cue mechanism stops being linearly reachable from θ.
  θ_t runs through `torch.func.functional_call` (the gradient reaches θ scaled by 1 − t) on clones of
  θ's buffers, so a train-mode batch norm's running statistics never see θ_t (as in the authors'
  code, where the interpolated network has buffers of its own).
- clean step (the second): CE(f(x_clean; θ), y) + (λ / C)·Σ_c ||n(μ_c^clean) − n(μ_c^cued)||², with
  λ = `cbft.invariance`, C the number of classes, n(v) = v / ||v||, μ_c the mean penultimate feature
  (the model's `penultimate` feature, or the last of `feature_names()`) of the class-c examples of
  this step's clean and cued batches, summed over the classes present in both. One forward per
  batch (`model(x, intermediates=True)`), both in train mode; the cued forward runs on clones of
  the batch-norm buffers, so the running statistics come from clean images only. The invariance
  term is off during the first `cbft.warmup_epochs` epochs (counted by the loop's `end_epoch` hook;
  an epoch is one pass over the clean batches, as in the paper) and whenever λ = 0; then the cued
  batch is not run at all on clean steps.

Data: the task's `cued` stream (`StageData.streams["cued"]`): the downstream training images, each
with its true class's cue (a cue variant of the task provides it: `task: {name: shapes, cue: ...}`).
Measurements per epoch (means over the steps of their kind): `barrier_loss`, `barrier_ce` (CE at
θ_t), `t`, `ce` and `invariance` (0 in warm-up). The score is validation accuracy.

Departures from the paper (and its code):
- Optimiser: the shared loop's AdamW with the downstream block's settings (one optimiser and one set
  of moments for both kinds of step, as their single SGD carries one momentum), not SGD lr 0.01,
  momentum 0.9, weight decay 1e-4, cosine schedule, batch 256, 20 epochs.
- The authors' released `mech_fine_tuning.py` interpolates conv, linear and batch-norm parameters
  and applies the invariance term from the first epoch; here every parameter is interpolated and
  the warm-up follows the paper.
- The score: the best epoch by validation accuracy is restored (they keep the last epoch).
"""

from __future__ import annotations

import dataclasses

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from common.config import Frozen
from common.seeding import torch_generator
from methods.masking import check_same_architecture
from methods.registry import Method, MethodContext, register_method, source_copy
from methods.training import Objective, cross_entropy
from tasks.base import StageData

CUED = "cued"  # the name of the task's stream of cued downstream training images


class CBFTConfig(Frozen):
    """The `cbft:` block of a sweep file."""

    barrier: float = Field(1.0, ge=0, description="B: the cued-data cross-entropy sought midway to the cue model")
    invariance: float = Field(1.0, ge=0, description="lambda: weight of the clean/cued class-mean invariance term")
    warmup_epochs: int = Field(1, ge=0, description="epochs at the start without the invariance term")


def check_cued_stream(data: StageData, task_name: str = "the task") -> None:
    """Raise a ValueError saying what to fix unless `data` has a `cued` stream that fits its training split."""
    if CUED not in data.streams:
        have = ", ".join(["train", *data.streams])
        raise ValueError(
            f"cbft needs a '{CUED}' training stream (the downstream training images, each with its class's cue), "
            f"and {task_name} provides only: {have}. Use a cue variant of the task, e.g. "
            "`task: {name: shapes, cue: {kind: box, fraction: 0.6}}`"
        )
    cued = data.streams[CUED]
    if len(cued) == 0 or cued.x.shape[1:] != data.train.x.shape[1:]:
        raise ValueError(f"cbft: the '{CUED}' stream's inputs {tuple(cued.x.shape)} do not fit the training "
                         f"split's {tuple(data.train.x.shape)}")  # fmt: skip


def penultimate_feature(model: nn.Module) -> str:
    """The name of the feature the head reads: `model.penultimate`, else the last of `feature_names()`."""
    names = tuple(model.feature_names()) if hasattr(model, "feature_names") else ()
    if not names:
        raise ValueError(f"cbft needs {type(model).__name__} to name its features (feature_names() and "
                         "forward(x, intermediates=True)) for the invariance term")  # fmt: skip
    name = getattr(model, "penultimate", None) or names[-1]
    if name not in names:
        raise ValueError(f"{type(model).__name__}.penultimate = {name!r} is not among its features {names}")
    return name


def draw_t(generator: torch.Generator) -> float:
    """t = 0.5 + 0.5·clip(z, −0.5, 0.5), z ~ N(0, 1): a point in [0.25, 0.75] on the path to the cue model."""
    z = torch.randn((), generator=generator)
    return 0.5 + 0.5 * float(z.clamp(-0.5, 0.5))


def barrier_loss(
    model: nn.Module, anchor: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, t: float, barrier: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(|B − CE(f(x; θ_t), y)|, CE) with θ_t = t·anchor + (1 − t)·θ, θ the model's parameters.

    The gradient reaches θ scaled by (1 − t). Buffers are clones of the model's, so a train-mode
    batch-norm forward leaves the model's running statistics as they were.
    """
    params = {name: t * anchor[name] + (1 - t) * p for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    logits = functional_call(model, {**params, **buffers}, (x,))
    ce = F.cross_entropy(logits.float(), y)
    return (barrier - ce).abs(), ce


def class_means(z: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the (flattened) features of each class's examples (C, D), fp32, and which classes occur (C,)."""
    z = z.reshape(z.shape[0], -1).float()
    with torch.autocast(device_type=z.device.type, enabled=False):  # keep the sums in fp32
        onehot = F.one_hot(y, n_classes).float()  # (B, C)
        counts = onehot.sum(0)  # (C,)
        means = (onehot.T @ z) / counts.clamp_min(1)[:, None]
    return means, counts > 0


def invariance_loss(
    z_clean: torch.Tensor, y_clean: torch.Tensor, z_cued: torch.Tensor, y_cued: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """(1 / C)·Σ over classes present in both batches of ||n(mean clean) − n(mean cued)||², n(v) = v / ||v||."""
    clean, in_clean = class_means(z_clean, y_clean, n_classes)
    cued, in_cued = class_means(z_cued, y_cued, n_classes)
    gap = (F.normalize(clean, dim=1) - F.normalize(cued, dim=1)).square().sum(1)  # (C,)
    return (gap * (in_clean & in_cued)).sum() / n_classes


@register_method(
    "cbft",
    needs=("source",),
    config=CBFTConfig,
    description="connectivity-based fine-tuning of the source (cue) model: a loss barrier to it on cued data, "
    "then clean CE + clean/cued class-mean invariance, on each pair of batches",
)
class CBFT(Method):
    def build(self, ctx: MethodContext) -> nn.Module:
        check_cued_stream(ctx.data, f"task {getattr(ctx.task, 'name', type(ctx.task).__name__)!r}")
        model = source_copy(ctx)
        penultimate_feature(model)
        return model

    def objective(self, ctx: MethodContext, model: nn.Module) -> Objective:
        if not isinstance(ctx.config, CBFTConfig):
            raise TypeError(f"cbft needs its CBFTConfig block in ctx.config, got {type(ctx.config).__name__}")
        check_cued_stream(ctx.data)
        cfg = ctx.config
        source = dict(ctx.artifact("source").named_parameters())
        named = dict(model.named_parameters())
        check_same_architecture(named, source, "cbft (model vs source cue model)")
        anchor = {n: source[n].detach().clone().to(p.device) for n, p in named.items()}  # θ_c
        feature = penultimate_feature(model)
        t_generator = torch_generator(ctx.generator.initial_seed(), "cbft:t")
        base = cross_entropy(model, ctx.data, ctx.training.eval_batch_size)  # its score, params, snapshots
        epochs_done = 0
        sums: dict[str, torch.Tensor | float] = {}
        counts = {"barrier": 0, "clean": 0}

        def add(key: str, value: torch.Tensor | float) -> None:
            sums[key] = sums.get(key, 0.0) + (value.detach() if isinstance(value, torch.Tensor) else value)

        def loss(batch, step):  # two optimiser steps per batch: the barrier step, then the clean step
            cued = batch[CUED]
            if step % 2 == 0:
                t = draw_t(t_generator)
                value, ce_t = barrier_loss(model, anchor, cued.x, cued.y, t, cfg.barrier)
                for key, v in (("barrier_loss", value), ("barrier_ce", ce_t), ("t", t)):
                    add(key, v)
                counts["barrier"] += 1
                return value, {}
            clean = batch["train"]
            counts["clean"] += 1
            if cfg.invariance > 0 and epochs_done >= cfg.warmup_epochs:
                logits, features = model(clean.x, intermediates=True)
                # The cued images pass on clones of the buffers: batch norm's running statistics stay clean.
                buffers = {name: b.clone() for name, b in model.named_buffers()}
                _, cued_features = functional_call(model, buffers, (cued.x,), {"intermediates": True})
                invariance = invariance_loss(features[feature], clean.y, cued_features[feature], cued.y,
                                             logits.shape[-1])  # fmt: skip
                ce = F.cross_entropy(logits.float(), clean.y)
                add("ce", ce)
                add("invariance", invariance)
                return ce + cfg.invariance * invariance, {}
            ce = F.cross_entropy(model(clean.x).float(), clean.y)
            add("ce", ce)
            add("invariance", 0.0)
            return ce, {}

        def end_epoch(epoch: int) -> dict[str, float]:
            nonlocal epochs_done
            epochs_done = epoch
            row = {k: float(v) / counts["clean" if k in ("ce", "invariance") else "barrier"] for k, v in sums.items()}
            sums.clear()
            counts.update(barrier=0, clean=0)
            return row

        def state() -> dict:
            # Between epochs `sums` and `counts` are empty (end_epoch clears them).
            return {"t_generator": t_generator.get_state(), "epochs_done": epochs_done}

        def load_state(saved: dict) -> None:
            nonlocal epochs_done
            t_generator.set_state(saved["t_generator"])
            epochs_done = saved["epochs_done"]

        return dataclasses.replace(
            base,
            loss=loss,
            streams=("train", CUED),
            end_epoch=end_epoch,
            steps_per_batch=2,
            state=state,
            load_state=load_state,
        )
