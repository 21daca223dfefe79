"""Packed training: K objectives of one architecture trained as one vectorised model.

`fit_packed(objectives, datas, cfg, generators)` trains K objectives (one per trial: the same
method's objective on K seeds' data and inits, say) together. Every parameter and buffer of the K
modules is stacked along a new leading dimension, the K losses come from one `torch.vmap` over the
first objective's `loss` with its module's tensors swapped for model k's, and one foreach AdamW
updates the stacked parameters (elementwise, so it is K independent AdamWs).

Each model keeps what `fit` would do for it alone: its own shuffling generator (and the derived
ones of its other streams), its own dropout stream, optimiser state, best-epoch selection by its
own `score()`, early stop (a finished model leaves the pack, so it stops costing compute) and
NaN/inf isolation (a diverging model's entry is a `NonFiniteLoss`; the others go on). Afterwards
every `objectives[k].module` holds what `fit` would have left there, within float tolerance.

Dropout: the lead module's `nn.Dropout` modules are stood in for during the run, and each model's
masks are drawn outside vmap from its own generator, seeded as `fit` seeds the global RNG (one draw
from its shuffling generator), site by site in the order and shapes its forward applies them
(recorded by a forward of a copy of the first model at every batch shape a step can have). Inside
`tasks.models.dropout.dropout_through_modules()` models route fused dropout (attention's) through a
module too. On CPU a model therefore gets its serial run's dropout masks: its losses follow the
serial run's within float rounding (batched kernels sum in another order and attention runs the
math kernel, so not bitwise), and its packed run is bitwise the same whatever else is in the pack,
in which order, and in a pack of one (tests/test_packing.py). On CUDA, serial dropout runs other
kernels (fused attention and dropout), so there the masks are not the serial ones; nor is the
independence from the pack established there (batched kernels may choose their algorithm by K).
vmap runs with `randomness="error"`: a loss that draws random numbers any other way is refused
(`NotPackable`) by that first forward, before any generator is drawn from.

What packs: objectives whose loss is a function of the batch, the step and their module's tensors
only, built the same way for every member (`Method.packable` marks the methods whose objective is).
`packable(objectives, datas)` says why a pack is refused; `fit_packed` raises `NotPackable` with
that reason before training anything, so the caller can fall back to `fit`. Inside
`supervised(...)` a pack checkpoints as `fit` does (its checkpointer's `due()` and the stop request
asked at every epoch end; a stop saves, then raises `Interrupted`), one state for the whole pack
(`_state`): a run of the same objectives on the same slot resumes it bit for bit on CPU. Epoch
reports (`on_epoch`) are not sent for a pack.

Attention runs the math kernel of `scaled_dot_product_attention` (`sdpa_kernel`) inside the pack:
it batches under vmap, where CPU's fused kernel has no batching rule and would run once per model.
Buffers that forward updates in place (batch-norm statistics) stay per model. A pack of one is
slower than `fit` (vmap's overhead); the gain grows with K (benchmarks/packing_fit.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from common.seeding import stage_seed
from methods.training import (
    _SUPERVISION,
    Interrupted,
    Measurements,
    NonFiniteLoss,
    Objective,
    TrainConfig,
    TrainResult,
    _derived,
    _device_of,
    _loose,
    _Run,
    _set_lr,
    _stream,
    autocast,
    batches,
    check_selectable,
    improves,
    lr_schedule,
    selection_key,
)
from tasks.base import Split, StageData
from tasks.models.dropout import dropout_through_modules

Labels = dict[str, torch.Tensor]  # label set name -> labels


class NotPackable(ValueError):
    """These objectives cannot be trained as one packed model; train each with `fit`."""


# --- what packs ---------------------------------------------------------------------------------


def packable(objectives: Sequence[Objective], datas: Sequence[StageData] | None = None) -> str | None:
    """None if `fit_packed` can train `objectives` (on `datas`, when given) as one pack, else why not."""
    if not objectives:
        return "no objectives to pack"
    for k, objective in enumerate(objectives):
        reason = _unsupported(objective)
        if reason is not None:
            return f"objective {k} {reason}"
    lead = objectives[0]
    if len({id(o.module) for o in objectives}) < len(objectives):
        return "two objectives train the same module"
    signature = _signature(lead)
    for k, objective in enumerate(objectives[1:], start=1):
        if type(objective.module) is not type(lead.module):
            ours, theirs = type(lead.module).__name__, type(objective.module).__name__
            return f"objective {k}'s module is a {theirs}, objective 0's a {ours}"
        if _loss_code(objective) is not _loss_code(lead):
            return f"objective {k}'s loss is another function than objective 0's"
        for what in ("streams", "train_mode", "global_rng"):
            if getattr(objective, what) != getattr(lead, what):
                return f"objective {k}'s {what} differs from objective 0's"
        theirs = _signature(objective)
        for what, ours in signature.items():
            if theirs[what] != ours:
                diff = sorted(set(theirs[what]) ^ set(ours)) or [n for n in ours if ours[n] != theirs[what].get(n)]
                return f"objective {k}'s {what} differ from objective 0's at {diff[:3]}"
    if datas is not None:
        return _data_reason(lead, datas, len(objectives))
    return None


def _unsupported(objective: Objective) -> str | None:
    if objective.steps_per_batch != 1:
        return f"takes {objective.steps_per_batch} steps per batch (packing takes one)"
    if _loose(objective):
        return "updates parameters its module does not hold (loose params)"
    if objective.end_epoch is not None:
        return "has an end_epoch hook"
    if objective.state is not None:
        return "keeps its own state between epochs (state / load_state)"
    if not _default_snapshot(objective):
        return "has its own snapshot / restore"
    return None


def _default_snapshot(objective: Objective) -> bool:
    # Objective.__post_init__ fills both with the module's state dict copy when none is given.
    restore = objective.restore
    return (
        getattr(restore, "__self__", None) is objective.module
        and getattr(restore, "__func__", None) is nn.Module.load_state_dict
        and getattr(objective.snapshot, "__qualname__", "").startswith("Objective.__post_init__")
    )


def _loss_code(objective: Objective) -> Any:
    return getattr(objective.loss, "__code__", type(objective.loss))


def _signature(objective: Objective) -> dict[str, dict[str, tuple]]:
    module = objective.module
    trained = {id(p) for p in objective.params}
    return {
        "parameters": {n: (tuple(p.shape), p.dtype, p.device) for n, p in module.named_parameters()},
        "buffers": {n: (tuple(b.shape), b.dtype, b.device) for n, b in module.named_buffers()},
        "trained parameters": {n: () for n, p in module.named_parameters() if id(p) in trained},
    }


def _data_reason(lead: Objective, datas: Sequence[StageData], k: int) -> str | None:
    if len(datas) != k:
        return f"{len(datas)} data sets for {k} objectives"
    for name in lead.streams:
        splits = [_stream(data, name) for data in datas]
        first = splits[0]
        for i, split in enumerate(splits[1:], start=1):
            if split.x.shape != first.x.shape or split.x.dtype != first.x.dtype:
                return (
                    f"stream {name!r} of data set {i} has inputs {tuple(split.x.shape)} {split.x.dtype}, "
                    f"data set 0's {tuple(first.x.shape)} {first.x.dtype} (packs need equal budgets)"
                )
            if sorted(split.labels) != sorted(first.labels):
                return (
                    f"stream {name!r} of data set {i} has label sets {sorted(split.labels)}, "
                    f"data set 0's {sorted(first.labels)}"
                )
    return None


# --- the packed loop ----------------------------------------------------------------------------


def fit_packed(
    objectives: list[Objective],
    datas: list[StageData],
    cfg: TrainConfig,
    generators: list[torch.Generator],
    *,
    mixed_precision: bool = False,
) -> list[TrainResult | BaseException]:
    """Train each objective as `fit(objectives[k], datas[k], cfg, generators[k])` would, all as one
    vectorised model (see the module doc). Returns, per objective, its `TrainResult`, or the
    `NonFiniteLoss` that `fit` would have raised. Raises `NotPackable` (before any training, and
    before drawing from any generator) when the objectives do not pack.
    """
    reason = packable(objectives, datas)
    if reason is None and len(generators) != len(objectives):
        reason = f"{len(generators)} generators for {len(objectives)} objectives"
    if reason is not None:
        raise NotPackable(reason)
    for objective in objectives:
        check_selectable(cfg, objective)
    feed = _Feed()
    with _own_dropout(objectives[0].module, feed):
        return _fit_packed(objectives, datas, cfg, generators, mixed_precision, feed)


@dataclasses.dataclass
class _Member:
    """One model of the pack: its place in the caller's list and what `fit` keeps for it."""

    index: int
    objective: Objective
    gens: dict[str, torch.Generator]
    dropout: torch.Generator | None  # its masks' stream (None until drawn: after the probe)
    queues: dict[str, list[torch.Tensor]]
    best: tuple[float, int, Any]  # (score, epoch, snapshot) of the kept epoch
    best_key: float = -math.inf  # its value of `cfg.select`, as higher-is-better
    stale: int = 0
    history: list[float] = dataclasses.field(default_factory=list)
    measured: list[dict[str, float]] = dataclasses.field(default_factory=list)


