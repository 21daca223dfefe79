"""The vmapped engine: K objectives of one architecture trained as one vectorised model.

`Vmapped` is an engine of the one loop (`methods.training.fit_many`; `fit_packed` is `fit_many`
through it): the K modules' parameters and buffers are stacked along a new leading dimension, the K
losses come from one `torch.vmap` over the first objective's `loss` with its module's tensors
swapped for model k's, and one foreach optimiser (elementwise, so K independent ones) updates them.
Everything else (streams, schedules, selection, early stops, NaN isolation, checkpoints, epoch
reports) is the loop's, as for a model trained alone.

Dropout: the lead module's `nn.Dropout`s are stood in for, and each model's masks are drawn
outside vmap from its own generator, seeded as `fit` seeds the global RNG, site by site in the
order and shapes its forward applies them (recorded once per batch shape). On CPU a model thus gets
its serial run's masks: its losses follow the serial run's within float rounding (batched kernels
sum in another order), and its packed run is bitwise the same whatever else is in the pack
(tests/methods/test_packing.py). On CUDA serial dropout runs fused kernels, so the masks differ there. vmap
runs with `randomness="error"`: a loss that draws random numbers any other way is refused
(`NotPackable`) before any generator is drawn from, as are hooks the engine cannot run (`packable`:
parameters the module does not hold, `end_epoch`, objective state). Attention runs the math kernel
(CPU's fused kernel has no batching rule); buffers that forward updates (batch norm) stay per model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from common.seeding import stage_seed
from methods.training import (
    Compiled,
    CompileSetting,
    Engine,
    EpochObserver,
    NotPackable,
    Objective,
    TrainConfig,
    TrainResult,
    _device_of,
    _loose,
    _LossCall,
    _stream,
    adamw_hyper,
    adamw_moments,
    adamw_rates,
    adamw_update,
    autocast,
    compiled_whole,
    compiles,
    fit_many,
    in_optimizer_order,
    optimizer,
    planned_steps,
    whole_step_refuses,
)
from tasks.base import Split, StageData
from tasks.models.dropout import dropout_through_modules

__all__ = ["NotPackable", "Vmapped", "calibrate", "fit_packed", "packable"]


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
        for what in ("streams", "train_mode", "global_rng", "steps_per_batch", "initial_candidate"):
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
    """Why the vmapped engine cannot run this objective's hooks, naming the hook (None: it can)."""
    if _loose(objective):
        return "updates parameters its module does not hold (`params` beyond the module's)"
    if objective.end_epoch is not None:
        return "has an `end_epoch` hook (it would act on one model's Python state for all)"
    if objective.state is not None:
        return "keeps its own state between epochs (`state` / `load_state`)"
    held = [type(m).__name__ for m in objective.module.modules() if getattr(m, "python_state", False)]
    if held:
        return f"has a module that keeps Python state between steps ({held[0]}.python_state)"
    return None


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


# --- the engine -------------------------------------------------------------------------------


def fit_packed(
    objectives: list[Objective],
    datas: list[StageData],
    cfg: TrainConfig,
    generators: list[torch.Generator],
    *,
    mixed_precision: bool = False,
    observers: Sequence[EpochObserver | None] | None = None,
) -> list[TrainResult | BaseException]:
    """`fit_many` through `Vmapped`: per objective its `TrainResult` or the `NonFiniteLoss` that ended
    it; `NotPackable` (before any training or draw) when the objectives do not pack."""
    return fit_many(objectives, datas, cfg, generators, Vmapped(), mixed_precision=mixed_precision, observers=observers)


