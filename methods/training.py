"""The one training loop, the objectives it optimises, and how they are optimised.

`fit(objective, data, cfg, generator)` trains the source model, discovers masks (continuous
sparsification is an objective: cross-entropy + L0) and trains every downstream method;
`fit_many(objectives, datas, cfg, generators, engine)` trains K of them at once through an engine
(`Serial`, here, one model; `methods.packing.Vmapped`, K models of one architecture as one vectorised
model). Every rule lives once, in `_Loop`: seeding and batch streams, the optimiser and its schedule
(`TrainConfig`: AdamW or SGD, parameter groups, constant / linear / cosine with warm-up), the NaN
check, best-epoch selection (the initial model included: epoch 0), early stopping, checkpoints and
per-epoch reports. An engine only runs the K optimiser steps of one batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F
from torch.optim.adamw import adamw

from common.config import Frozen
from common.seeding import stage_seed
from tasks.base import Split, StageData


class ParamGroup(Frozen):
    """Parameters whose name matches `match` (a regular expression, searched in the dotted name, e.g.
    `bias|norm|ln_|emb` or `^head\\.`) train at `lr_scale` times the learning rate and, when given,
    with their own weight decay. The first group that matches a parameter takes it."""

    match: str
    lr_scale: float = Field(1.0, gt=0)
    weight_decay: float | None = Field(None, ge=0)

    @field_validator("match")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as error:
            raise ValueError(f"{v!r} is not a regular expression: {error}") from None
        return v


class SelectOn(Frozen):
    """Select the epoch on a validation split that measures what the method is for (for example
    shape decisions on cue-conflict validation images): accuracy against `label` on the task's
    evaluation split `split`, which must be a validation split (its name ends in `_val`: drawn from
    its own stream, never from test images; `tasks.base.StageData`)."""

    split: str = Field(description="a validation split of the task's: `val` or an evaluation split named `*_val`")
    label: str = Field("y", description="the label set of that split to score against (e.g. shape)")

    @field_validator("split")
    @classmethod
    def _validation(cls, v: str) -> str:
        if v != "val" and not v.endswith("_val"):
            raise ValueError(
                f"{v!r} is not a validation split: select on `val` or an evaluation split whose name ends in "
                "`_val` (e.g. cue_conflict_val); test splits never choose anything"
            )
        return v

    def describe(self) -> str:
        return f"{self.split}:{self.label}"


class TrainConfig(Frozen):
    """One training stage (the source model, or the downstream model): its optimiser, schedule,
    budget and selection. The schedule (after `warmup_steps` of linear warm-up) runs over the
    maximum number of steps, whether or not the run stops early. The model is scored before the
    first step (epoch 0) and after every epoch; the best by `select` is restored at the end, so a
    model that training does not improve is kept as it came (`best_epoch` 0).
    """

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd (with momentum / nesterov)")
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd's momentum")
    nesterov: bool = Field(False, description="sgd's Nesterov momentum (needs momentum > 0)")
    groups: tuple[ParamGroup, ...] = Field(
        (), description="per-parameter rules by name: [{match: regex, lr_scale: x, weight_decay: y}], first match wins"
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="constant, or linear / cosine decay to 0 over the maximum steps"
    )
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up before the schedule")
    batch_size: int = Field(50, ge=1)
    epochs: int = Field(20, ge=1, description="maximum epochs")
    min_steps: int = Field(
        0,
        ge=0,
        description="at least this many iterations (batches): more epochs on small data; an objective "
        "with several optimiser steps per batch (steps_per_batch) takes that many per iteration",
    )
    target_val_acc: float | None = Field(
        None, gt=0, le=1, description="stop early once validation accuracy reaches this"
    )
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without gain in `select`")
    eval_batch_size: int = Field(2000, ge=1)
    keep_initial: bool = Field(
        True, description="the model as it came (epoch 0) is a candidate for the best epoch; false: always train"
    )
    select: Literal["val_acc", "val_loss", "last"] | SelectOn = Field(
        "val_acc",
        description="what picks the best epoch (restored at the end) and what patience watches; last: keep the "
        "last epoch (no selection, patience never stops), as papers that report the end of training do; "
        "{split: NAME_val, label: L}: accuracy against label L on a validation split that measures what "
        "the method is for (e.g. {split: cue_conflict_val, label: shape})",
    )
    ties: Literal["first", "last"] = Field("first", description="of epochs equal in `select`, keep the first or last")

    @field_validator("select", mode="before")
    @classmethod
    def _select_name(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("val_acc", "val_loss", "last"):
            raise ValueError(
                f"{v!r} is not val_acc, val_loss or last; to select on a validation split write "
                f"{{split: {v}, label: LABEL}} (e.g. {{split: cue_conflict_val, label: shape}})"
            )
        return v

    @field_validator("nesterov")
    @classmethod
    def _nesterov(cls, v: bool, info) -> bool:
        if v and (info.data.get("optimizer") != "sgd" or not info.data.get("momentum")):
            raise ValueError("nesterov needs optimizer: sgd and momentum > 0")
        return v

    def max_epochs(self, batches_per_epoch: int) -> int:
        """The epoch budget: `epochs`, or more where they would take fewer than `min_steps` iterations."""
        return max(self.epochs, math.ceil(self.min_steps / max(1, batches_per_epoch)))


def optimizer(named: Sequence[tuple[str, torch.Tensor]], cfg: TrainConfig, **kwargs) -> torch.optim.Optimizer:
    """The optimiser `cfg` asks for over the named tensors: one parameter group per `cfg.groups`
    entry that matches any (in order), then the rest. Each group keeps its `base_lr` for the schedule."""
    buckets: list[list[torch.Tensor]] = [[] for _ in range(len(cfg.groups) + 1)]
    for name, tensor in named:
        at = next((i for i, g in enumerate(cfg.groups) if re.search(g.match, name)), len(cfg.groups))
        buckets[at].append(tensor)
    groups = []
    for i, params in enumerate(buckets):
        rule = cfg.groups[i] if i < len(cfg.groups) else None
        if not params:
            continue
        decay = cfg.weight_decay if rule is None or rule.weight_decay is None else rule.weight_decay
        lr = cfg.lr * (rule.lr_scale if rule is not None else 1.0)
        groups.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": decay})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kwargs)
    return torch.optim.AdamW(groups, lr=cfg.lr, **kwargs)


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float] | None:
    """The learning-rate multiplier of optimiser step t (counted from 0), or None for a constant
    rate. A pure function of the step count, which checkpoints hold, so a resumed run follows it."""
    warm = cfg.warmup_steps
    if cfg.lr_schedule == "constant" and warm == 0:
        return None

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


class NonFiniteLoss(FloatingPointError):
    """Training diverged: the loss became NaN or inf."""


class Interrupted(Exception):
    """Training stopped on request at an epoch end, after saving its checkpoint: running the same
    work again resumes it."""


Batch = dict[str, Split]  # stream name -> this step's batch of that stream
Measurements = dict[str, torch.Tensor]


@dataclasses.dataclass
class Objective:
    """What one training run optimises.

    - `loss(batch, step)` returns the scalar loss and named measurements (tensors; averaged per
      epoch and logged). `batch[stream]` is a `Split` for each name in `streams`.
    - `streams`: "train" is `data.train`; any other name is `data.streams[name]`. An epoch is one
      pass over the first stream; the others cycle, each with its own shuffling generator.
    - `params`: what the optimiser updates. `module`: put in train mode (or eval, `train_mode=False`)
      at the start of every epoch.
    - `score()`: higher is better; the epoch with the best score is restored at the end
      (`snapshot()` / `restore(state)`; the default copies the module's state dict).
    - `val_loss()`: optional, the training loss on validation data; needed by `select: val_loss`,
      which restores the epoch with the lowest one instead.
    - `initial_candidate`: whether the model is scored before the first step and may be kept as it
      came (epoch 0). False for an objective whose `score()` has effects of its own (a discoverer
      that keeps its own best masks per call).
    - `end_epoch(epoch)`: optional hook after each epoch (e.g. annealing); may return measurements.
    - `global_rng`: whether the loss draws from torch's global RNG (dropout). If so, the loop seeds it
      from the run's generator (one draw, before shuffling) and restores the caller's state after.
    - `steps_per_batch`: optimiser steps taken on each batch, each with its own `loss(batch, step)`
      call (`step` counts optimiser steps), e.g. CBFT's barrier step then clean step on one pair of
      batches. Measurements are averaged over the steps that report them.
    - `state()` / `load_state(state)`: the objective's own mutable state between epochs (a
      temperature annealed in `end_epoch`, a random stream of its own, an epoch counter), for
      checkpoints (see `supervised`). Parameters, optimiser, batch streams, torch's global RNG and the
      loop's counters are saved by the loop; an objective that keeps anything else across epochs
      must provide both, or a resumed run would differ from an uninterrupted one. Like `snapshot()`,
      `state()` returns tensors, numbers, strings, None and lists / tuples / dicts of them.
    """

    loss: Callable[[Batch, int], tuple[torch.Tensor, Measurements]]
    module: nn.Module
    params: list[nn.Parameter]
    score: Callable[[], float]
    streams: tuple[str, ...] = ("train",)
    train_mode: bool = True
    snapshot: Callable[[], Any] | None = None
    restore: Callable[[Any], None] | None = None
    end_epoch: Callable[[int], dict[str, float] | None] | None = None
    global_rng: bool = True
    steps_per_batch: int = 1
    state: Callable[[], Any] | None = None
    load_state: Callable[[Any], None] | None = None
    val_loss: Callable[[], float] | None = None
    initial_candidate: bool = True

    def __post_init__(self):
        if not self.streams:
            raise ValueError("an objective needs at least one batch stream")
        if self.steps_per_batch < 1:
            raise ValueError(f"steps_per_batch must be at least 1, got {self.steps_per_batch}")
        if self.snapshot is None:
            self.snapshot = lambda: copy.deepcopy(self.module.state_dict())
            self.restore = self.module.load_state_dict
        elif self.restore is None:
            raise ValueError("an objective with its own snapshot() needs restore() too")
        if (self.state is None) != (self.load_state is None):
            raise ValueError("an objective with state() needs load_state() too, and the reverse")


@dataclasses.dataclass
class TrainResult:
    best_val_acc: float  # the best epoch's score (validation accuracy for the default objective)
    # (with `select: val_loss` the best epoch is the lowest validation loss's, and this its score)
    best_epoch: int
    epochs_run: int
    steps: int
    history: list[float]  # score per epoch
    measurements: list[dict[str, float]]  # per epoch: mean of each loss measurement, plus end_epoch's
    initial_score: float | None = None  # the score before the first step (epoch 0), when measured
    # The module's state at the last epoch, when it is not the kept one (not compared: tensors).
    last_state: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def cross_entropy(
    model: nn.Module, data: StageData, eval_batch_size: int = 2000, params: list[nn.Parameter] | None = None
) -> Objective:
    """The default objective: cross-entropy on the training split, scored by validation accuracy.

    A model with its own training loss (attribute `own_loss = True`; a `MaskedModel` reports
    its base's) is trained on that instead: `model(x, targets=y)` returns `(loss, measurements)`,
    and its measurements are logged. `val_loss` is the same loss on the validation split.
    """

    def loss(batch: Batch, step: int):
        if getattr(model, "own_loss", False):
            return model(batch["train"].x, targets=batch["train"].y)
        ce = F.cross_entropy(model(batch["train"].x).float(), batch["train"].y)
        return ce, {"ce": ce}

    loss.through_module = model  # reads what it trains through `model` only: `whole_step` may swap them
    return Objective(
        loss=loss,
        module=model,
        params=trainable(model) if params is None else params,
        score=lambda: evaluate(model, data.val, eval_batch_size)["y"],
        val_loss=lambda: training_loss(model, data.val, eval_batch_size),
    )


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches over n rows, shuffled with `generator` (None: in order)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def _eval_pass(model: nn.Module, split: Split, batch_size: int, fn: Callable[[torch.Tensor, torch.Tensor], Any]):
    """`fn(x, idx)` over `split` in order, in eval mode (the model's mode restored after)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    out = [fn(split.x[idx].to(device), idx) for idx in batches(len(split), batch_size, None)]
    model.train(was_training)
    return out


def evaluate(model: nn.Module, split: Split, batch_size: int = 2000) -> dict[str, float]:
    """Accuracy of argmax predictions against every label set of `split`."""
    preds = _eval_pass(model, split, batch_size, lambda x, idx: forward(model, x).argmax(-1).cpu())
    return _accuracies(preds, split)


def mean_loss(model: nn.Module, split: Split, batch_size: int = 2000) -> float:
    """Mean cross-entropy of `model` on `split` (eval mode)."""
    ce = lambda x, idx: _ce_sum(forward(model, x), split, idx)  # noqa: E731
    return sum(_eval_pass(model, split, batch_size, ce)) / max(1, len(split))


def evaluate_with_loss(model: nn.Module, split: Split, batch_size: int = 2000) -> tuple[dict[str, float], float]:
    """`evaluate` and `mean_loss` from one forward pass per batch (the same numbers as the two calls)."""

    def both(x, idx):
        logits = forward(model, x)
        return logits.argmax(-1).cpu(), _ce_sum(logits, split, idx)

    out = _eval_pass(model, split, batch_size, both)
    return _accuracies([p for p, _ in out], split), sum(ce for _, ce in out) / max(1, len(split))


def _ce_sum(logits: torch.Tensor, split: Split, idx: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float(), split.y[idx].to(logits.device), reduction="sum"))


def _accuracies(preds: list[torch.Tensor], split: Split) -> dict[str, float]:
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    return {name: float((pred == y).float().mean()) for name, y in split.labels.items()}


def training_loss(model: nn.Module, split: Split, batch_size: int = 2000) -> float:
    """Mean of the loss `cross_entropy` trains `model` on, over `split` (eval mode): the model's own
    loss where it has one (`own_loss`; a mean per example, so batches weigh by their size), else
    `mean_loss`."""
    if not getattr(model, "own_loss", False):
        return mean_loss(model, split, batch_size)
    own = lambda x, idx: float(model(x, targets=split.y[idx].to(x.device))[0]) * len(idx)  # noqa: E731
    return sum(_eval_pass(model, split, batch_size, own)) / max(1, len(split))


def autocast(model: nn.Module, enabled: bool):
    """bfloat16 autocast on CUDA when `enabled`; a no-op elsewhere."""
    device = _device_of(model)
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    model: nn.Module,
    data: StageData,
    cfg: TrainConfig,
    generator: torch.Generator,
    params: list[nn.Parameter] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    mixed_precision: bool = False,
) -> TrainResult:
    """`fit` with the default objective: cross-entropy, best epoch by validation accuracy."""
    objective = cross_entropy(model, data, cfg.eval_batch_size, params)
    return fit(objective, data, cfg, generator, on_epoch=on_epoch, mixed_precision=mixed_precision)