class _LossCall(nn.Module):
    """The lead objective's loss as a module call, so `functional_call` can swap its module's tensors."""

    def __init__(self, objective: Objective):
        super().__init__()
        self.module = objective.module
        self._loss = objective.loss

    def forward(self, batch: dict[str, Split], step: int) -> tuple[torch.Tensor, Measurements]:
        return self._loss(batch, step)


class _Pack:
    """The stacked tensors of the live models (dim 0: one row per model) and their optimiser."""

    def __init__(self, objectives: list[Objective], cfg: TrainConfig):
        lead = objectives[0].module
        trained = {id(p) for p in objectives[0].params}
        self.trained = [n for n, p in lead.named_parameters() if id(p) in trained]
        self.frozen = [n for n, p in lead.named_parameters() if id(p) not in trained]
        self.buffers = [n for n, _ in lead.named_buffers()]
        params = [dict(o.module.named_parameters()) for o in objectives]
        buffers = [dict(o.module.named_buffers()) for o in objectives]
        with torch.no_grad():
            self.tensors = {n: torch.stack([p[n] for p in params]) for n in self.trained + self.frozen}
            self.tensors.update({n: torch.stack([b[n] for b in buffers]) for n in self.buffers})
        for n in self.trained:
            self.tensors[n].requires_grad_(True)
        self.cfg = cfg
        self.opt = self._optimizer()

    def _optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        params = [self.tensors[n] for n in self.trained]
        lr = self.cfg.lr if lr is None else lr
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay, foreach=True)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the models at `rows` (their optimiser state with them)."""
        old = {n: self.tensors[n] for n in self.trained}
        states = {n: self.opt.state.get(p, {}) for n, p in old.items()}
        with torch.no_grad():
            for n, t in self.tensors.items():
                self.tensors[n] = t.detach()[rows].requires_grad_(n in old)
        self.opt = self._optimizer(lr=self.opt.param_groups[0]["lr"])  # the schedule's, if any
        for n, state in states.items():
            # exp_avg / exp_avg_sq are per model; `step` is one count, shared while all step together.
            self.opt.state[self.tensors[n]] = {
                key: value[rows] if torch.is_tensor(value) and value.ndim > 0 else value for key, value in state.items()
            }

    @torch.no_grad()
    def write(self, row: int, module: nn.Module) -> None:
        """Copy model `row`'s parameters and buffers into `module`."""
        for n, p in module.named_parameters():
            p.copy_(self.tensors[n][row])
        for n, b in module.named_buffers():
            b.copy_(self.tensors[n][row])


