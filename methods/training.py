"""The one training loop, and the objectives it optimises.

`fit(objective, data, cfg, generator)` trains the source model, discovers masks (continuous
sparsification is an objective: cross-entropy + L0) and trains every downstream method. An
`Objective` says which batch streams it consumes, how it turns a batch of each into a loss and named
measurements, which parameters it updates, and how an epoch is scored for best-epoch selection.
Cross-entropy on the training split, scored by validation accuracy, is the default
(`cross_entropy`). The loop keeps seeding, NaN/inf detection, mixed precision, the learning-rate
schedule, best-epoch selection and early stopping in one place, so every method inherits them.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from common.config import Frozen
from common.seeding import stage_seed
from tasks.base import Split, StageData


class TrainConfig(Frozen):
    """One training stage (the source model, or the downstream model).

    Best epoch and patience follow `select`: the highest validation score (`val_acc`, the
    objective's `score()`), or the lowest validation loss (`val_loss`, the objective's
    `val_loss()`: the training loss on the validation split, in eval mode). `ties`: which of equal
    values is kept. `lr_schedule: linear` decays the learning rate linearly from `lr` to 0 over
    `epochs` epochs' optimiser steps (the maximum, as Hugging Face's linear schedule: step t runs at
    lr * (1 - t / total)).
    """

    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = Field(50, ge=1)
    epochs: int = Field(20, ge=1, description="maximum epochs")
    target_val_acc: float | None = Field(
        None, gt=0, le=1, description="stop early once validation accuracy reaches this"
    )
    patience: int | None = Field(None, ge=1, description="stop after this many epochs without gain in `select`")
    eval_batch_size: int = Field(2000, ge=1)
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant, or linear decay to 0 over the maximum epochs' steps"
    )
    select: Literal["val_acc", "val_loss"] = Field(
        "val_acc", description="what picks the best epoch (restored at the end) and what patience watches"
    )
    ties: Literal["first", "last"] = Field("first", description="of epochs equal in `select`, keep the first or last")


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


@torch.no_grad()
def mean_loss(model: nn.Module, split: Split, batch_size: int = 2000) -> float:
    """Mean cross-entropy of `model` on `split` (eval mode)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total = 0.0
    for idx in batches(len(split), batch_size, None):
        logits = model(split.x[idx].to(device)).float()
        total += float(F.cross_entropy(logits, split.y[idx].to(device), reduction="sum"))
    model.train(was_training)
    return total / max(1, len(split))


