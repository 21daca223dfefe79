"""FROZEN REFERENCE: continuous sparsification exactly as it was before discovery became an objective
of the shared training loop (commit 31c0b6d). Only tests import it, to check the shared loop gives
the same mask bit for bit. Do not edit.

Subnetwork discovery by continuous sparsification (METHOD.md, stage 2).

One score s per masked weight, initialised to -0.1. The soft mask sigmoid(T * s) multiplies the
frozen source weights; the loss is cross-entropy on the subtask plus lambda * sum(sigmoid(T * s)),
an L0 surrogate. T starts at 1 and is multiplied by final_temperature ** (1 / epochs) after each
epoch. After every epoch the hard mask at the requested sparsity (the top (1 - sparsity) scores)
is scored on the subtask's validation split; the best epoch's mask is kept.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from common.config import Frozen
from methods.discovery import DiscoveryConfig  # noqa: F401  (the annotation below)
from methods.masking import (
    Mask,
    MaskedModel,
    MaskSelection,
    ScoreMask,
    density,
    maskable_names,
    topk_mask,
)
from methods.training import NonFiniteLoss, batches, evaluate
from tasks.base import StageData


class _UnusedDiscoveryConfig(Frozen):
    method: Literal["continuous_sparsification", "magnitude"] = "continuous_sparsification"
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(500, ge=1)
    lr: float = Field(1e-3, gt=0)
    l0_lambda: float = Field(1e-7, ge=0)
    init_score: float = -0.1
    final_temperature: float = Field(100.0, ge=1)
    selection: MaskSelection = MaskSelection()


@dataclasses.dataclass
class Discovery:
    mask: Mask
    subtask_acc: float  # hard-masked model's subtask validation accuracy at the requested sparsity
    density: float
    natural_density: float  # fraction of scores > 0 at the kept epoch (the paper's own mask)
    best_epoch: int
    history: list[float]


def discover(
    model: nn.Module,
    data: StageData,
    cfg: DiscoveryConfig,
    sparsity: float,
    generator: torch.Generator,
) -> Discovery:
    """Find a mask over `model`'s selected weights that keeps the subtask at `sparsity`."""
    model.eval()  # dropout and batch-norm statistics off; the base weights never change
    for p in model.parameters():
        p.requires_grad_(False)
    names = maskable_names(model, cfg.selection)
    params = dict(model.named_parameters())
    if cfg.method == "magnitude":
        mask = topk_mask({n: params[n].abs() for n in names}, sparsity)
        acc = _hard_accuracy(model, mask, data)
        return Discovery(mask, acc, density(mask), density(mask), 0, [acc])

    fns = {n: ScoreMask(params[n].shape, cfg.init_score).to(params[n].device) for n in names}
    masked = MaskedModel(model, fns).eval()
    scores = {n: fns[n].scores for n in names}
    opt = torch.optim.AdamW(list(scores.values()), lr=cfg.lr, weight_decay=0.0)
    growth = cfg.final_temperature ** (1.0 / cfg.epochs)
    device = next(iter(scores.values())).device
    x, y = data.train.x.to(device), data.train.y.to(device)

    temperature = 1.0
    best: tuple[float, int, Mask, float] = (-1.0, 0, {}, 0.0)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        for fn in fns.values():
            fn.temperature, fn.hard = temperature, None
        for idx in batches(len(x), cfg.batch_size, generator):
            idx = idx.to(device)
            l0 = sum(torch.sigmoid(temperature * s).sum() for s in scores.values())
            loss = F.cross_entropy(masked(x[idx]), y[idx]) + cfg.l0_lambda * l0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"discovery loss became {loss.item()} in epoch {epoch}")
        temperature *= growth
        mask = topk_mask(scores, sparsity)
        acc = _hard_accuracy(model, mask, data, masked, fns)
        history.append(acc)
        if acc > best[0]:
            natural = sum(int((s > 0).sum()) for s in scores.values())
            natural /= sum(s.numel() for s in scores.values())
            best = (acc, epoch, mask, natural)
    acc, epoch, mask, natural = best
    return Discovery(mask, acc, density(mask), natural, epoch, history)


def _hard_accuracy(model, mask: Mask, data: StageData, masked=None, fns=None) -> float:
    if masked is None:
        fns = {n: ScoreMask(m.shape, 0.0) for n, m in mask.items()}
        masked = MaskedModel(model, fns)
    device = next(model.parameters()).device
    for n, fn in fns.items():
        fn.hard = mask[n].to(device)
    acc = evaluate(masked, data.val)["y"]
    for fn in fns.values():
        fn.hard = None
    return acc