def _fit_packed(objectives, datas, cfg, generators, mixed_precision, feed) -> list[TrainResult | BaseException]:
    lead = objectives[0]
    device = _device_of(lead.module)
    streams = lead.streams
    first, others = streams[0], streams[1:]
    # (K, N, ...) inputs and labels of every stream, so a step gathers the K batches in one index.
    xs = {name: torch.stack([_stream(d, name).x for d in datas]).to(device) for name in streams}
    labels = {
        name: {y: torch.stack([_stream(d, name).labels[y] for d in datas]).to(device) for y in ys}
        for name, ys in ((name, _stream(datas[0], name).labels) for name in streams)
    }
    sizes = {name: xs[name].shape[1] for name in streams}
    members = [
        _Member(
            index=k,
            objective=o,
            gens={
                name: generators[k] if name == first else _derived(generators[k], f"stream:{name}") for name in streams
            },
            dropout=None,
            queues={name: [] for name in others},
            best=(-math.inf, 0, o.snapshot()),
        )
        for k, o in enumerate(objectives)
    ]
    pack = _Pack(objectives, cfg)
    step_fn = _stepper(lead, mixed_precision, feed)
    # Before any generator is drawn from: the dropout sites at every batch shape a step can have (a
    # full or a last, partial batch of each stream), and a loss that draws random numbers past the
    # stand-ins refused.
    lengths = [sorted({min(cfg.batch_size, sizes[n]), sizes[n] % cfg.batch_size} - {0}) for n in streams]
    for combination in itertools.product(*lengths):
        rows = {name: torch.arange(length) for name, length in zip(streams, combination, strict=True)}
        step_fn.sites(pack, {n: xs[n][:, rows[n]] for n in streams}, _labels_at(labels, rows), 0, refuse=True)
    for m in members:
        if lead.global_rng:  # as `fit`: one draw from the generator, before its shuffling, seeds dropout
            seed = int(torch.randint(2**62, (1,), generator=m.gens[first]))
        else:
            seed = stage_seed(generators[m.index].initial_seed(), "dropout")
        m.dropout = torch.Generator(device=device).manual_seed(seed)
    results: list[TrainResult | BaseException | None] = [None] * len(objectives)
    epoch = steps = 0
    # Supervision: its stop request, and its checkpointer (epoch reports are not sent for a pack).
    supervision = _SUPERVISION.get()
    run = _Run(supervision, *supervision.claim()) if supervision is not None else None
    checkpointer = supervision.checkpointer if supervision is not None else None
    saved = checkpointer.load(run.slot) if checkpointer is not None else None
    if saved is not None:
        members, epoch, steps = _resume(saved, members, results, pack, cfg, streams, device)
    # As `fit`: the schedule runs over the maximum number of steps, whether or not a model stops early.
    schedule = lr_schedule(cfg, cfg.epochs * math.ceil(sizes[first] / cfg.batch_size))
    if schedule is not None:
        _set_lr(pack.opt, schedule(steps))

    while members:
        epoch += 1
        for m in members:
            m.objective.module.train(lead.train_mode)
        rows = torch.tensor([m.index for m in members], device=device)[:, None]  # (A, 1)
        plans = [batches(sizes[first], cfg.batch_size, m.gens[first]) for m in members]
        sums: dict[str, torch.Tensor] = {}
        reported: dict[str, int] = {}
        loss_sum = torch.zeros(len(members), device=device)
        for j in range(len(plans[0])):
            idx = {first: torch.stack([plan[j] for plan in plans]).to(device)}  # (A, B)
            for name in others:
                for m in members:
                    if not m.queues[name]:
                        m.queues[name] = batches(sizes[name], cfg.batch_size, m.gens[name])
                idx[name] = torch.stack([m.queues[name].pop(0) for m in members]).to(device)
            x = {name: xs[name][rows, idx[name]] for name in streams}
            y = {name: {key: t[rows, idx[name]] for key, t in labels[name].items()} for name in streams}
            masks = _draw(step_fn.sites(pack, x, y, steps), [m.dropout for m in members], device)
            loss, measurements = step_fn(pack, x, y, steps, masks)
            loss_sum += loss.detach()
            for key, value in measurements.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
                reported[key] = reported.get(key, 0) + 1
            steps += 1
            if schedule is not None:
                _set_lr(pack.opt, schedule(steps))  # the next step's (0 after the last)
        # Checked once per epoch, as in `fit`.
        totals = loss_sum.tolist()
        sums_of = {key: value.tolist() for key, value in sums.items()}
        staying = []
        for row, (m, total) in enumerate(zip(members, totals, strict=True)):
            pack.write(row, m.objective.module)
            if not math.isfinite(total):
                results[m.index] = NonFiniteLoss(f"training loss became {total} in epoch {epoch}")
                continue
            measured = {key: s[row] / reported[key] for key, s in sums_of.items()}
            if _epoch_end(m, cfg, epoch, measured, pack.opt.param_groups[0]["lr"] if schedule else None):
                m.objective.restore(m.best[2])
                results[m.index] = TrainResult(
                    best_val_acc=m.best[0],
                    best_epoch=m.best[1],
                    epochs_run=epoch,
                    steps=steps,
                    history=m.history,
                    measurements=m.measured,
                )
            else:
                staying.append(row)
        if len(staying) < len(members):
            members = [members[row] for row in staying]
            if members:
                pack.keep(torch.tensor(staying, device=device))
        if members and run is not None:
            stop = supervision.should_stop is not None and supervision.should_stop()
            if checkpointer is not None and (stop or checkpointer.due()):
                checkpointer.save(run.slot, _state(objectives, members, results, pack, cfg, epoch, steps))
            if stop:
                kept = "checkpointed" if checkpointer is not None else "not checkpointed"
                raise Interrupted(f"a pack of {len(objectives)} stopped on request after epoch {epoch} ({kept})")
    return results