class Vmapped(Engine):
    """K models of one architecture stepped as one: stacked tensors, one vmapped loss, one foreach
    optimiser, a dropout stream per model (see the module doc).

    `compile` as `methods.training.Serial`'s (None: the enclosing `compiling(...)` block's): compiled,
    the vmapped loss runs through `torch.compile` (`methods.training.Compiled`: one graph per pack
    size and batch shape, reused by later packs of the same models in the process; eager after a
    warning where compiling fails) and the optimiser is the fused one. Each model's losses then
    follow its eager pack's within float rounding, not bit for bit."""

    def __init__(self, compile: CompileSetting | None = None):
        self.compile = compile

    def refuses(self, objectives, datas):
        return packable(objectives, datas)

    @contextlib.contextmanager
    def running(self, objectives, datas, cfg, mixed_precision):
        lead = objectives[0]
        self.device = device = _device_of(lead.module)
        self.objectives, self.streams = objectives, lead.streams
        self.feed = _Feed()
        with _own_dropout(lead.module, self.feed):
            # (K, N, ...) inputs and labels of every stream, so a step gathers the K batches in one index.
            self.xs = {n: torch.stack([_stream(d, n).x for d in datas]).to(device) for n in self.streams}
            self.labels = {
                n: {y: torch.stack([_stream(d, n).labels[y] for d in datas]).to(device) for y in ys}
                for n, ys in ((n, _stream(datas[0], n).labels) for n in self.streams)
            }
            self.live = list(range(len(objectives)))
            self.compiled = compiles(self.compile, device, planned_steps(cfg, lead, datas[0]))
            self.pack = _Pack(objectives, cfg, fused=True if self.compiled and device.type in ("cpu", "cuda") else None)
            self.step_fn = _stepper(lead, mixed_precision, self.feed, self._eager if self.compiled else None)
            if self.compiled and device.type == "cpu":  # on CUDA not measured yet
                self.step_fn.whole_step(self.pack.opt)
            # Before any generator is drawn from: the dropout sites at every batch shape a step can
            # have (a full or a last, partial batch of each stream); a loss that draws random numbers
            # past the stand-ins is refused.
            sizes = {n: self.xs[n].shape[1] for n in self.streams}
            lengths = [sorted({min(cfg.batch_size, sizes[n]), sizes[n] % cfg.batch_size} - {0}) for n in self.streams]
            for combination in itertools.product(*lengths):
                rows = {n: torch.arange(length) for n, length in zip(self.streams, combination, strict=True)}
                x = {n: self.xs[n][:, rows[n]] for n in self.streams}
                y = {n: {key: t[:, rows[n]] for key, t in ys.items()} for n, ys in self.labels.items()}
                self.step_fn.sites(self.pack, x, y, 0, refuse=True)
            yield self

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.pack.opt

    def _eager(self) -> None:
        """Compiling failed: the rest of the run is the eager engine's, its optimiser's kernels included."""
        self.compiled = False
        self.pack.eager_optimizer()

    def seed(self, seeds, initial):
        self.dropout = [
            torch.Generator(device=self.device).manual_seed(seed if seed is not None else stage_seed(first, "dropout"))
            for seed, first in zip(seeds, initial, strict=True)
        ]

    def step(self, idx, step):
        rows = torch.tensor(self.live, device=self.device)[:, None]  # (A, 1)
        at = {n: torch.stack([i[n] for i in idx]).to(self.device) for n in self.streams}  # (A, B)
        x = {n: self.xs[n][rows, at[n]] for n in self.streams}
        y = {n: {key: t[rows, at[n]] for key, t in self.labels[n].items()} for n in self.streams}
        masks = _draw(self.step_fn.sites(self.pack, x, y, step), [self.dropout[k] for k in self.live], self.device)
        loss, measurements = self.step_fn(self.pack, x, y, step, masks)
        return loss.detach(), {key: v.detach().float() for key, v in measurements.items()}

    def sync(self):
        for row, k in enumerate(self.live):
            self.pack.write(row, self.objectives[k].module)

    def keep(self, rows):
        self.live = [self.live[row] for row in rows] if len(rows) < len(self.live) else self.live
        self.pack.keep(torch.tensor(rows, device=self.device))

    def state(self):
        return {
            "live": list(self.live),
            "tensors": {n: t.detach() for n, t in self.pack.tensors.items()},
            "optimizer": self.pack.opt.state_dict(),
            "dropout": [g.get_state() for g in self.dropout],
        }

    def load(self, state):
        if state["live"] != self.live:
            raise ValueError(f"a pack checkpoint of models {state['live']} loaded into models {self.live}")
        with torch.no_grad():
            for name, tensor in self.pack.tensors.items():
                tensor.copy_(state["tensors"][name])
        self.pack.opt.load_state_dict(state["optimizer"])
        self.pack.kernels()  # a checkpoint of the other engine resumes in this one's kernels
        for g, saved in zip(self.dropout, state["dropout"], strict=True):
            g.set_state(saved)