# --- supervision: checkpoints, stop requests and per-epoch reports, from the caller ------------


class Checkpointer(Protocol):
    """Where the `fit` runs under one `Supervision` keep their state: one slot per run, numbered
    in call order (a method may train in several runs, e.g. a probe then a fine-tune). `due()`:
    whether to save now (asked at every epoch end); `save` gets live tensors: serialise before
    returning."""

    def due(self) -> bool: ...

    def load(self, slot: int) -> dict[str, Any] | None: ...

    def save(self, slot: int, state: dict[str, Any]) -> None: ...


EpochObserver = Callable[[str, int, dict[str, float]], None]  # (run label, epoch, values)


@dataclasses.dataclass
class Supervision:
    """What the caller (the orchestrator) plugs into every `fit` run inside `supervised(...)`.

    - `name`: what is trained ("train": the downstream model; an artifact kind). It labels the
      epoch reports: the first run is `name`, later ones `name.2`, `name.3`, ...
    - `checkpointer`: each run saves its whole state there at epoch ends when `due()`; a run whose
      slot holds a state resumes from it, bit for bit as if it had never stopped (on CPU).
    - `should_stop()`: asked at every epoch end; when True the run saves its state (with a
      checkpointer) and raises `Interrupted`.
    - `on_epoch(label, epoch, values)`: after every epoch, with `val_score` (the objective's score),
      `loss` (the mean loss per optimiser step) and the epoch's measurements. A pack reports each
      model to its own observer (`fit_many(observers=...)`) instead.
    Nothing here draws from a random stream or reorders the loop's work: supervised or not, a run
    gives the same numbers.
    """

    name: str = "train"
    checkpointer: Checkpointer | None = None
    should_stop: Callable[[], bool] | None = None
    on_epoch: EpochObserver | None = None
    runs: int = 0  # fit calls so far under this supervision: the next run's slot

    def claim(self) -> tuple[int, str]:
        """(slot, label) of the next run."""
        slot, self.runs = self.runs, self.runs + 1
        return slot, self.name if slot == 0 else f"{self.name}.{slot + 1}"