# --- checkpoints: a pack's whole state, so that a stopped pack resumes bit for bit ---------------


def _state(objectives, members: list[_Member], results, pack: _Pack, cfg: TrainConfig, epoch: int, steps: int):
    """Everything of a pack that changes from epoch to epoch: the live models' stacked tensors and
    optimiser, each live model's streams, dropout generator and selection state, and each finished
    model's result and module (its kept epoch)."""
    done = {}
    for k, result in enumerate(results):
        if isinstance(result, TrainResult):
            done[k] = {"result": dataclasses.asdict(result), "module": objectives[k].module.state_dict()}
        elif result is not None:
            done[k] = {"error": str(result)}
    return {
        "config": cfg.model_dump(),
        "models": len(objectives),
        "streams": list(objectives[0].streams),
        "epoch": epoch,
        "steps": steps,
        "tensors": {n: t.detach() for n, t in pack.tensors.items()},
        "optimizer": pack.opt.state_dict(),
        "live": [
            {
                "index": m.index,
                "generators": {name: gen.get_state() for name, gen in m.gens.items()},
                "dropout": m.dropout.get_state(),
                "queues": m.queues,
                "best": list(m.best),
                "best_key": m.best_key,
                "stale": m.stale,
                "history": m.history,
                "measurements": m.measured,
            }
            for m in members
        ],
        "done": done,
    }


