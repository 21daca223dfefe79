"""Subnetwork discovery (METHOD.md, stage 2): a registry of discoverers, each an objective of the
shared training loop (or, for magnitude pruning, no training at all).

`continuous_sparsification` (the paper's): one score s per masked weight, initialised to -0.1. The
soft mask sigmoid(T * s) multiplies the frozen source weights; the loss is cross-entropy on the
subtask plus lambda * sum(sigmoid(T * s)), an L0 surrogate. T starts at 1 and is multiplied by
final_temperature ** (1 / epochs) after each epoch. After every epoch the hard mask at the requested
sparsity (the top (1 - sparsity) scores) is scored on the subtask's validation split; the best
epoch's mask is kept (`ties`: the first or the last of equal accuracies). Training never reads the
sparsity, so one run serves several (`discover_many`): after each epoch the same scores are ranked
at each requested sparsity, each keeping its own best epoch, bit for bit as a run for it alone. The
scores train with AdamW at `weight_decay` (the paper's code: AdamW's default 0.01; ours defaults to
0). The cross-entropy term is the model's own loss where it has one (`task.loss: all_positions`).
Every discoverer hits the requested sparsity exactly by ranking.

`hard_concrete` (Louizos et al.'s L0 gates) lives in methods/hard_concrete.py, `magnitude` below.
A new discoverer is one function `(model, data, cfg, sparsities, generator, mixed_precision) ->
list[Discovery]` (one per sparsity, in order) under `@DISCOVERERS.register(name)`; a discoverer
whose training depends on the sparsity runs once per sparsity inside that function.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from common.config import Frozen, declare_block
from common.registry import Registry
from methods.masking import (
    Mask,
    MaskedModel,
    MaskSelection,
    ScoreMask,
    density,
    maskable_names,
    topk_mask,
)
from methods.training import Objective, TrainConfig, evaluate, fit
from tasks.base import StageData

DISCOVERERS = Registry("discovery method")


@declare_block("discovery")
class DiscoveryConfig(Frozen):
    """The `discovery:` block, read by the mask kind (`blocks=("discovery",)`)."""

    method: str = Field("continuous_sparsification", description="a registered discoverer")
    epochs: int = Field(50, ge=1)
    batch_size: int = Field(500, ge=1)
    lr: float = Field(1e-3, gt=0)
    l0_lambda: float = Field(1e-7, ge=0, json_schema_extra={"tune": (1e-8, 1e-5)})  # `instill tune`'s default range
    init_score: float = -0.1
    final_temperature: float = Field(100.0, ge=1)
    selection: MaskSelection = MaskSelection()
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the scores (the paper's code: 0.01)")
    ties: Literal["first", "last"] = Field(
        "first", description="of epochs with equal subtask accuracy, keep the first or the last (the paper's code)"
    )
    # Hard concrete (methods/hard_concrete.py; Louizos, Welling, Kingma 2018): the paper's
    # temperature and stretch interval.
    hc_beta: float = Field(2 / 3, gt=0, description="hard concrete temperature beta")
    hc_stretch: tuple[float, float] = Field(
        (-0.1, 1.1), description="hard concrete stretch (gamma, zeta), gamma < 0 and zeta > 1"
    )
    # -1 follows continuous sparsification's init_score: every gate starts a little more closed than
    # open. Mostly open gates fail: a gate clamped at 1 gets no gradient, so no ranking forms.
    hc_init_log_alpha: float = Field(-1.0, description="initial log_alpha of every hard concrete gate")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DISCOVERERS:
            raise ValueError(f"unknown discovery method {v!r}; valid names: {', '.join(DISCOVERERS.names())}")
        return v

    @field_validator("hc_stretch")
    @classmethod
    def _stretch(cls, v: tuple[float, float]) -> tuple[float, float]:
        gamma, zeta = v
        if not (gamma < 0.0 and zeta > 1.0):
            raise ValueError(f"hc_stretch (gamma, zeta) needs gamma < 0 < 1 < zeta, so gates reach 0 and 1; got {v}")
        return v

    def loop(self) -> TrainConfig:
        """The shared loop's settings for a discoverer that trains scores."""
        return TrainConfig(
            lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size, epochs=self.epochs, ties=self.ties
        )


