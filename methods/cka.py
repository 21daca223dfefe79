"""Linear CKA (centred kernel alignment) between two sets of activations, and the layer map of
representational guidance (seed 004, "Training the Untrainable", arXiv 2410.20035).

Activations are flattened per example: `x` (n, ...) becomes X (n, p), `y` (n, ...) becomes Y (n, q).
Linear CKA is the HSIC ratio HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) of the Gram matrices
K = X X^T, L = Y Y^T, with one of two HSIC estimators:

- biased (the paper's): HSIC_b(K, L) = tr(K H L H) / (n - 1)^2, H = I - 11^T / n. With Xc, Yc
  centred over the n examples, CKA_b = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). It depends
  on n and inflates when the features outnumber the examples: two *independent* random
  representations of p >> n features score near 1 (tested). The paper fixes n = 256.
- unbiased (Song et al. 2012, as in Nguyen, Raghu & Kornblith 2021's minibatch CKA): with K~, L~ the
  Gram matrices with their diagonals zeroed,
      HSIC_u(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n - 1)(n - 2)) - 2 (1^T K~ L~ 1) / (n - 2)] / (n (n - 3)),
  an unbiased estimate of the population HSIC at any n >= 4, so CKA_u on a minibatch of 64 estimates
  what CKA_b reaches only with many examples (tested). CKA_u can fall slightly below 0 or above 1.

`linear_cka` computes either (the biased one in whichever form costs fewer multiplications: feature
form n (pq + p^2 + q^2), Gram form n^2 (p + q)). `gram` and `cka_of_grams` split the work so that a
layer's Gram matrix is computed once however many pairs use it. `hsic_cka` is the biased formula
itself, kept only to test `linear_cka`.
"""

from __future__ import annotations

from typing import Literal

import torch

Estimator = Literal["biased", "unbiased"]
_TINY = torch.finfo(torch.float32).tiny


def _centred(a: torch.Tensor) -> torch.Tensor:
    a = a.reshape(a.shape[0], -1).float()  # (n, features), fp32 even under autocast / half inputs
    return a - a.mean(dim=0, keepdim=True)


def _check(n_x: int, n_y: int, estimator: str) -> None:
    if n_x != n_y:
        raise ValueError(f"linear_cka: x has {n_x} examples, y has {n_y}")
    if estimator not in ("biased", "unbiased"):
        raise ValueError(f"linear_cka: estimator must be 'biased' or 'unbiased', got {estimator!r}")
    least = 4 if estimator == "unbiased" else 2
    if n_x < least:
        raise ValueError(f"linear_cka: the {estimator} estimator needs at least {least} examples, got {n_x}")


def gram(x: torch.Tensor, estimator: Estimator = "biased") -> torch.Tensor:
    """The (n, n) fp32 Gram matrix of the centred activations that `cka_of_grams` expects, with its
    diagonal zeroed for the unbiased estimator. (The unbiased HSIC is exactly invariant to a shift
    of every example by one vector, so centring changes nothing but float32 round-off.)"""
    xc = _centred(x)
    k = xc @ xc.T
    return k if estimator == "biased" else k - torch.diag_embed(torch.diagonal(k))


def _hsic_u(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of two Gram matrices with zero diagonals (without the 1 / (n (n - 3)) factor,
    which cancels in CKA)."""
    n = k.shape[0]
    k1, m1 = k.sum(dim=1), m.sum(dim=1)  # K~ 1, L~ 1
    return (k * m).sum() + k1.sum() * m1.sum() / ((n - 1) * (n - 2)) - 2 * (k1 @ m1) / (n - 2)


def cka_of_grams(k: torch.Tensor, m: torch.Tensor, estimator: Estimator = "biased") -> torch.Tensor:
    """CKA of two Gram matrices from `gram` (of the same estimator). A representation constant over
    the batch has no defined CKA; it gives 0 here (the denominator is clamped), with finite gradients."""
    _check(k.shape[0], m.shape[0], estimator)
    if estimator == "biased":
        cross, kk, mm = (k * m).sum(), (k * k).sum(), (m * m).sum()
    else:
        cross, kk, mm = _hsic_u(k, m), _hsic_u(k, k), _hsic_u(m, m)
    # Clamp the product, not the norms: sqrt's gradient at 0 would be inf, times 0 a NaN. (An
    # unbiased self-HSIC can come out below 0 for a nearly constant representation: counted as 0.)
    return cross / torch.sqrt((kk.clamp_min(0) * mm.clamp_min(0)).clamp_min(_TINY))


def linear_cka(x: torch.Tensor, y: torch.Tensor, estimator: Estimator = "biased") -> torch.Tensor:
    """Linear CKA of activations `x` (n, ...) and `y` (n, ...), a differentiable fp32 scalar (in
    [0, 1] for the biased estimator). Use `1 - linear_cka(a, b)` as an alignment loss."""
    _check(x.shape[0], y.shape[0], estimator)
    if estimator == "unbiased":
        return cka_of_grams(gram(x, "unbiased"), gram(y, "unbiased"), "unbiased")
    xc, yc = _centred(x), _centred(y)
    n, p, q = xc.shape[0], xc.shape[1], yc.shape[1]
    if n * (p + q) < p * q + p * p + q * q:  # Gram form is cheaper
        return cka_of_grams(xc @ xc.T, yc @ yc.T, "biased")
    cross = (yc.T @ xc).square().sum()  # (q, p)
    kk, ll = (xc.T @ xc).square().sum(), (yc.T @ yc).square().sum()
    return cross / torch.sqrt((kk * ll).clamp_min(_TINY))


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA by the biased HSIC formula with explicit centring matrix, in float64. For tests
    only: O(n^3) and no clamping."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n

    def hsic(ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        return torch.trace(ka @ h @ kb @ h) / (n - 1) ** 2

    kx, ky = x @ x.T, y @ y.T
    return hsic(kx, ky) / torch.sqrt(hsic(kx, kx) * hsic(ky, ky))


def layer_map(n_target: int, n_guide: int) -> list[tuple[int, int]]:
    """Pairs `(target_layer, guide_layer)`: every guide layer g goes to target layer
    round(g (n_target - 1) / (n_guide - 1)) (one guide layer goes to target layer 0), ties rounded
    half up in integer arithmetic (not to even, as Python's `round`). Every pair is kept, in guide order."""
    if n_target < 1 or n_guide < 1:
        raise ValueError(f"layer_map: need at least one layer each, got n_target={n_target}, n_guide={n_guide}")
    if n_guide == 1:
        return [(0, 0)]
    span = n_guide - 1
    # floor(g (n_t - 1) / span + 1/2) = floor((2 g (n_t - 1) + span) / (2 span))
    return [((2 * g * (n_target - 1) + span) // (2 * span), g) for g in range(n_guide)]