_SUPERVISION: contextvars.ContextVar[Supervision | None] = contextvars.ContextVar("supervision", default=None)


@contextlib.contextmanager
def supervised(supervision: Supervision) -> Iterator[Supervision]:
    """Every `fit` inside the block (on this thread) is supervised by `supervision`."""
    token = _SUPERVISION.set(supervision)
    try:
        yield supervision
    finally:
        _SUPERVISION.reset(token)


# --- the loop ----------------------------------------------------------------------------------


class NotPackable(ValueError):
    """These objectives cannot be trained by this engine together; train each with `fit`."""


def fit(
    objective: Objective,
    data: StageData,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    mixed_precision: bool = False,
) -> TrainResult:
    """Train `objective` (see `TrainConfig` for the optimiser, schedule, budget and selection) and
    restore its best epoch; the serial engine of `fit_many`, for one model.

    Shuffling of the first stream uses `generator`; every other stream gets a seed derived from its
    seed without drawing from it, so adding a stream never moves the first stream's batches. Dropout
    draws from torch's global RNG, seeded from `generator` (see `Objective.global_rng`), so the run is
    a function of its inputs; the caller's RNG state is restored afterwards. `mixed_precision` runs
    the loss in bfloat16 autocast on CUDA (a no-op on CPU, which stays bit-reproducible). A NaN or
    inf loss raises `NonFiniteLoss`. Inside `supervised(...)` the run checkpoints, resumes, stops on
    request (`Interrupted`) and reports each epoch (see `Supervision`). `on_epoch(epoch, score)`:
    called after every epoch.
    """
    observers = None
    if on_epoch is not None:
        supervision = _SUPERVISION.get()
        reports = supervision.on_epoch if supervision is not None else None

        def observer(label: str, epoch: int, values: dict[str, float]) -> None:
            on_epoch(epoch, values["val_score"])
            if reports is not None:
                reports(label, epoch, values)

        observers = [observer]
    (result,) = fit_many([objective], [data], cfg, [generator], Serial(), mixed_precision=mixed_precision,
                         observers=observers)  # fmt: skip
    if isinstance(result, BaseException):
        raise result
    return result


def fit_many(
    objectives: Sequence[Objective],
    datas: Sequence[StageData],
    cfg: TrainConfig,
    generators: Sequence[torch.Generator],
    engine: Engine | None = None,
    *,
    mixed_precision: bool = False,
    observers: Sequence[EpochObserver | None] | None = None,
) -> list[TrainResult | BaseException]:
    """Train each `objectives[k]` on `datas[k]` with `generators[k]` as `fit` would alone, through
    `engine` (default `Serial`, one model). Returns per model its `TrainResult`, or the
    `NonFiniteLoss` that ended it (the others go on). `observers[k]` receives model k's epoch reports
    (default, for one model: the supervision's). An engine that cannot train these objectives raises
    `NotPackable` before any training and before drawing from any generator."""
    engine = engine or Serial()
    k = len(objectives)
    if not k or len(datas) != k or len(generators) != k:  # a ValueError: the caller's mistake
        raise NotPackable(f"{len(generators)} generators for {k} objectives and {len(datas)} data sets")
    for objective in objectives:
        if cfg.select == "val_loss" and objective.val_loss is None:
            raise ValueError(
                f"select: val_loss needs the objective's validation loss, and this one (training a "
                f"{type(objective.module).__name__}) has none; use select: val_acc"
            )
    if isinstance(cfg.select, SelectOn):
        for data in datas:
            selection_split(cfg.select, data)
    reason = engine.refuses(objectives, datas)
    if reason is not None:
        raise NotPackable(reason)
    with engine.running(list(objectives), list(datas), cfg, mixed_precision):  # may refuse: before the claim
        supervision = _SUPERVISION.get()
        if observers is None:
            observers = [supervision.on_epoch if supervision is not None and k == 1 else None] * k
        loop = _Loop(list(objectives), list(datas), cfg, list(generators), engine, supervision, list(observers))
        with _recorded(engine, loop.max_epochs + 1):  # one model's passes: the same whatever the pack
            return loop.run()


