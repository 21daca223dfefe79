"""Hard concrete discovery (Louizos, Welling, Kingma 2018, "Learning sparse neural networks
through L0 regularization"): an alternative to continuous sparsification (METHOD.md, stage 2).

One gate per masked weight, parametrised by `log_alpha`. Each training step draws one
u ~ U(0, 1) per weight, from a generator of its own (seeded from the discovery generator's seed, so
the batch shuffling stream is the one every other discoverer sees), and gates the frozen weight
with

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),   z = clamp(s * (zeta - gamma) + gamma, 0, 1)

(beta = 2/3, (gamma, zeta) = (-0.1, 1.1) by default, the paper's values). The stretch past [0, 1]
and the clamp give every gate a finite probability of being exactly 0 or exactly 1. The loss is
cross-entropy on the subtask plus `l0_lambda` times the expected number of open gates,
sum(sigmoid(log_alpha - beta * log(-gamma / zeta))) (the paper's L0 complexity term).

At evaluation the log_alphas are ranked like continuous sparsification's scores (`ScoredMasks`):
the hard mask keeps the top (1 - sparsity), so the requested sparsity is hit exactly, and the epoch
whose hard-masked model has the best subtask validation accuracy is kept.

Natural density: the fraction of gates with E[z] > 1/2 at the kept epoch, i.e. of log_alphas above
`half_open_log_alpha` (0 for a stretch symmetric about 1/2, such as the default).

Learning rate: a sweep choosing this discoverer should set `discovery.lr` for it, about 0.1 (no
temperature multiplies the log_alphas' steps, as continuous sparsification's T does its scores').

Departures from the paper: the paper trains the weights together with the gates, from scratch;
here, as in every discoverer, the source's weights are frozen and only the gates train. Its mask is
whatever lambda leaves open; here the ranking sets the sparsity and lambda only shapes the ranking.
Its code draws the initial log_alphas from N(init, 0.01); here they all start at `hc_init_log_alpha`
(the noise breaks the symmetry from the first step on).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.seeding import stage_seed
from methods.discovery import DISCOVERERS, Discovery, ScoredMasks
from methods.masking import maskable_names
from methods.training import fit

_EPS = 1e-6  # u is kept in [eps, 1 - eps], so log u - log(1 - u) stays finite (the paper's code does the same)


class HardConcreteGate(nn.Module):
    """Effective weight `weight * z`: a hard concrete sample z while `noise` is set (training), a
    fixed 0/1 mask while `hard` is set (evaluation), else the paper's test-time estimate
    clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)."""

    def __init__(self, shape: Iterable[int], init: float, beta: float, stretch: tuple[float, float]):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(tuple(shape), float(init)))
        self.beta = float(beta)
        self.gamma, self.zeta = (float(v) for v in stretch)
        self.noise: torch.Tensor | None = None  # u, shaped like the weight: one draw per training step
        self.hard: torch.Tensor | None = None

    def gate(self) -> torch.Tensor:
        if self.noise is None:
            s = torch.sigmoid(self.log_alpha)
        else:
            s = torch.sigmoid((torch.logit(self.noise, eps=_EPS) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.hard is not None:
            return weight * self.hard.to(weight.dtype)
        return weight * self.gate().to(weight.dtype)


def expected_open(log_alpha: torch.Tensor, beta: float, stretch: tuple[float, float]) -> torch.Tensor:
    """P(z != 0) per gate, the L0 penalty's summand: sigmoid(log_alpha - beta * log(-gamma / zeta))."""
    gamma, zeta = stretch
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def expected_gate(log_alpha: float, beta: float, stretch: tuple[float, float], points: int = 64) -> float:
    """E[z] of one gate, by Gauss-Legendre quadrature of E[z] = int_0^1 P(z > x) dx, where
    P(z > x) = sigmoid(log_alpha - beta * logit((x - gamma) / (zeta - gamma))) for x in (0, 1).
    The integrand is smooth on [0, 1] (the stretch keeps the logit's argument inside (0, 1))."""
    gamma, zeta = stretch
    nodes, weights = _legendre(points)
    x = (nodes + 1.0) / 2.0
    t = (x - gamma) / (zeta - gamma)
    inside = log_alpha - beta * (np.log(t) - np.log1p(-t))
    return float(np.sum(weights / 2.0 / (1.0 + np.exp(-inside))))


@functools.cache
def _legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(points)


@functools.cache
def half_open_log_alpha(beta: float, stretch: tuple[float, float]) -> float:
    """The log_alpha at which E[z] = 1/2 (E[z] rises with log_alpha): the natural density's threshold.
    0 for a stretch symmetric about 1/2 (gamma + zeta = 1), as z(1 - u, -log_alpha) = 1 - z(u, log_alpha):
    rounded to 1e-12, far below the quadrature's and bisection's error, the symmetric case gives 0."""
    low, high = -100.0, 100.0
    for _ in range(80):  # 200 / 2^80: below float64's resolution near 0
        mid = (low + high) / 2.0
        if expected_gate(mid, beta, stretch) < 0.5:
            low = mid
        else:
            high = mid
    return round((low + high) / 2.0, 12) + 0.0  # + 0.0 turns -0.0 into 0.0


@DISCOVERERS.register("hard_concrete")
def _hard_concrete(model, data, cfg, sparsities, generator, mixed_precision) -> list[Discovery]:
    params = dict(model.named_parameters())
    names = maskable_names(model, cfg.selection)
    gates = {
        n: HardConcreteGate(params[n].shape, cfg.hc_init_log_alpha, cfg.hc_beta, cfg.hc_stretch).to(params[n].device)
        for n in names
    }
    scores = {n: gates[n].log_alpha for n in names}
    open_above = half_open_log_alpha(cfg.hc_beta, cfg.hc_stretch)
    found = ScoredMasks(model, gates, scores, data, sparsities, cfg.ties, open_above=open_above)
    device = params[names[0]].device
    # Its own stream: drawing u from `generator` would move the batches that `fit` shuffles with it.
    noise = torch.Generator(device=device)
    noise.manual_seed(stage_seed(generator.initial_seed(), "hard_concrete_noise"))
    sizes = [gates[n].log_alpha.numel() for n in names]

    def loss(batch, step):
        draws = torch.rand(sum(sizes), generator=noise, device=device).split(sizes)  # one kernel for all gates
        for gate, u in zip(gates.values(), draws, strict=True):
            gate.noise = u.view_as(gate.log_alpha)
        ce = F.cross_entropy(found.masked(batch["train"].x).float(), batch["train"].y)
        for gate in gates.values():
            gate.noise = None  # autograd kept what it needs; evaluation must not see a stale sample
        l0 = sum(expected_open(g.log_alpha, cfg.hc_beta, cfg.hc_stretch).sum() for g in gates.values())
        return ce + cfg.l0_lambda * l0, {"ce": ce, "l0": l0}

    def end_epoch(epoch):
        return {"natural_density": found.natural()}

    objective = found.objective(loss, end_epoch, state=noise.get_state, load_state=noise.set_state)
    trained = fit(objective, data, cfg.loop(), generator, mixed_precision=mixed_precision)
    return found.result(trained)
