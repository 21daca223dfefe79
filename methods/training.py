"""Supervised training with best-epoch selection on a validation split, and evaluation."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from tasks.base import Split, StageData
from tasks.config import Frozen


class TrainConfig(Frozen):
    """One training stage (the source model, or the downstream model)."""

    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(50, ge=1)
    epochs: int = Field(20, ge=1, description="maximum epochs")
    target_val_acc: float | None = Field(
        None, gt=0, le=1, description="stop early once validation accuracy reaches this"
    )
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without gain")
    eval_batch_size: int = Field(2000, ge=1)


class NonFiniteLoss(FloatingPointError):
    """Training diverged: the loss became NaN or inf."""


@dataclasses.dataclass
class TrainResult:
    best_val_acc: float
    best_epoch: int
    epochs_run: int
    steps: int
    history: list[float]


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches over n rows, shuffled with `generator` (None: in order)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 2000) -> dict[str, float]:
    """Accuracy of argmax predictions against every label set of `split`."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    preds = []
    for idx in batches(len(split), batch_size, None):
        preds.append(model(split.x[idx].to(device)).argmax(-1).cpu())
    model.train(was_training)
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    return {name: float((pred == y).float().mean()) for name, y in split.labels.items()}


def train(
    model: nn.Module,
    data: StageData,
    cfg: TrainConfig,
    generator: torch.Generator,
    params: list[nn.Parameter] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    mixed_precision: bool = False,
) -> TrainResult:
    """Train with AdamW and cross-entropy; restore the epoch with the best validation accuracy.

    Shuffling uses `generator` only, so the run is a function of its inputs. `params` defaults to
    every parameter that requires grad. `mixed_precision` runs forward passes in bfloat16 autocast
    on CUDA (ignored on CPU, where results must stay bit-reproducible).
    """
    with torch.random.fork_rng(devices=[]):
        # Dropout draws from torch's global RNG: seed it from `generator` so that the run depends on
        # its inputs only, and restore the caller's RNG state afterwards.
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return _train(model, data, cfg, generator, params, on_epoch, mixed_precision)


def autocast(model: nn.Module, enabled: bool):
    """bfloat16 autocast on CUDA when `enabled`; a no-op elsewhere."""
    device = _device_of(model)
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train(model, data, cfg, generator, params, on_epoch, mixed_precision) -> TrainResult:
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = _device_of(model)
    x, y = data.train.x.to(device), data.train.y.to(device)
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    history, steps, stale = [], 0, 0
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=device)
        for idx in batches(len(x), cfg.batch_size, generator):
            idx = idx.to(device)
            with autocast(model, mixed_precision):
                loss = F.cross_entropy(model(x[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            steps += 1
        # Checked once per epoch: a per-step .item() would stall a GPU on every step.
        if not math.isfinite(loss_sum.item()):
            raise NonFiniteLoss(f"training loss became {loss_sum.item()} in epoch {epoch}")
        acc = evaluate(model, data.val, cfg.eval_batch_size)["y"]
        history.append(acc)
        if on_epoch is not None:
            on_epoch(epoch, acc)
        if acc > best[0]:
            best, stale = (acc, epoch, copy.deepcopy(model.state_dict())), 0
        else:
            stale += 1
        if cfg.target_val_acc is not None and acc >= cfg.target_val_acc:
            break
        if cfg.patience is not None and stale >= cfg.patience:
            break
    model.load_state_dict(best[2])
    return TrainResult(best_val_acc=best[0], best_epoch=best[1], epochs_run=epoch, steps=steps, history=history)


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