def _resume(saved, members: list[_Member], results, pack: _Pack, cfg: TrainConfig, streams, device):
    """Load `_state`'s `saved` into a pack just built for the same objectives: (live members, epoch, steps)."""
    if saved["config"] != cfg.model_dump() or saved["models"] != len(members) or saved["streams"] != list(streams):
        raise ValueError(
            "a checkpoint of another packed training run was found in this run's slot (saved for "
            f"{saved['models']} models, {saved['config']} on streams {saved['streams']}); delete it to start afresh"
        )
    for k, done in saved["done"].items():
        k = int(k)
        if "error" in done:
            results[k] = NonFiniteLoss(done["error"])
        else:
            members[k].objective.module.load_state_dict(done["module"])
            results[k] = TrainResult(**done["result"])
    live = []
    for entry in saved["live"]:
        m = members[entry["index"]]
        for name, gen in m.gens.items():
            gen.set_state(entry["generators"][name])
        m.dropout.set_state(entry["dropout"])
        m.queues = {name: list(pending) for name, pending in entry["queues"].items()}
        m.best, m.best_key, m.stale = tuple(entry["best"]), entry["best_key"], entry["stale"]
        m.history, m.measured = list(entry["history"]), list(entry["measurements"])
        live.append(m)
    pack.keep(torch.tensor([m.index for m in live], device=device))
    with torch.no_grad():
        for name, tensor in pack.tensors.items():
            tensor.copy_(saved["tensors"][name])
    pack.opt.load_state_dict(saved["optimizer"])
    for row, m in enumerate(live):
        pack.write(row, m.objective.module)
    return live, saved["epoch"], saved["steps"]