@dataclasses.dataclass
class Member:
    """One model of a run: its place in the caller's list and everything the loop keeps for it."""

    index: int
    objective: Objective
    gens: dict[str, torch.Generator]  # stream -> its shuffling generator (the first: the caller's)
    queues: dict[str, list[torch.Tensor]]  # stream (not the first) -> its pending batches of indices
    observer: EpochObserver | None
    best: tuple[float, int, Any]  # (score, epoch, snapshot) of the kept epoch
    best_key: float = -math.inf  # the kept epoch's value of `cfg.select`, as higher-is-better
    stale: int = 0  # epochs since the best one
    initial: float | None = None
    history: list[float] = dataclasses.field(default_factory=list)
    measured: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "generators": {name: gen.get_state() for name, gen in self.gens.items()},
            "queues": self.queues,
            "best": list(self.best),
            "best_key": self.best_key,
            "stale": self.stale,
            "initial": self.initial,
            "history": self.history,
            "measurements": self.measured,
            "objective": self.objective.state() if self.objective.state is not None else None,
        }

    def load(self, saved: dict[str, Any]) -> None:
        for name, gen in self.gens.items():
            gen.set_state(saved["generators"][name])
        self.queues = {name: list(pending) for name, pending in saved["queues"].items()}
        self.best, self.best_key, self.stale = tuple(saved["best"]), saved["best_key"], saved["stale"]
        self.initial, self.history = saved["initial"], list(saved["history"])
        self.measured = list(saved["measurements"])
        if self.objective.load_state is not None:
            self.objective.load_state(saved["objective"])

    def result(self, epochs: int, steps: int, last_state: dict[str, Any] | None = None) -> TrainResult:
        return TrainResult(
            best_val_acc=self.best[0],
            best_epoch=self.best[1],
            epochs_run=epochs,
            steps=steps,
            history=self.history,
            measurements=self.measured,
            initial_score=self.initial,
            last_state=last_state,
        )