@dataclasses.dataclass
class Discovery:
    mask: Mask
    subtask_acc: float  # hard-masked model's subtask validation accuracy at the requested sparsity
    density: float
    natural_density: float  # the discoverer's own, uncontrolled mask density at the kept epoch
    best_epoch: int
    history: list[float]


def discover(
    model: nn.Module,
    data: StageData,
    cfg: DiscoveryConfig,
    sparsity: float,
    generator: torch.Generator,
    mixed_precision: bool = False,
) -> Discovery:
    """Find a mask over `model`'s selected weights that keeps the subtask at `sparsity`. The model is
    put in eval mode (dropout and batch-norm statistics off) and its weights are frozen."""
    return discover_many(model, data, cfg, (sparsity,), generator, mixed_precision)[0]


def discover_many(
    model: nn.Module,
    data: StageData,
    cfg: DiscoveryConfig,
    sparsities: tuple[float, ...],
    generator: torch.Generator,
    mixed_precision: bool = False,
) -> list[Discovery]:
    """`discover` at each of `sparsities` from one run of the discoverer: the same results, each
    as its own run would give it, for the cost of one run (plus one evaluation per sparsity and epoch)."""
    sparsities = tuple(float(s) for s in sparsities)
    if not sparsities or len(set(sparsities)) != len(sparsities):
        raise ValueError(f"discover_many needs distinct sparsities, got {sparsities}")
    model.eval().requires_grad_(False)
    found = DISCOVERERS.get(cfg.method)(model, data, cfg, sparsities, generator, mixed_precision)
    if len(found) != len(sparsities):
        raise RuntimeError(f"discoverer {cfg.method!r} returned {len(found)} masks for {len(sparsities)} sparsities")
    return found


@DISCOVERERS.register("magnitude")
def _magnitude(model, data, cfg, sparsities, generator, mixed_precision) -> list[Discovery]:
    params = dict(model.named_parameters())
    magnitudes = {n: params[n].abs() for n in maskable_names(model, cfg.selection)}
    found = []
    for sparsity in sparsities:
        mask = topk_mask(magnitudes, sparsity)
        acc = hard_accuracy(model, mask, data)
        found.append(Discovery(mask, acc, density(mask), density(mask), 0, [acc]))
    return found