def _labels_at(labels: dict[str, Labels], rows: dict[str, torch.Tensor]) -> dict[str, Labels]:
    return {name: {key: t[:, rows[name]] for key, t in ys.items()} for name, ys in labels.items()}


_VMAP_RANDOMNESS = "called random operation while in randomness error mode"


class _stepper:
    """One optimiser step of a pack: `step_fn(pack, x, y, step, masks) -> (losses (K,), measurements)`,
    x and y holding each stream's (K, B, ...) batch, `masks` each dropout site's (K, ...) mask in the
    order the forward applies them (`sites`, then `_draw`)."""

    def __init__(self, lead: Objective, mixed_precision: bool, feed: _Feed):
        self.lead, self.mixed_precision, self.feed = lead, mixed_precision, feed
        self.call = _LossCall(lead)
        self._sites: dict[tuple, list[tuple[tuple[int, ...], float]]] = {}

    def _losses(self, tensors: dict[str, torch.Tensor], x, y, masks: list[torch.Tensor], step: int):
        # One model: its tensors (no leading K), its batch of each stream, its dropout masks.
        batch = {name: Split(x[name], y[name]) for name in self.lead.streams}
        self.feed.start(masks)
        try:
            out = functional_call(self.call, {f"module.{n}": t for n, t in tensors.items()}, (batch, step), strict=True)
            self.feed.finish()
        finally:
            self.feed.stop()
        return out

    def _vmapped(self, tensors, x, y, masks, step):
        # The math kernel batches under vmap; CPU's fused attention would run once per model.
        with autocast(self.lead.module, self.mixed_precision), sdpa_kernel([SDPBackend.MATH]):
            return vmap(self._losses, in_dims=(0, 0, 0, 0, None), randomness="error")(tensors, x, y, masks, step)

    def sites(self, pack: _Pack, x, y, step: int, refuse: bool = False) -> list[tuple[tuple[int, ...], float]]:
        """The dropout sites (shape, p) of one model's forward on batches shaped like `x`'s, in the
        order it applies them (recorded once per batch shape by a forward of a copy of the first
        model, without gradients: batch-norm statistics of the pack are not touched). If that forward
        draws random numbers any other way: `NotPackable` with `refuse` (before training), else
        RuntimeError (a pack cannot fall back once it has trained)."""
        key = tuple((name, tuple(t.shape[1:])) for name, t in x.items())
        if key not in self._sites:
            first = lambda t: t[:1].clone()  # noqa: E731
            self.feed.recording = True
            try:
                with torch.no_grad():
                    self._vmapped(tree_map(first, pack.tensors), tree_map(first, x), tree_map(first, y), [], step)
            except RuntimeError as error:
                if _VMAP_RANDOMNESS not in str(error):
                    raise
                reason = (
                    "its loss draws random numbers other than through nn.Dropout modules, so the models of a "
                    f"pack could not each have their own stream ({str(error).splitlines()[0]})"
                )
                raise (NotPackable(reason) if refuse else RuntimeError(reason)) from error
            finally:
                self.feed.recording = False
            self._sites[key] = self.feed.recorded
        return self._sites[key]

    def __call__(self, pack: _Pack, x, y, step: int, masks: list[torch.Tensor]):
        loss, measurements = self._vmapped(pack.tensors, x, y, masks, step)
        pack.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        pack.opt.step()
        return loss, measurements


# --- dropout: every model its own stream ------------------------------------------------------