class Engine:
    """How the live models' optimiser steps run; everything else is the loop's (`_Loop`).

    `refuses` says why it cannot train these objectives (None: it can), before anything is drawn;
    `running` holds the engine's state for one run (its optimiser over `cfg`, see `optimizer`);
    `seed` gets each model's dropout seed (drawn by the loop from its generator when the objective
    draws from the global RNG); `step` runs one optimiser step of every live model on its batch
    (index tensors per stream) and returns the losses (A,) and measurements (A,) each; `sync` leaves
    each live model's weights in its module; `keep` drops the models not at `rows`; `state` / `load`
    checkpoint what the engine holds."""

    def refuses(self, objectives: Sequence[Objective], datas: Sequence[StageData]) -> str | None:
        return None

    def running(self, objectives, datas, cfg: TrainConfig, mixed_precision: bool):
        raise NotImplementedError

    def seed(self, seeds: list[int | None], initial: list[int]) -> None:
        """Each model's dropout seed (None: its objective draws no dropout from the global RNG) and
        its generator's initial seed."""
        raise NotImplementedError

    def step(self, idx: list[dict[str, torch.Tensor]], step: int) -> tuple[torch.Tensor, Measurements]:
        raise NotImplementedError

    def sync(self) -> None:
        pass

    def keep(self, rows: list[int]) -> None:
        raise NotImplementedError

    def set_lr(self, factor: float) -> None:
        set_lr(self.opt, factor)

    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class Serial(Engine):
    """One model, stepped by its own loss, backward and optimiser; its dropout draws from torch's
    global RNG, seeded from its generator inside a forked RNG state.

    `compile`: True, False or "auto" (see `compiles`); None (the default) takes the setting of the
    enclosing `compiling(...)` block, False outside any. Compiled, the loss (forward and loss, its
    backward through AOTAutograd) runs through `torch.compile` (`Compiled`) and the optimiser
    is the fused one; on CPU the numbers follow the eager run's within float rounding (each step's
    loss within 1e-5 relative over 100 steps, tests/methods/test_compile.py), not bit for bit."""

    def __init__(self, compile: CompileSetting | None = None):
        self.compile = compile

    def refuses(self, objectives, datas):
        return None if len(objectives) == 1 else f"the serial engine trains one model, not {len(objectives)}"

    @contextlib.contextmanager
    def running(self, objectives, datas, cfg, mixed_precision):
        (self.objective,), (data,) = objectives, datas
        module = self.objective.module
        self.device, self.mixed_precision = _device_of(module), mixed_precision
        self.splits = {name: _stream(data, name).to(self.device) for name in self.objective.streams}
        names = {id(p): n for n, p in module.named_parameters()}
        self.loose = _loose(self.objective)
        named = [(names.get(id(p), f"loose.{i}"), p) for i, p in enumerate(self.objective.params)]
        self.compiled = compiles(self.compile, self.device, planned_steps(cfg, self.objective, data))
        # Compiled: the fused optimiser (one kernel over all tensors; measured faster on CPU, see
        # docs/PERFORMANCE.md); eager: the default, so that eager numbers do not move.
        self.fused = True if self.compiled and self.device.type in ("cpu", "cuda") else None
        self.opt = optimizer(named, cfg, fused=self.fused)
        self.loss = Compiled(self.objective.loss, self._eager) if self.compiled else self.objective.loss
        # Compiled, and where the objective allows it: forward, backward and the AdamW update as one graph.
        self.whole = None
        if (
            self.compiled
            and self.device.type == "cpu"  # on CUDA not measured yet: the compiled loss and the fused optimiser
            and whole_step_refuses(self.objective, self.opt, self.loose) is None
        ):
            self.whole = compiled_whole(
                whole_step, self.objective, self._loss_only, lambda *args: self._step(args[-2], args[-1])
            )
            self.call = _LossCall(module, self.objective.loss)
            # aliases: the update writes the module's tensors
            self.names, self.values = in_optimizer_order(self.opt, {id(p): n for n, p in named})
            self.lrs = [torch.tensor(0.0) for _ in self.opt.param_groups]
            self.moments: list[tuple[torch.Tensor, ...]] | None = None  # AdamW's state, made at the first step
        with torch.random.fork_rng(devices=[]) if self.objective.global_rng else contextlib.nullcontext():
            yield self

    def _eager(self) -> None:
        """Compiling failed (before this run's first optimiser step, or at a new batch shape): the
        rest of the run is the eager engine's, its optimiser's kernels included."""
        self.compiled, self.fused, self.whole = False, None, None
        for group in self.opt.param_groups:
            group["fused"] = None

    def _loss_only(self) -> None:
        """The whole step failed to compile: the run's later steps compile the loss only."""
        self.whole = None

    def seed(self, seeds, initial):
        if seeds[0] is not None:
            torch.manual_seed(seeds[0])

    def step(self, idx, step):
        batch = {name: self.splits[name].take(i.to(self.device)) for name, i in idx[0].items()}
        if self.whole is not None:
            if self.moments is None:
                self.moments = adamw_moments(self.opt)
            loss, measurements = self.whole(
                self.call, self.names, self.values, self.moments, adamw_rates(self.opt, self.lrs),
                adamw_hyper(self.opt), batch, step,
            )  # fmt: skip
            return loss.reshape(1), {key: v.float().reshape(1) for key, v in measurements.items()}
        return self._step(batch, step)

    def _step(self, batch: Batch, step: int) -> tuple[torch.Tensor, Measurements]:
        """One step by the objective's loss (compiled or not), autograd and the optimiser's kernels."""
        objective = self.objective
        with autocast(objective.module, self.mixed_precision):
            loss, measurements = self.loss(batch, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach().reshape(1), {key: v.detach().float().reshape(1) for key, v in measurements.items()}

    def keep(self, rows):
        pass

    def state(self):
        device, global_rng = self.device, self.objective.global_rng
        return {
            "module": self.objective.module.state_dict(),
            "loose_params": [p.detach() for p in self.loose],
            "optimizer": self.opt.state_dict(),
            "cpu_rng": torch.get_rng_state() if global_rng else None,
            "cuda_rng": torch.cuda.get_rng_state(device) if global_rng and device.type == "cuda" else None,
        }

    def load(self, state):
        self.objective.module.load_state_dict(state["module"])
        with torch.no_grad():
            for param, saved in zip(self.loose, state["loose_params"], strict=True):
                param.copy_(saved)
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:  # a checkpoint of the other engine resumes in this one's kernels
            group["fused"] = self.fused
        self.moments = None  # the loaded state's tensors, not the ones made before
        if self.objective.global_rng:
            torch.set_rng_state(state["cpu_rng"])
            if state["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)


# --- the compiled step --------------------------------------------------------------------------


def whole_step_refuses(objective: Objective, opt: torch.optim.Optimizer, loose: list[nn.Parameter]) -> str | None:
    """Why a compiled run of `objective` cannot take its whole step (forward, backward and
    optimiser update) as one graph, or None. It can where its loss reads every tensor it trains
    through its module only (the loss function says so, naming the module: `through_module`;
    `cross_entropy`'s does), every one of them is the module's own and requires a gradient, the
    optimiser is AdamW without amsgrad, the module has no loss of its own and no batch norm that
    updates running statistics, and no whole step of this module type and loss failed to compile
    in the process before. Otherwise the compiled run compiles its loss and steps the fused optimiser.

    One difference from `torch.optim.AdamW` that no model here has: `torch.func.grad` gives a
    trained tensor the loss does not use a zero gradient where autograd gives None, so such a
    tensor would get AdamW's weight decay and moment updates where the eager step skips it. A
    model with trainable parameters outside its forward should not mark its loss `through_module`."""
    if getattr(objective.loss, "through_module", None) is not objective.module:
        return "its loss does not say it reads its tensors through this module only"
    if loose or not all(p.requires_grad for p in objective.params):
        return "it trains tensors outside its module, or tensors that need no gradient"
    if type(opt) is not torch.optim.AdamW or any(g["amsgrad"] or g["maximize"] for g in opt.param_groups):
        return "its optimiser is not plain AdamW"
    if getattr(objective.module, "own_loss", False):
        return "its module has a loss of its own, which may keep state"
    if objective.train_mode and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in objective.module.modules()
    ):
        return "its batch norm updates running statistics in place, which torch.func.grad does not allow"
    if whole_failures(objective):
        return f"a whole step of this model and loss failed to compile in this process ({whole_failures(objective)[0]})"
    return None


def compiled_whole(
    fn: Callable[..., Any], objective: Objective, on_fallback: Callable[[], None], instead: Callable[..., Any]
) -> Compiled:
    """`fn`, an engine's whole step for `objective`, through `Compiled`: a failure to compile it is
    recorded for the objective's module type and loss (`whole_failures`) and the call runs `instead`
    (the engine's compiled loss and fused optimiser)."""
    return Compiled(
        fn,
        on_fallback,
        instead=instead,
        failures=whole_failures(objective),
        then="stepping through the compiled loss and the fused optimiser instead in this process",
        whole=True,
    )


def in_optimizer_order(
    opt: torch.optim.Optimizer, name_of: dict[int, str]
) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    """The optimiser's tensors in its order (group by group, as `adamw_moments` and `adamw_hyper`
    list them): their names (`name_of`: by tensor id) and detached aliases of them."""
    in_order = [p for group in opt.param_groups for p in group["params"]]
    return tuple(name_of[id(p)] for p in in_order), [p.detach() for p in in_order]


def whole_failures(objective: Objective) -> list[str]:
    """Why whole steps of this objective's module type and loss code failed to compile in this
    process (empty: none did). Kept per model and loss, not per process, so that one model whose
    whole step cannot compile does not change how another model's trials run (and so their numbers)."""
    return _WHOLE_BROKEN.setdefault((type(objective.module), objective.loss.__code__), [])


class _LossCall(nn.Module):  # also the vmapped engine's (methods/packing.py)
    """A loss that reads its module's tensors, as a module call: `functional_call` swaps them."""

    def __init__(self, module: nn.Module, loss: Callable[[Batch, int], tuple[torch.Tensor, Measurements]]):
        super().__init__()
        self.module, self.loss = module, loss

    def forward(self, batch: Batch, step: int):
        return self.loss(batch, step)


def whole_step(call, names, values, moments, lrs, hyper, batch, step):
    """One optimiser step as one function, for `torch.compile` to take whole: the loss's gradient in
    the trained tensors `values` (aliases of the module's, named `names`, in the optimiser's order)
    by `torch.func.grad`, then AdamW's update in place (`adamw_update`). `call`: the loss as a
    module call (`_LossCall`). Returns the loss and the measurements, detached."""

    def scored(values):
        out, measurements = torch.func.functional_call(
            call, {f"module.{n}": v for n, v in zip(names, values, strict=True)}, (batch, step)
        )
        return out, (out.detach(), {key: v.detach() for key, v in measurements.items()})

    grads, (out, measurements) = torch.func.grad(scored, has_aux=True)(values)
    adamw_update(values, grads, moments, lrs, hyper)
    return out, measurements


def adamw_moments(opt: torch.optim.Optimizer) -> list[tuple[torch.Tensor, ...]]:
    """Each tensor's AdamW state (first and second moments, step count), in the optimiser's order,
    from its own `state`; made where missing as `torch.optim.AdamW` makes it on a first step, so
    that checkpoints and the optimiser's own kernels (after a fallback) read and resume it as theirs."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                opt.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
    keys = ("exp_avg", "exp_avg_sq", "step")
    return [tuple(opt.state[p][key] for key in keys) for group in opt.param_groups for p in group["params"]]


def adamw_hyper(opt: torch.optim.Optimizer) -> tuple[tuple[int, float, float, float, float], ...]:
    """Per parameter group: its size, betas, eps and weight decay (constants of a compiled graph)."""
    return tuple((len(g["params"]), *g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups)


def adamw_rates(opt: torch.optim.Optimizer, lrs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each group's learning rate now, written into the tensors `lrs`: a new rate (the schedule's)
    is data for a compiled graph, not a new graph."""
    for lr, group in zip(lrs, opt.param_groups, strict=True):
        lr.fill_(group["lr"])
    return lrs


def adamw_update(values, grads, moments, lrs, hyper) -> None:
    """Torch's own AdamW update (`torch.optim.adamw.adamw`, the single-tensor one, which Inductor
    fuses) in place, one call per parameter group, tensors in the optimiser's order."""
    start = 0
    with torch.no_grad():
        for (count, beta1, beta2, eps, decay), lr in zip(hyper, lrs, strict=True):
            at = slice(start, start + count)
            adamw(
                list(values[at]), list(grads[at]), [m[0] for m in moments[at]], [m[1] for m in moments[at]], [],
                [m[2] for m in moments[at]], foreach=False, capturable=False, amsgrad=False, beta1=beta1,
                beta2=beta2, lr=lr, weight_decay=decay, eps=eps, maximize=False,
            )  # fmt: skip
            start += count


CompileSetting = bool | Literal["auto"]
_COMPILE: contextvars.ContextVar[CompileSetting] = contextvars.ContextVar("compile", default=False)

# `auto` compiles a run of at least this many planned optimiser steps: the break-even of a first
# compile against the step time it saves, measured by benchmarks/step_speed.py (docs/PERFORMANCE.md).
# The rule reads only the run itself, never what the process ran before: compiled and eager numbers
# differ by float rounding, so a rule that depended on a worker's history (which trials it ran
# first) would give the same trial different numbers from one run of a sweep to the next.
AUTO_MIN_STEPS = 2000
_BROKEN: list[str] = []  # why torch.compile failed in this process (then every run trains eagerly)
_WHOLE_BROKEN: dict[tuple, list[str]] = {}  # (module type, loss code) -> why its whole step failed to compile


@dataclasses.dataclass
class CompileRecord:
    """What the training runs inside one `compiling(...)` block did: how many ran, and how many of
    them ran compiled (a run whose compile failed before its first step counts as eager)."""

    runs: int = 0
    compiled: int = 0
    whole: int = 0  # of them, runs that stepped through the compiled whole step (`whole_step`)


_RECORD: contextvars.ContextVar[CompileRecord | None] = contextvars.ContextVar("compile_record", default=None)
_STEPS_COMPILED = [0]  # compiled training calls that ran in this process (`Compiled(counts=True)`)
_STEPS_WHOLE = [0]  # of them, whole steps (`Compiled(whole=True)`)


@contextlib.contextmanager
def compiling(setting: CompileSetting) -> Iterator[CompileRecord]:
    """Every `fit` / `fit_many` inside the block (on this thread) compiles its step per `setting`:
    True, False, or "auto" (`compiles`). Yields the block's `CompileRecord` (a trial's row says
    from it whether its training ran compiled)."""
    record = CompileRecord()
    tokens = _COMPILE.set(setting), _RECORD.set(record)
    try:
        yield record
    finally:
        _RECORD.reset(tokens[1])
        _COMPILE.reset(tokens[0])


@contextlib.contextmanager
def _recorded(engine: Engine, passes: int) -> Iterator[None]:
    """One training run through `engine`, planning `passes` validation passes per model (not all its
    models' together: a trial's numbers do not depend on how many models share its pack):
    its validation compiled per `eval_policy`, and the run counted in the enclosing
    `compiling(...)` block's record."""
    before, before_whole = _STEPS_COMPILED[0], _STEPS_WHOLE[0]
    try:
        with compiled_eval(eval_policy(engine, passes)):
            yield
    finally:
        record = _RECORD.get()
        if record is not None:  # compiled: some step ran compiled, or the engine still compiles (a run
            record.runs += 1  # resumed after its last epoch steps no more; a failed compile turns it off)
            record.compiled += _STEPS_COMPILED[0] > before or bool(getattr(engine, "compiled", False))
            record.whole += _STEPS_WHOLE[0] > before_whole


# --- compiled evaluation -------------------------------------------------------------------------

# `auto` compiles the validation passes of a compiled run that plans at least this many (all its
# models' together; never by what the process compiled before, as `AUTO_MIN_STEPS`): the
# break-even of a compile from a warm Inductor cache (3.6 s) at the 5.6 ms a compiled pass saved on
# the quickstart's GPT (benchmarks/eval_speed.py, docs/PERFORMANCE.md).
AUTO_MIN_EVAL_PASSES = 650
EvalSetting = bool
_EVAL: contextvars.ContextVar[EvalSetting] = contextvars.ContextVar("compiled_eval", default=False)
_FORWARD: list[Compiled] = []  # `_logits` through torch.compile, made once per process


def eval_policy(engine: Engine, passes: int) -> EvalSetting:
    """How a run's validation passes run: eager unless its step compiles; then compiled with
    `resources.compile: true`, and with `auto` when it plans at least `AUTO_MIN_EVAL_PASSES` passes."""
    if not getattr(engine, "compiled", False):
        return False
    setting = engine.compile if getattr(engine, "compile", None) is not None else _COMPILE.get()
    return setting is True or passes >= AUTO_MIN_EVAL_PASSES


@contextlib.contextmanager
def compiled_eval(enabled: EvalSetting = True) -> Iterator[None]:
    """Inside the block (on this thread) `forward`, and so `evaluate`, `mean_loss` and
    `evaluate_with_loss`, runs models through torch.compile when `enabled`. A training run sets it
    by `eval_policy`. The argmax predictions follow the eager ones (tests/methods/test_compile.py);
    losses within float rounding."""
    token = _EVAL.set(enabled)
    try:
        yield
    finally:
        _EVAL.reset(token)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)`; inside `compiled_eval(True)` through torch.compile (Inductor): one graph per
    model type, parameter shapes, mode and input shape, kept in the process and reused by every
    model like it (a later trial's, an analysis' probe); eager after a one-line warning where
    compiling fails, as the training step (`Compiled`)."""
    setting = _EVAL.get()
    if not setting or _BROKEN:
        return model(x)
    if not _FORWARD:
        _FORWARD.append(Compiled(_logits, lambda: None, counts=False))
    return _FORWARD[0](model, x)


def planned_steps(cfg: TrainConfig, objective: Objective, data: StageData) -> int:
    """The optimiser steps a run of `objective` on `data` takes if it never stops early."""
    batches = math.ceil(len(_stream(data, objective.streams[0])) / cfg.batch_size)
    return cfg.max_epochs(batches) * batches * objective.steps_per_batch


def compiles(setting: CompileSetting | None, device: torch.device, planned_steps: int) -> bool:
    """Whether a run compiles its step: `setting` True or False, or "auto": unless torch.compile
    failed before in this process, when the run plans at least `AUTO_MIN_STEPS` optimiser steps (a
    function of the run alone, so a trial's numbers never depend on what its worker ran before).
    A later run of a model like it reuses the process's graphs either way. None: the setting of the
    enclosing `compiling(...)` block (False outside any)."""
    setting = _COMPILE.get() if setting is None else setting
    if setting != "auto":
        return bool(setting) and not _BROKEN
    if _BROKEN or device.type not in ("cpu", "cuda"):
        return False
    return planned_steps >= AUTO_MIN_STEPS


class Compiled:
    """`fn` through `torch.compile` (Inductor; random draws through torch's own generators,
    `fallback_random`, so dropout draws the eager run's masks). Compiled code lives in the process,
    keyed by `fn`'s code: a later run of the same function on a model of the same structure (another
    trial in this worker) reuses it, guarded by module type, shapes and mode. The tensors of every
    call (a `Split`'s too) are marked static: a last, smaller batch compiles its own graph once and
    the full batches keep theirs (no recompile per epoch). If compiling or the compiled call fails,
    the call runs eagerly (the random state as it was; `on_fallback` puts the caller's other kernels
    back to eager ones) after a one-line warning, and every later call and run in this process is
    eager. A call of a training step (`counts`) is counted for the enclosing `compiling(...)` block's record.

    `instead` (default: `fn` itself) runs a call that did not run compiled, and `failures` (default:
    `_BROKEN`, which turns every compiled call of the process eager) records why compiling failed:
    the whole step (`whole_step`) falls back to the compiled loss, and only the whole step stops.
    A whole step (`whole`) updates weights in place, so once one has run, a failure that is not
    torch.compile's own (a `TorchDynamoException`: tracing or compiling a new graph, before any
    kernel runs) is raised, not retried from weights it may have half updated."""

    def __init__(
        self,
        fn: Callable[..., Any],
        on_fallback: Callable[[], None],
        counts: bool = True,
        instead: Callable[..., Any] | None = None,
        failures: list[str] | None = None,
        then: str = "training eagerly in this process",
        whole: bool = False,
    ):
        self.eager, self.on_fallback, self.counts = instead or fn, on_fallback, counts
        self.failures, self.then, self.whole = _BROKEN if failures is None else failures, then, whole
        self.ran = False  # a compiled call returned
        config = torch._dynamo.config
        # Every function x module type x batch shape x mode of a worker's runs keeps its compiled graph.
        config.recompile_limit = max(config.recompile_limit, 64)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
        self.compiled = torch.compile(fn, options={"fallback_random": True})

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None and _BROKEN:  # another compiled call (validation's) failed: eager now
            self.compiled = None
            self.on_fallback()
        if self.compiled is not None:
            for leaf in torch.utils._pytree.tree_leaves(args):
                for tensor in (leaf.x, *leaf.labels.values()) if isinstance(leaf, Split) else (leaf,):
                    if isinstance(tensor, torch.Tensor):
                        torch._dynamo.mark_static(tensor)
            rng = torch.get_rng_state()
            try:
                out = self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any failure: eager, which raises a real error again
                if self.whole and self.ran and not isinstance(error, torch._dynamo.exc.TorchDynamoException):
                    raise
                first = (str(error).strip().splitlines() or [""])[0][:200]
                self.failures.append(f"{type(error).__name__}: {first}")
                warnings.warn(
                    f"torch.compile failed ({self.failures[-1]}); {self.then} (resources.compile: false avoids trying)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiled = None
                torch.set_rng_state(rng)
                self.on_fallback()
            else:
                _STEPS_COMPILED[0] += self.counts
                _STEPS_WHOLE[0] += self.whole
                self.ran = True
                return out
        return self.eager(*args)


class _Loop:
    """One run of K >= 1 models: streams, schedule, epochs, selection, stops, checkpoints, reports."""

    def __init__(self, objectives, datas, cfg: TrainConfig, generators, engine: Engine, supervision, observers):
        self.objectives, self.cfg, self.engine, self.supervision = objectives, cfg, engine, supervision
        self.datas = datas
        self.slot, self.label = supervision.claim() if supervision is not None else (0, "train")
        lead = objectives[0]
        self.streams = lead.streams
        self.sizes = {name: len(_stream(datas[0], name)) for name in self.streams}
        self.members = [
            Member(
                index=k,
                objective=o,
                gens={n: g if i == 0 else _derived(g, f"stream:{n}") for i, n in enumerate(o.streams)},
                queues={n: [] for n in o.streams[1:]},
                observer=observers[k],
                best=(-math.inf, 0, None),
            )
            for k, (o, g) in enumerate(zip(objectives, generators, strict=True))
        ]
        self.results: list[TrainResult | BaseException | None] = [None] * len(objectives)
        self.epoch = self.steps = 0
        batches = math.ceil(self.sizes[self.streams[0]] / cfg.batch_size)
        per_epoch = batches * lead.steps_per_batch  # optimiser steps
        self.max_epochs = cfg.max_epochs(batches)  # min_steps counts iterations (batches)
        # The schedule runs over the maximum number of steps, whether or not the run stops early.
        self.factor = lr_factor(cfg, self.max_epochs * per_epoch)

    def run(self) -> list[TrainResult | BaseException]:
        engine = self.engine
        first = self.streams[0]
        # Dropout: one draw from each model's generator, before its shuffling (see `Objective.global_rng`).
        engine.seed(
            [int(torch.randint(2**62, (1,), generator=m.gens[first])) if m.objective.global_rng else None
             for m in self.members],
            [m.gens[first].initial_seed() for m in self.members],
        )  # fmt: skip
        live = self.members
        checkpointer = self.supervision.checkpointer if self.supervision is not None else None
        saved = checkpointer.load(self.slot) if checkpointer is not None else None
        self.saved = saved is not None  # whether this run's slot holds a state
        if saved is not None:
            live = self._resume(saved)
        else:
            live = [m for m in live if not self._start(m)]
        if live and self.sizes[first] == 0:  # no training data (a budget of n = 0): the model as it came
            for m in live:
                self.results[m.index] = m.result(0, 0)
            live = []
        if self.factor is not None:
            engine.set_lr(self.factor(self.steps))
        while live:
            live = self._epoch(live)
        return self.results  # type: ignore[return-value]

    def _start(self, m: Member) -> bool:
        """Epoch 0: the model as it came is the first candidate (`Objective.initial_candidate`).
        Whether it is already done (its score reached `target_val_acc`)."""
        objective = m.objective
        if not (objective.initial_candidate and self.cfg.keep_initial):
            m.best = (-math.inf, 0, objective.snapshot())
            return False
        score = objective.score()
        key = selection_key(self.cfg, objective, score, {}, self.datas[m.index])
        m.initial, m.best, m.best_key = score, (score, 0, objective.snapshot()), key
        if self.cfg.target_val_acc is not None and score >= self.cfg.target_val_acc:
            self.results[m.index] = m.result(0, 0)
            return True
        return False

    def _epoch(self, live: list[Member]) -> list[Member]:
        cfg, engine = self.cfg, self.engine
        self.epoch += 1
        first, others = self.streams[0], self.streams[1:]
        for m in live:
            m.objective.module.train(m.objective.train_mode)
        plans = [batches(self.sizes[first], cfg.batch_size, m.gens[first]) for m in live]
        sums: dict[str, torch.Tensor] = {}
        reported: dict[str, int] = {}
        loss_sum: torch.Tensor | None = None
        first_step = self.steps
        for j in range(len(plans[0])):
            idx = []
            for m, plan in zip(live, plans, strict=True):
                batch = {first: plan[j]}
                for name in others:
                    if not m.queues[name]:
                        m.queues[name] = batches(self.sizes[name], cfg.batch_size, m.gens[name])
                    batch[name] = m.queues[name].pop(0)
                idx.append(batch)
            for _ in range(live[0].objective.steps_per_batch):
                loss, measurements = engine.step(idx, self.steps)
                loss_sum = loss.float() if loss_sum is None else loss_sum + loss
                for key, value in measurements.items():
                    sums[key] = sums.get(key, 0.0) + value
                    reported[key] = reported.get(key, 0) + 1
                self.steps += 1
                if self.factor is not None:
                    engine.set_lr(self.factor(self.steps))  # the next step's (0 after the last)
        engine.sync()
        # Checked once per epoch: a per-step .item() would stall a GPU on every step.
        totals = loss_sum.tolist() if loss_sum is not None else [0.0] * len(live)
        sums_of = {key: value.tolist() for key, value in sums.items()}
        lr = self.cfg.lr * self.factor(self.steps) if self.factor is not None else None  # groups scale it
        staying = []
        for row, (m, total) in enumerate(zip(live, totals, strict=True)):
            if not math.isfinite(total):
                self.results[m.index] = NonFiniteLoss(f"training loss became {total} in epoch {self.epoch}")
                continue
            values = {key: s[row] / reported[key] for key, s in sums_of.items()}
            if self._epoch_end(m, values, lr, total / max(1, self.steps - first_step)):
                kept_last = m.best[1] == self.epoch  # else the last epoch's weights go with the result
                last = None if kept_last else copy.deepcopy(m.objective.module.state_dict())
                m.objective.restore(m.best[2])
                self.results[m.index] = m.result(self.epoch, self.steps, last)
            else:
                staying.append(row)
        if len(staying) < len(live):
            live = [live[row] for row in staying]
            if live:
                engine.keep(staying)
        if self.supervision is not None:
            self._supervise(live)
        return live

    def _epoch_end(self, m: Member, row: dict[str, float], lr: float | None, loss: float) -> bool:
        """Score model `m` (its module holds this epoch's weights), keep its best epoch by
        `cfg.select`, report the epoch; whether it is done."""
        cfg, objective, epoch = self.cfg, m.objective, self.epoch
        if objective.end_epoch is not None:
            row.update(objective.end_epoch(epoch) or {})
        score = objective.score()
        key = selection_key(cfg, objective, score, row, self.datas[m.index])
        if lr is not None:
            row["lr"] = lr
        m.history.append(score)
        m.measured.append(row)
        later = cfg.ties == "last" or cfg.select == "last"  # an equal key replaces the kept epoch
        if key > m.best_key or (later and key == m.best_key):  # patience restarts
            m.best, m.best_key, m.stale = (score, epoch, objective.snapshot()), key, 0
        else:
            m.stale += 1
        if m.observer is not None:
            m.observer(self.label, epoch, {"val_score": score, "loss": loss, **row})
        return (
            epoch >= self.max_epochs
            or (cfg.target_val_acc is not None and score >= cfg.target_val_acc)
            or (cfg.patience is not None and m.stale >= cfg.patience)
        )

    def _supervise(self, live: list[Member]) -> None:
        """At an epoch end: save a checkpoint when due or stopping (a finished run's too, so that
        work after it, if interrupted, does not train again), and stop when asked while models are
        still training."""
        supervision = self.supervision
        stop = bool(live) and supervision.should_stop is not None and supervision.should_stop()  # not asked at the end
        checkpointer = supervision.checkpointer
        # At the end: saved too if an earlier state of this run is stored, which a rerun would resume.
        if checkpointer is not None and (stop or checkpointer.due() or (not live and self.saved)):
            checkpointer.save(self.slot, self._state(live))
            self.saved = True
        if stop:
            kept = "checkpointed" if checkpointer is not None else "not checkpointed"
            raise Interrupted(f"{self.label}: stopped on request after epoch {self.epoch} ({kept})")

    def _state(self, live: list[Member]) -> dict[str, Any]:
        """Everything of the run that changes from epoch to epoch: the engine's (weights, optimiser,
        random streams), each live model's streams and selection, each finished model's result and
        module (its kept epoch)."""
        done = {}
        for k, result in enumerate(self.results):
            if isinstance(result, TrainResult):
                objective = self.objectives[k]
                done[k] = {
                    "result": dataclasses.asdict(result),
                    "module": objective.module.state_dict(),
                    "objective": objective.state() if objective.state is not None else None,
                }
            elif result is not None:
                done[k] = {"error": str(result)}
        return {
            "config": self.cfg.model_dump(),
            "models": len(self.objectives),
            "streams": list(self.streams),
            "epoch": self.epoch,
            "steps": self.steps,
            "live": [m.state() for m in live],
            "done": done,
            "engine": self.engine.state() if live else None,
        }

    def _resume(self, saved: dict[str, Any]) -> list[Member]:
        if (
            saved.get("config") != self.cfg.model_dump()
            or saved.get("models") != len(self.objectives)
            or saved.get("streams") != list(self.streams)
        ):
            raise ValueError(
                "a checkpoint of another training run was found in this run's slot (saved for "
                f"{saved.get('models')} models, {saved.get('config')} on streams {saved.get('streams')}); "
                "delete it to start afresh"
            )
        for k, done in saved["done"].items():
            k = int(k)
            if "error" in done:
                self.results[k] = NonFiniteLoss(done["error"])
            else:
                objective = self.objectives[k]
                objective.module.load_state_dict(done["module"])
                if objective.load_state is not None:
                    objective.load_state(done["objective"])
                self.results[k] = TrainResult(**done["result"])
        live = []
        for entry in saved["live"]:
            m = self.members[entry["index"]]
            m.load(entry)
            live.append(m)
        if live:  # else every model had finished: their results are all there is
            if len(live) < len(self.members):
                self.engine.keep([m.index for m in live])
            self.engine.load(saved["engine"])
            self.engine.sync()
        self.epoch, self.steps = saved["epoch"], saved["steps"]
        return live


def selection_key(
    cfg: TrainConfig, objective: Objective, score: float, row: dict[str, float], data: StageData | None = None
) -> float:
    """This epoch's value of `cfg.select`, higher is better: the score, or minus the validation
    loss (which is added to the epoch's measurements `row`), or the accuracy on the validation split
    `SelectOn` names (added to `row` as `select_<split>_<label>`); `last`: +inf, every epoch replaces
    the one before (`_epoch_end`), so the last is kept."""
    select = cfg.select
    if select == "val_acc":
        return score
    if select == "last":
        return math.inf
    if isinstance(select, SelectOn):
        if data is None:
            raise ValueError(f"select: {select.describe()} needs the stage's data")
        split = selection_split(select, data)
        value = evaluate(objective.module, split, cfg.eval_batch_size)[select.label]
        row[f"select_{select.split}_{select.label}"] = value
        return value
    row["val_loss"] = objective.val_loss()
    return -row["val_loss"]


def selection_split(select: SelectOn, data: StageData) -> Split:
    """The validation split `select` names, or a ValueError that says which splits the task has."""
    split = data.val if select.split == "val" else data.evals.get(select.split)
    names = ["val", *(n for n in data.evals if n.endswith("_val"))]
    if split is None:
        raise ValueError(
            f"training.select: this task has no validation split {select.split!r}; it has: {', '.join(names)}"
        )
    if select.label not in split.labels:
        raise ValueError(
            f"training.select: split {select.split!r} has no label {select.label!r}; it has: {', '.join(split.labels)}"
        )
    return split


def _loose(objective: Objective) -> list[nn.Parameter]:
    """The objective's parameters that its module does not hold (its state dict misses them)."""
    held = {id(p) for p in objective.module.parameters()}
    return [p for p in objective.params if id(p) not in held]


def _stream(data: StageData, name: str) -> Split:
    if name == "train":
        return data.train
    if name not in data.streams:
        raise KeyError(
            f"the objective reads batch stream {name!r}, which the data lacks; it has: "
            f"{', '.join(['train', *data.streams])}"
        )
    return data.streams[name]


def _derived(generator: torch.Generator, stage: str) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(stage_seed(generator.initial_seed(), stage))
    return gen


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