class _Pack:
    """The stacked tensors of the live models (dim 0: one row per model) and their optimiser."""

    def __init__(self, objectives: list[Objective], cfg: TrainConfig, fused: bool | None = None):
        self.fused = fused  # True: the fused optimiser (compiled packs), None: foreach
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

    def _optimizer(self) -> torch.optim.Optimizer:
        kernels = {"fused": True} if self.fused else {"foreach": True}
        return optimizer([(n, self.tensors[n]) for n in self.trained], self.cfg, **kernels)

    def kernels(self) -> None:
        """The optimiser's kernels as this pack's (`fused`), whatever a loaded state said."""
        for group in self.opt.param_groups:
            group["fused"], group["foreach"] = (True, None) if self.fused else (None, True)

    def eager_optimizer(self) -> None:
        self.fused = None
        self.kernels()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the models at `rows` (their optimiser state with them)."""
        old = {n: self.tensors[n] for n in self.trained}
        states = {n: self.opt.state.get(p, {}) for n, p in old.items()}
        with torch.no_grad():
            for n, t in self.tensors.items():
                self.tensors[n] = t.detach()[rows].requires_grad_(n in old)
        lrs = [group["lr"] for group in self.opt.param_groups]  # the schedule's, if any
        self.opt = self._optimizer()
        for group, lr in zip(self.opt.param_groups, lrs, strict=True):
            group["lr"] = lr
        for n, state in states.items():
            # Moments and momentum buffers are per model; `step` is one count, shared while all step together.
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


_VMAP_RANDOMNESS = "called random operation while in randomness error mode"


class _stepper:
    """One optimiser step of a pack: `step_fn(pack, x, y, step, masks) -> (losses (K,), measurements)`,
    x and y holding each stream's (K, B, ...) batch, `masks` each dropout site's (K, ...) mask in the
    order the forward applies them (`sites`, then `_draw`)."""

    def __init__(
        self, lead: Objective, mixed_precision: bool, feed: _Feed, on_fallback: Callable[[], None] | None = None
    ):
        self.lead, self.mixed_precision, self.feed = lead, mixed_precision, feed
        self.call = _LossCall(lead.module, lead.loss)
        self._sites: dict[tuple, list[tuple[tuple[int, ...], float]]] = {}
        # on_fallback given: the vmapped loss through `methods.training.Compiled` (which calls it if
        # compiling fails); None: eager.
        self._run = self._vmapped if on_fallback is None else Compiled(self._vmapped, on_fallback)
        self.whole: Compiled | None = None  # `whole(opt)` turns it on

    def whole_step(self, opt: torch.optim.Optimizer) -> None:
        """Compiled, on CPU, where the lead objective allows it (`whole_step_refuses`): every model's
        forward, backward and AdamW update as one graph (`_whole`); if that fails to compile, the
        compiled vmapped loss and the fused optimiser after a warning, for the rest of the process."""
        if whole_step_refuses(self.lead, opt, []) is None:
            self.whole = compiled_whole(
                self._whole, self.lead, self._loss_only, lambda *args: self._loss_step(self.pack, *args[-4:])
            )
            self.lrs = [torch.tensor(0.0) for _ in opt.param_groups]

    def _loss_only(self) -> None:
        self.whole = None

    def _whole(self, names, trained, rest, moments, lrs, hyper, x, y, step, masks):
        """Each model's gradient (`torch.func.grad` under the vmap) and AdamW's update of the stacked
        tensors (elementwise, so each model's own) in one function: `methods.training.whole_step` for a pack."""

        def one(trained, rest, x, y, masks):
            losses, measurements = self._losses({**dict(zip(names, trained, strict=True)), **rest}, x, y, masks, step)
            return losses, (losses.detach(), {key: v.detach() for key, v in measurements.items()})

        with autocast(self.lead.module, self.mixed_precision), sdpa_kernel([SDPBackend.MATH]):
            grads, (losses, measurements) = vmap(torch.func.grad(one, has_aux=True), randomness="error")(
                trained, rest, x, y, masks
            )
        adamw_update(trained, grads, moments, lrs, hyper)
        return losses, measurements

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
        if self.whole is None:
            return self._loss_step(pack, x, y, step, masks)
        self.pack = pack  # for a fallback's `instead`
        opt = pack.opt  # (a new one after `keep`: the moments are looked up every step)
        names, trained = in_optimizer_order(opt, {id(pack.tensors[n]): n for n in pack.trained})
        rest = {n: t for n, t in pack.tensors.items() if n not in pack.trained}  # frozen tensors and buffers
        moments, lrs = adamw_moments(opt), adamw_rates(opt, self.lrs)
        return self.whole(names, trained, rest, moments, lrs, adamw_hyper(opt), x, y, step, masks)

    def _loss_step(self, pack: _Pack, x, y, step: int, masks: list[torch.Tensor]):
        loss, measurements = self._run(pack.tensors, x, y, masks, step)
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