class _Feed:
    """What the stand-ins for the lead module's `nn.Dropout`s read during one forward: each site's
    mask in call order (this model's slice, under vmap), or while `recording`, a record of each
    site's (shape, p) that leaves its input as it is."""

    def __init__(self):
        self.masks: list[torch.Tensor] = []
        self.at = 0
        self.recording = False
        self.recorded: list[tuple[tuple[int, ...], float]] = []

    def start(self, masks: list[torch.Tensor]) -> None:
        self.masks, self.at = masks, 0
        if self.recording:
            self.recorded = []

    def apply(self, p: float, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.recorded.append((tuple(x.shape), p))
            return x
        if self.at >= len(self.masks):
            raise RuntimeError(f"the forward applied more dropout than the {len(self.masks)} sites recorded for it")
        mask = self.masks[self.at]
        self.at += 1
        if mask.shape != x.shape:
            got, drawn = tuple(x.shape), tuple(mask.shape)
            raise RuntimeError(f"dropout site {self.at - 1} got a {got} input, its mask was drawn {drawn}")
        # As F.dropout: x times a noise tensor of x's dtype holding 0 or 1 / (1 - p).
        return x * mask.to(x.dtype).div_(1 - p)

    def finish(self) -> None:
        if not self.recording and self.at != len(self.masks):
            raise RuntimeError(f"the forward applied {self.at} of the {len(self.masks)} dropout sites recorded for it")

    def stop(self) -> None:
        self.masks = []


class _StandIn(nn.Module):
    """In place of an `nn.Dropout` of the lead module during a packed run: the feed's mask for it."""

    def __init__(self, p: float, feed: _Feed):
        super().__init__()
        self.p = p
        self._feed = (feed,)  # a tuple, not a submodule or state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return self._feed[0].apply(self.p, x)


@contextlib.contextmanager
def _own_dropout(module: nn.Module, feed: _Feed):
    """Every `nn.Dropout` of `module` stood in for by a `_StandIn` reading `feed` (and fused dropout
    routed through modules, `dropout_through_modules`); put back afterwards, in the mode they are in."""
    swapped = []
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                stand_in = _StandIn(child.p, feed).train(child.training)
                setattr(parent, name, stand_in)
                swapped.append((parent, name, child, stand_in))
    try:
        with dropout_through_modules():
            yield
    finally:
        for parent, name, child, stand_in in swapped:
            setattr(parent, name, child.train(stand_in.training))


def _draw(sites, generators: list[torch.Generator], device: torch.device) -> list[torch.Tensor]:
    """Each site's (K, ...) boolean mask (kept: True), row k from generator k: a model's masks depend
    on its own generator only, not on the other models of the pack. Drawn as F.dropout draws on CPU
    (`bernoulli_` into a float32 tensor), so a model gets its serial run's masks there."""
    return [
        torch.stack([torch.empty(shape, device=device).bernoulli_(1 - p, generator=g).bool() for g in generators])
        for shape, p in sites
    ]


# --- calibration: how many models to pack ------------------------------------------------


@dataclasses.dataclass
class Calibration:
    """What `calibrate` measured: model-steps/s at each pack size tried, the peak memory per model
    where the device reports it, why it stopped doubling, and the chosen K."""

    k: int
    rates: dict[int, float]
    bytes_per_model: float | None
    stopped: str


def calibrate(
    objective: Objective,
    data: StageData,
    cfg: TrainConfig,
    k_max: int,
    *,
    min_steps: int = 5,
    min_seconds: float = 0.2,
    min_gain: float = 1.1,
    headroom: float = 0.8,
    memory_fraction: float = 1.0,
    mixed_precision: bool = False,
    clock=None,
) -> Calibration:
    """The pack size for models like `objective`'s: K copies of its model (its current tensors,
    copied: the model itself is not touched) train on the first batch of each stream at K = 1, 2,
    4, ... up to `k_max`, each K for at least `min_steps` steps and `min_seconds` after a warm-up
    step. Doubling stops where model-steps/s gain less than `min_gain` times, where the next
    doubling would not fit in `headroom` of the memory this process may use (CUDA: the smaller of
    the device's free memory and `memory_fraction` of its total less what this process holds), or
    at an out-of-memory error (that K is not used). What one model needs is measured (the peak of
    its step) plus what a pack holds per model besides: its copy of every stream's data, and a
    snapshot of its parameters and buffers. Returns the smallest K within 2% of the most
    model-steps/s. No generator of the caller's and no global RNG stream is drawn from (dropout
    masks come from generators of its own)."""
    import time

    clock = clock or time.perf_counter
    device = _device_of(objective.module)
    cuda = device.type == "cuda"
    streams = objective.streams
    feed = _Feed()
    step_fn = _stepper(objective, mixed_precision, feed)
    first = {name: _stream(data, name) for name in streams}
    idx = {name: torch.arange(min(cfg.batch_size, len(split))) for name, split in first.items()}
    held = sum(t.numel() * t.element_size() for name in streams for t in (first[name].x, *first[name].labels.values()))
    held += sum(t.numel() * t.element_size() for t in (*objective.module.parameters(), *objective.module.buffers()))
    rates: dict[int, float] = {}
    per_model: float | None = None
    stopped = f"reached k_max = {k_max}"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with torch.random.fork_rng(devices=[device] if cuda else []), _own_dropout(objective.module, feed):
        k = 1
        while k <= k_max:
            try:
                if cuda:
                    sync()
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                pack = _Pack([objective] * k, cfg)
                x = {n: first[n].x[idx[n]].to(device).repeat(k, *[1] * first[n].x.ndim) for n in streams}
                y = {
                    n: {key: t[idx[n]].to(device).repeat(k, *[1] * t.ndim) for key, t in first[n].labels.items()}
                    for n in streams
                }
                sites = step_fn.sites(pack, x, y, 0)
                gens = [torch.Generator(device=device).manual_seed(i) for i in range(k)]
                step_fn(pack, x, y, 0, _draw(sites, gens, device))  # warm-up: kernels chosen, optimiser state allocated
                sync()
                start, done = clock(), 0
                while done < min_steps or clock() - start < min_seconds:
                    done += 1
                    step_fn(pack, x, y, done, _draw(sites, gens, device))
                    sync()
                elapsed = max(clock() - start, 1e-9)
            except torch.cuda.OutOfMemoryError:
                stopped = f"out of memory at K = {k}"
                break
            finally:
                pack = x = y = None
                if cuda:
                    torch.cuda.empty_cache()
            rates[k] = k * done / elapsed
            if cuda:
                per_model = (torch.cuda.max_memory_allocated(device) - base) / k + held
                free, total = torch.cuda.mem_get_info(device)
                allowed = min(free, memory_fraction * total - torch.cuda.memory_reserved(device))
                if 2 * k <= k_max and per_model * 2 * k > headroom * allowed:
                    stopped = f"memory: {2 * k} models would need more than {headroom:.0%} of what this process may use"
                    break
            if k > 1 and rates[k] < min_gain * rates[k // 2]:
                stopped = f"K = {k} gained less than {min_gain}x over K = {k // 2}"
                break
            k *= 2
    if not rates:
        return Calibration(1, rates, per_model, stopped)
    best = max(rates.values())
    chosen = min(k for k, r in rates.items() if r >= best / 1.02)  # the smallest K within 2% of the fastest
    return Calibration(chosen, rates, per_model, stopped)


def _epoch_end(m: _Member, cfg: TrainConfig, epoch: int, row: dict[str, float], lr: float | None) -> bool:
    """As `fit` at an epoch end: score model `m` (its module holds this epoch's weights), keep its
    best epoch by `cfg.select`; whether it is done."""
    score = m.objective.score()
    key = selection_key(cfg, m.objective, score, row)
    if lr is not None:
        row["lr"] = lr
    m.history.append(score)
    m.measured.append(row)
    if improves(cfg, key, m.best_key):
        m.best, m.best_key, m.stale = (score, epoch, m.objective.snapshot()), key, 0
    else:
        m.stale += 1
    return (
        epoch >= cfg.epochs
        or (cfg.target_val_acc is not None and score >= cfg.target_val_acc)
        or (cfg.patience is not None and m.stale >= cfg.patience)
    )