class ScoredMasks:
    """Shared by score-based discoverers: after each epoch, rank the scores into the hard mask at
    each requested sparsity, score it on the subtask's validation split, and keep each sparsity's
    best epoch (by `ties`, the rule `fit` applies to its own score, which is the first sparsity's).
    The kept masks and histories are this object's state, so a checkpointed run resumes them."""

    def __init__(
        self,
        model: nn.Module,
        fns: dict[str, nn.Module],
        scores: dict[str, torch.Tensor],
        data,
        sparsities: tuple[float, ...],
        ties: str = "first",
        open_above: float = 0.0,
    ):
        self.model, self.fns, self.scores, self.data = model, fns, scores, data
        self.sparsities, self.ties, self.open_above = tuple(sparsities), ties, open_above
        self.masked = MaskedModel(model, fns).eval()
        self.epoch = 0
        # per sparsity: (accuracy, epoch, mask, natural density) of the kept epoch, and every epoch's accuracy
        self.kept: list[tuple[float, int, Mask | None, float]] = [(-math.inf, 0, None, 0.0) for _ in self.sparsities]
        self.history: list[list[float]] = [[] for _ in self.sparsities]

    def natural(self) -> float:
        """Fraction of scores > `open_above` (default 0): the discoverer's own mask, before ranking."""
        on = sum(int((s > self.open_above).sum()) for s in self.scores.values())
        return on / sum(s.numel() for s in self.scores.values())

    def score(self) -> float:
        self.epoch += 1
        natural = None
        for i, sparsity in enumerate(self.sparsities):
            mask = topk_mask(self.scores, sparsity)
            acc = hard_accuracy(self.model, mask, self.data, self.masked, self.fns)
            self.history[i].append(acc)
            best = self.kept[i][0]
            if acc > best or (self.ties == "last" and acc == best):
                natural = self.natural() if natural is None else natural
                self.kept[i] = (acc, self.epoch, mask, natural)
        return self.history[0][-1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "kept": [list(k) for k in self.kept], "history": [list(h) for h in self.history]}

    def load_state(self, saved: dict) -> None:
        self.epoch = saved["epoch"]
        self.kept = [tuple(k) for k in saved["kept"]]
        self.history = [list(h) for h in saved["history"]]

    def objective(self, loss, end_epoch, state=None, load_state=None) -> Objective:
        """The loop's objective; `state` / `load_state`: the discoverer's own mutable state, for
        checkpoints (see `Objective`), saved beside the kept masks."""

        def both():
            return {"discoverer": state() if state is not None else None, "kept": self.state()}

        def load_both(saved):
            if load_state is not None:
                load_state(saved["discoverer"])
            self.load_state(saved["kept"])

        return Objective(
            loss=loss,
            module=self.masked,
            params=list(self.scores.values()),
            score=self.score,
            train_mode=False,
            global_rng=False,  # eval mode throughout: no dropout, so no draw that would shift the shuffling
            snapshot=lambda: None,  # the kept masks are this object's (one per sparsity)
            restore=lambda _: None,
            initial_candidate=False,  # each sparsity's kept mask is chosen by `score` itself
            end_epoch=end_epoch,
            state=both,
            load_state=load_both,
        )

    def result(self, trained) -> list[Discovery]:
        """One `Discovery` per sparsity, from the run `trained` (whose own pick is the first's)."""
        if trained.best_epoch != self.kept[0][1]:
            raise RuntimeError(f"kept epoch {self.kept[0][1]} disagrees with the loop's {trained.best_epoch}")
        return [
            Discovery(mask, acc, density(mask), natural, epoch, list(history))
            for (acc, epoch, mask, natural), history in zip(self.kept, self.history, strict=True)
        ]


@DISCOVERERS.register("continuous_sparsification")
def _continuous_sparsification(model, data, cfg, sparsities, generator, mixed_precision) -> list[Discovery]:
    params = dict(model.named_parameters())
    names = maskable_names(model, cfg.selection)
    fns = {n: ScoreMask(params[n].shape, cfg.init_score).to(params[n].device) for n in names}
    found = ScoredMasks(model, fns, {n: fns[n].scores for n in names}, data, sparsities, cfg.ties)
    growth = cfg.final_temperature ** (1.0 / cfg.epochs)
    state = {"temperature": 1.0}

    def loss(batch, step):
        t = state["temperature"]
        l0 = sum(torch.sigmoid(t * s).sum() for s in found.scores.values())
        x, y = batch["train"].x, batch["train"].y
        ce = found.masked(x, targets=y)[0] if found.masked.own_loss else F.cross_entropy(found.masked(x), y)
        return ce + cfg.l0_lambda * l0, {"ce": ce, "l0": l0}

    def set_temperature(t: float) -> None:
        state["temperature"] = t
        for fn in fns.values():
            fn.temperature = t

    def end_epoch(epoch):
        set_temperature(state["temperature"] * growth)
        return {"temperature": state["temperature"]}

    objective = found.objective(
        loss, end_epoch, state=lambda: dict(state), load_state=lambda saved: set_temperature(saved["temperature"])
    )
    trained = fit(objective, data, cfg.loop(), generator, mixed_precision=mixed_precision)
    return found.result(trained)


def hard_accuracy(model, mask: Mask, data: StageData, masked=None, fns=None) -> float:
    """Subtask validation accuracy of `model` with `mask` applied (masked weights set to 0)."""
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
