"""Linear CKA (centred kernel alignment) between two sets of activations, and the layer map of
representational guidance (seed 004, "Training the Untrainable", arXiv 2410.20035).

Activations are flattened per example: `x` (n, ...) becomes X (n, p), `y` (n, ...) becomes Y (n, q).
With Xc, Yc centred over the n examples (columns of mean zero), linear CKA is

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
        = <Kc, Lc>_F / (||Kc||_F ||Lc||_F),   Kc = Xc Xc^T, Lc = Yc Yc^T (n x n Gram matrices),

the biased-HSIC ratio HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, HSIC(K, L) =
tr(K H L H) / (n - 1)^2, H = I - 11^T / n. `linear_cka` computes whichever form costs fewer
multiplications (feature form n (pq + p^2 + q^2), Gram form n^2 (p + q)). `hsic_cka` is the formula
itself, kept only to test `linear_cka`.

The biased HSIC depends on the batch size (the paper fixes 256); compare CKA values at one batch size.
"""

from __future__ import annotations

import torch


def _centred(a: torch.Tensor) -> torch.Tensor:
    a = a.reshape(a.shape[0], -1).float()  # (n, features), fp32 even under autocast / half inputs
    return a - a.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of activations `x` (n, ...) and `y` (n, ...), a differentiable fp32 scalar in [0, 1].

    Use `1 - linear_cka(a, b)` as an alignment loss. A representation constant over the batch has no
    defined CKA; it gives 0 here (the denominator is clamped), with finite gradients.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: x has {x.shape[0]} examples, y has {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka: needs at least 2 examples")
    xc, yc = _centred(x), _centred(y)
    n, p, q = xc.shape[0], xc.shape[1], yc.shape[1]
    if n * (p + q) < p * q + p * p + q * q:  # Gram form is cheaper
        kx, ky = xc @ xc.T, yc @ yc.T  # (n, n)
        cross, kk, ll = (kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum()
    else:
        cross = (yc.T @ xc).square().sum()  # (q, p)
        kk, ll = (xc.T @ xc).square().sum(), (yc.T @ yc).square().sum()
    # Clamp the product, not the norms: sqrt's gradient at 0 would be inf, times 0 a NaN.
    return cross / torch.sqrt((kk * ll).clamp_min(torch.finfo(torch.float32).tiny))


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA by the HSIC formula with explicit centring matrix, in float64. For tests only:
    O(n^3) and no clamping."""
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