@torch.no_grad()
def training_loss(model: nn.Module, split: Split, batch_size: int = 2000) -> float:
    """Mean of the loss `cross_entropy` trains `model` on, over `split` (eval mode): the model's own
    loss where it has one (`own_loss`; a mean per example, so batches weigh by their size), else
    `mean_loss`."""
    if not getattr(model, "own_loss", False):
        return mean_loss(model, split, batch_size)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total = 0.0
    for idx in batches(len(split), batch_size, None):
        loss, _ = model(split.x[idx].to(device), targets=split.y[idx].to(device))
        total += float(loss) * len(idx)
    model.train(was_training)
    return total / max(1, len(split))


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
    in call order (a method may train in several runs, e.g. a probe then a fine-tune)."""

    def due(self) -> bool:
        """Whether to save now (asked at every epoch end)."""
        ...

    def load(self, slot: int) -> dict[str, Any] | None:
        """The state last saved in `slot`, or None."""
        ...

    def save(self, slot: int, state: dict[str, Any]) -> None:
        """Store `state` in `slot`. It holds live tensors (the module's, the optimiser's): serialise
        it before returning."""
        ...


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
      `loss` (the mean loss per optimiser step) and the epoch's measurements.
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


def fit(
    objective: Objective,
    data: StageData,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    mixed_precision: bool = False,
) -> TrainResult:
    """Train `objective` with AdamW; restore the epoch with the best score.

    Shuffling of the first stream uses `generator`; every other stream gets a seed derived from its
    seed without drawing from it, so adding a stream never moves the first stream's batches. Dropout
    draws from torch's global RNG, seeded from `generator` (see `Objective.global_rng`), so the run is
    a function of its inputs. Stops at `cfg.epochs`, once the score reaches `cfg.target_val_acc`, or
    after `cfg.patience` epochs without gain in `cfg.select` (see `TrainConfig`).
    `mixed_precision` runs the loss in bfloat16 autocast on CUDA (a no-op on CPU, which stays
    bit-reproducible). A NaN or inf loss raises `NonFiniteLoss`. Inside `supervised(...)` the run
    checkpoints, resumes, stops on request (`Interrupted`) and reports each epoch (see `Supervision`).
    """
    supervision = _SUPERVISION.get()
    run = _Run(supervision, *supervision.claim()) if supervision is not None else None
    if not objective.global_rng:
        return _fit(objective, data, cfg, generator, on_epoch, mixed_precision, run)
    with torch.random.fork_rng(devices=[]):
        # Dropout draws from torch's global RNG: seed it from `generator` so that the run depends on
        # its inputs only, and restore the caller's RNG state afterwards.
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        return _fit(objective, data, cfg, generator, on_epoch, mixed_precision, run)


@dataclasses.dataclass
class _Run:
    supervision: Supervision
    slot: int
    label: str


@dataclasses.dataclass
class _Loop:
    """Everything of a run that changes from epoch to epoch, so that a checkpoint holds it all."""

    objective: Objective
    cfg: TrainConfig
    opt: torch.optim.Optimizer
    gens: dict[str, torch.Generator]  # stream -> its shuffling generator (the first: the caller's)
    queues: dict[str, list[torch.Tensor]]  # stream (not the first) -> its pending batches of indices
    best: tuple[float, int, Any]  # (score, epoch, snapshot) of the kept epoch
    best_key: float = -math.inf  # the kept epoch's value of `cfg.select`, as higher-is-better
    epoch: int = 0
    steps: int = 0
    stale: int = 0  # epochs since the best one
    finished: bool = False
    history: list[float] = dataclasses.field(default_factory=list)
    measured: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def state(self) -> dict[str, Any]:
        objective, device = self.objective, _device_of(self.objective.module)
        global_rng = objective.global_rng
        return {
            "config": self.cfg.model_dump(),
            "streams": list(objective.streams),
            "epoch": self.epoch,
            "steps": self.steps,
            "stale": self.stale,
            "finished": self.finished,
            "best": list(self.best),
            "best_key": self.best_key,
            "history": self.history,
            "measurements": self.measured,
            "module": objective.module.state_dict(),
            "loose_params": [p.detach() for p in _loose(objective)],
            "optimizer": self.opt.state_dict(),
            "generators": {name: gen.get_state() for name, gen in self.gens.items()},
            "queues": self.queues,
            "cpu_rng": torch.get_rng_state() if global_rng else None,
            "cuda_rng": torch.cuda.get_rng_state(device) if global_rng and device.type == "cuda" else None,
            "objective": objective.state() if objective.state is not None else None,
        }

    def load(self, state: dict[str, Any]) -> None:
        objective, device = self.objective, _device_of(self.objective.module)
        if state["config"] != self.cfg.model_dump() or state["streams"] != list(objective.streams):
            raise ValueError(
                "a checkpoint of another training run was found in this run's slot (saved for "
                f"{state['config']} on streams {state['streams']}); delete it to start afresh"
            )
        objective.module.load_state_dict(state["module"])
        with torch.no_grad():
            for param, saved in zip(_loose(objective), state["loose_params"], strict=True):
                param.copy_(saved)
        self.opt.load_state_dict(state["optimizer"])
        for name, gen in self.gens.items():
            gen.set_state(state["generators"][name])
        self.queues = {name: list(pending) for name, pending in state["queues"].items()}
        if objective.global_rng:
            torch.set_rng_state(state["cpu_rng"])
            if state["cuda_rng"] is not None and device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], device)
        if objective.load_state is not None:
            objective.load_state(state["objective"])
        self.epoch, self.steps, self.stale = state["epoch"], state["steps"], state["stale"]
        self.finished, self.best, self.best_key = state["finished"], tuple(state["best"]), state["best_key"]
        self.history, self.measured = list(state["history"]), list(state["measurements"])


def _loose(objective: Objective) -> list[nn.Parameter]:
    """The objective's parameters that its module does not hold (its state dict misses them)."""
    held = {id(p) for p in objective.module.parameters()}
    return [p for p in objective.params if id(p) not in held]


def _fit(objective: Objective, data, cfg, generator, on_epoch, mixed_precision, run: _Run | None) -> TrainResult:
    module = objective.module
    device = _device_of(module)
    splits = {name: _stream(data, name).to(device) for name in objective.streams}
    gens = {
        name: generator if i == 0 else _derived(generator, f"stream:{name}") for i, name in enumerate(objective.streams)
    }
    lead, others = objective.streams[0], objective.streams[1:]
    check_selectable(cfg, objective)
    # The schedule runs over the maximum number of steps, whether or not the run stops early.
    per_epoch = math.ceil(len(splits[lead]) / cfg.batch_size) * objective.steps_per_batch
    schedule = lr_schedule(cfg, cfg.epochs * per_epoch)
    loop = _Loop(
        objective=objective,
        cfg=cfg,
        opt=torch.optim.AdamW(objective.params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        gens=gens,
        queues={name: [] for name in others},
        best=(-math.inf, 0, objective.snapshot()),
    )
    checkpointer = run.supervision.checkpointer if run is not None else None
    saved = checkpointer.load(run.slot) if checkpointer is not None else None
    if saved is not None:
        loop.load(saved)
    opt, queues = loop.opt, loop.queues
    if schedule is not None:
        _set_lr(opt, schedule(loop.steps))
    while not loop.finished:
        loop.epoch += 1
        epoch = loop.epoch
        module.train(objective.train_mode)
        sums: dict[str, torch.Tensor] = {}
        reported: dict[str, int] = {}
        loss_sum = torch.zeros((), device=device)
        first_step = loop.steps
        for idx in batches(len(splits[lead]), cfg.batch_size, gens[lead]):
            batch = {lead: splits[lead].take(idx.to(device))}
            for name in others:
                if not queues[name]:
                    queues[name] = batches(len(splits[name]), cfg.batch_size, gens[name])
                batch[name] = splits[name].take(queues[name].pop(0).to(device))
            for _ in range(objective.steps_per_batch):
                with autocast(module, mixed_precision):
                    loss, measurements = objective.loss(batch, loop.steps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                for key, value in measurements.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                    reported[key] = reported.get(key, 0) + 1
                loop.steps += 1
                if schedule is not None:
                    _set_lr(opt, schedule(loop.steps))  # the next step's (0 after the last)
        # Checked once per epoch: a per-step .item() would stall a GPU on every step.
        total = loss_sum.item()
        if not math.isfinite(total):
            raise NonFiniteLoss(f"training loss became {total} in epoch {epoch}")
        row = {key: float(value) / reported[key] for key, value in sums.items()}
        if objective.end_epoch is not None:
            row.update(objective.end_epoch(epoch) or {})
        score = objective.score()
        key = selection_key(cfg, objective, score, row)
        if schedule is not None:
            row["lr"] = opt.param_groups[0]["lr"]
        loop.history.append(score)
        loop.measured.append(row)
        if on_epoch is not None:
            on_epoch(epoch, score)
        if improves(cfg, key, loop.best_key):
            loop.best, loop.best_key, loop.stale = (score, epoch, objective.snapshot()), key, 0
        else:
            loop.stale += 1
        loop.finished = (
            epoch >= cfg.epochs
            or (cfg.target_val_acc is not None and score >= cfg.target_val_acc)
            or (cfg.patience is not None and loop.stale >= cfg.patience)
        )
        if run is not None:
            _supervise(run, loop, score, total / max(1, loop.steps - first_step), row)
    objective.restore(loop.best[2])
    return TrainResult(
        best_val_acc=loop.best[0],
        best_epoch=loop.best[1],
        epochs_run=loop.epoch,
        steps=loop.steps,
        history=loop.history,
        measurements=loop.measured,
    )


# Schedule and selection, shared with any other loop over `TrainConfig` (methods/packing.py).


def lr_schedule(cfg: TrainConfig, total_steps: int) -> Callable[[int], float] | None:
    """The learning rate of optimiser step t (counted from 0), or None for a constant one. A pure
    function of the step count, which checkpoints hold, so a resumed run follows it exactly."""
    if cfg.lr_schedule == "constant":
        return None
    return lambda step: cfg.lr * max(0.0, 1.0 - step / max(1, total_steps))


def check_selectable(cfg: TrainConfig, objective: Objective) -> None:
    """Raise ValueError if `cfg.select` needs what `objective` lacks."""
    if cfg.select == "val_loss" and objective.val_loss is None:
        raise ValueError(
            f"select: val_loss needs the objective's validation loss, and this one (training a "
            f"{type(objective.module).__name__}) has none; use select: val_acc"
        )


def selection_key(cfg: TrainConfig, objective: Objective, score: float, row: dict[str, float]) -> float:
    """This epoch's value of `cfg.select`, higher is better: the score, or minus the validation
    loss (which is added to the epoch's measurements `row`)."""
    if cfg.select == "val_acc":
        return score
    row["val_loss"] = objective.val_loss()
    return -row["val_loss"]


def improves(cfg: TrainConfig, key: float, best_key: float) -> bool:
    """Whether an epoch with selection value `key` replaces the kept one (`cfg.ties`); patience
    restarts when it does."""
    return key > best_key or (cfg.ties == "last" and key == best_key)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _supervise(run: _Run, loop: _Loop, score: float, loss: float, row: dict[str, float]) -> None:
    """At an epoch end: report it, save a checkpoint when due or stopping, and stop when asked."""
    supervision = run.supervision
    if supervision.on_epoch is not None:
        supervision.on_epoch(run.label, loop.epoch, {"val_score": score, "loss": loss, **row})
    stop = supervision.should_stop is not None and supervision.should_stop()
    checkpointer = supervision.checkpointer
    if checkpointer is not None and (stop or checkpointer.due()):
        checkpointer.save(run.slot, loop.state())
    if stop:
        raise Interrupted(f"{run.label}: stopped on request after epoch {loop.epoch}")


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
