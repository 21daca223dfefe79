"""Linearised networks as GP priors (Maddox, Tang, Garcia, Wilson, Izmailov, AISTATS 2021, "Fast
adaptation with linearized neural networks"): a downstream method with no gradient training.

The source network, in eval mode, is linearised at its weights θ: f_lin(x) = f(x; θ) + J(x) Δw,
with J(x) the (C x P) Jacobian of the C logits with respect to *all* P parameters. Its kernel is
k(x, x') = J(x) J(x')ᵀ; on the N training examples K_XX is (N·C x N·C), example-major (row i·C + c
is logit c of example i). The prediction is the GP posterior mean with the network as prior mean,
on one-hot targets Y (N x C):

    f(x*) = f(x*; θ) + J(x*) Δw,   Δw = J(X)ᵀ β,   β = (K_XX + σ² I)⁻¹ vec(Y − f(X; θ))

which is the linearised model at θ + Δw, Δw the ridge regression of the residuals on the Jacobian's
features, solved in function space (N·C < P). Δw (buffer `gp_delta`) is computed once at fit time,
so `forward` costs one `torch.func.jvp` per batch: about two forward passes.

- σ²: each value of `sigma2_grid` times the kernel's mean diagonal, so the grid means the same for
  any architecture. One float64 eigendecomposition K = U diag(λ) Uᵀ serves every candidate. The best
  validation accuracy (`data.val`, labels `y`) wins; ties go to the larger σ². `history`: every
  candidate's validation accuracy in grid order; `measurements`: one row (`sigma2` (absolute),
  `sigma2_relative`, `kernel_mean_diag`, `kernel_size` (N·C), `explicit_jacobian` (1 or 0),
  `train_acc`). `best_epoch`, `epochs_run` and `steps` are 0; the source's weights never change.
- K_XX: from the explicit Jacobian J(X) (`vmap(jacrev)`, chunked) when N·C·P·(bytes per element) ≤
  `jacobian_max_bytes`, else matrix-free: column (i, c) is J(X) (J(x_i)ᵀ e_c), one vjp on example i
  and one jvp over examples i..N (the rest by symmetry), about N·C/2 jvp passes over X. Δw = J(X)ᵀ β
  comes from the explicit Jacobian, or one vjp pass over X.
- Size: the solve is O((N·C)³) time and (N·C)² float64 memory; `max_train` caps N (5000 examples x
  10 classes is a 20 GB kernel, as much again for its eigenvectors). The explicit Jacobian costs
  N·C·P·4 bytes (45 GB for 100 examples x 10 classes of a ResNet-18): such models go matrix-free.
- Not checkpointed: the fit does not go through `methods.training.fit`; an interrupted trial fits again.
- Features (`intermediates=True`, `feature_names()`) are the source's. Dropout and batch norm are the
  source's in eval mode, also when the model is put in train mode.
- Attention runs with the math kernel of `scaled_dot_product_attention` (the fused kernels have no
  forward-mode derivative), for every pass, the prior mean included.
- Analyses: `subnetwork_ablation` gives NaN (nothing was transplanted); `lmc_barrier` gives NaN, as
  the model declares `weight_space_point = False` (no weights of the source's architecture compute
  the GP's function: θ + Δw through the nonlinear network does not).
- No mixed precision: Jacobian products run in the model's dtype, the kernel is accumulated in
  float64 (`gram`), the solve is float64.

Departures from the paper:
- Classification here is regression on one-hot targets of the logits, with the network's output as
  prior mean (as their classification experiments do), not a GP classifier; the kernel is the full
  multi-output one (C x C blocks), not one output's.
- σ² is chosen on a validation grid, not by maximising the marginal likelihood.
- No conjugate gradients: a direct eigendecomposition of K_XX in float64, which caps N·C
  (`max_train`) but is exact and makes the σ² search cost one decomposition.
- Only the posterior mean is used; no predictive uncertainty is output.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.config import Frozen
from methods.registry import Method, MethodContext, register_method
from methods.training import TrainResult, evaluate
from tasks.base import Split

_BLOCK_BYTES = 2**28  # working memory of one chunk (Jacobian rows, float64 column blocks)


class LinearizedGPConfig(Frozen):
    """The `linearized_gp:` block of a sweep file."""

    sigma2_grid: tuple[float, ...] = Field(
        (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
        min_length=1,
        description="noise variances to try, relative to the kernel's mean diagonal; best validation accuracy wins",
    )
    jacobian_max_bytes: int = Field(
        2**30, ge=0, description="largest explicit Jacobian J(X) (N·C·P elements) to form; beyond it, matrix-free"
    )
    max_train: int = Field(5000, ge=1, description="most training examples; the solve costs O((N·C)^3)")

    @field_validator("sigma2_grid")
    @classmethod
    def _positive(cls, grid: tuple[float, ...]) -> tuple[float, ...]:
        bad = [g for g in grid if not (g > 0 and math.isfinite(g))]
        if bad:
            raise ValueError(f"every sigma2 must be positive and finite; got {bad}")
        return grid


def _attention_math():
    """The math kernel of scaled_dot_product_attention: the only one with forward-mode AD."""
    return sdpa_kernel([SDPBackend.MATH])


class LinearizedGP(nn.Module):
    """The GP posterior mean of a frozen source network's linearisation (see the module doc): a deep
    copy of the source (eval mode, no gradients) and the fitted buffers `gp_delta` (Δw = J(X)ᵀ β, flat,
    P), `gp_beta` (β, N·C, float64) and `gp_sigma2`. Before `fit_gp` Δw is 0: the source's function."""

    weight_space_point = False  # no network weights compute this function: lmc_barrier gives NaN

    def __init__(self, source: nn.Module):
        super().__init__()
        self.source = copy.deepcopy(source).eval().requires_grad_(False)
        named = list(self.source.named_parameters())
        if not named:
            raise ValueError("linearized_gp: the source has no parameters to linearise in")
        self._names = [n for n, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._numels = [p.numel() for _, p in named]
        dtype = functools.reduce(torch.promote_types, (p.dtype for _, p in named))
        device = named[0][1].device
        self.register_buffer("gp_delta", torch.zeros(sum(self._numels), dtype=dtype, device=device))
        self.register_buffer("gp_beta", torch.zeros(0, dtype=torch.float64, device=device))
        self.register_buffer("gp_sigma2", torch.tensor(math.nan, dtype=torch.float64, device=device))

    @property
    def n_params(self) -> int:
        return len(self.gp_delta)

    def feature_names(self) -> tuple[str, ...]:
        """The source's feature names: a linearised model's features are the source's."""
        return tuple(self.source.feature_names())

    def train(self, mode: bool = True) -> LinearizedGP:
        super().train(mode)
        self.source.eval()  # the linearisation is taken in eval mode, and stays there
        return self

    # --- functional views of the source ----------------------------------------------------

    def params(self) -> dict[str, torch.Tensor]:
        named = dict(self.source.named_parameters())
        return {n: named[n].detach() for n in self._names}

    def call(self, params: dict[str, torch.Tensor], x: torch.Tensor, intermediates: bool = False):
        """The source's forward with `params` (eval mode, fixed buffers)."""
        kwargs = {"intermediates": True} if intermediates else {}
        return functional_call(self.source, (params, dict(self.source.named_buffers())), (x,), kwargs)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat P-vector as parameter-shaped tensors, in each parameter's dtype."""
        params = self.params()
        parts = flat.split(self._numels)
        return {n: v.view(s).to(params[n].dtype) for n, v, s in zip(self._names, parts, self._shapes, strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self._names])

    # --- the predictor ---------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """f(x; θ) + J(x) Δw (B, C); with `intermediates`, `(logits, source features)`."""
        params, tangent = self.params(), self.unflatten(self.gp_delta)
        with _attention_math():
            if intermediates:
                logits, jv, features = jvp(lambda p: self.call(p, x, True), (params,), (tangent,), has_aux=True)
                return logits + jv, features
            logits, jv = jvp(lambda p: self.call(p, x), (params,), (tangent,))
        return logits + jv


# --- Jacobian products -----------------------------------------------------------------------


def _rows(split_x: torch.Tensor, batch_size: int):
    for start in range(0, len(split_x), batch_size):
        yield start, split_x[start : start + batch_size]


@torch.no_grad()
def prior_mean(model: LinearizedGP, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """f(X; θ) (N, C) in float64, in batches."""
    params, device = model.params(), model.gp_delta.device
    with _attention_math():
        outs = [model.call(params, xb.to(device)).double() for _, xb in _rows(x, batch_size)]
    return torch.cat(outs)


def jacobian(model: LinearizedGP, x: torch.Tensor, n_classes: int, batch_size: int) -> torch.Tensor:
    """The explicit Jacobian J(X) (N·C, P), rows example-major, in the parameters' dtype."""
    params, device = model.params(), model.gp_delta.device
    per_example = n_classes * model.n_params * model.gp_delta.element_size()
    chunk = max(1, min(batch_size, _BLOCK_BYTES // max(1, per_example)))

    def one(p, xi):
        return model.call(p, xi.unsqueeze(0)).squeeze(0)  # (C,)

    rows = []
    with _attention_math():
        for _, xb in _rows(x, chunk):
            jac = vmap(jacrev(one), in_dims=(None, 0))(params, xb.to(device))  # name -> (B, C, *shape)
            rows.append(torch.cat([jac[n].reshape(len(xb) * n_classes, -1) for n in model._names], dim=1))
    return torch.cat(rows)


def _column_blocks(n_rows: int, n_cols: int) -> int:
    """Columns per float64 block of an (n_rows, ·) matrix within the working memory."""
    return max(1, min(n_cols, _BLOCK_BYTES // (8 * max(1, n_rows))))


def gram(j: torch.Tensor) -> torch.Tensor:
    """J Jᵀ, accumulated in float64 over column blocks of J; each block's product runs in J's own
    dtype (float32 for a float32 source: faster than float64 on CPU, with a relative error near
    1e-6 on blocks of a few thousand parameters, far below the smallest σ² tried)."""
    k = torch.zeros(len(j), len(j), dtype=torch.float64, device=j.device)
    step = _column_blocks(len(j), j.shape[1])
    for a in range(0, j.shape[1], step):
        block = j[:, a : a + step]
        k += (block @ block.T).double()
    return k


def transpose_product(j: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Jᵀ β in float64 (P,) or, for β (N·C, G), (P, G): one pass over column blocks of J."""
    step = _column_blocks(len(j), j.shape[1])
    return torch.cat([j[:, a : a + step].double().T @ beta for a in range(0, j.shape[1], step)])


def vjp_sum(model: LinearizedGP, x: torch.Tensor, cotangent: torch.Tensor, batch_size: int) -> torch.Tensor:
    """J(X)ᵀ u for u (N, C): one vjp per batch, summed in float64; a flat (P,) vector."""
    params, device = model.params(), model.gp_delta.device
    total = torch.zeros(model.n_params, dtype=torch.float64, device=device)
    with _attention_math():
        for start, xb in _rows(x, batch_size):
            xb = xb.to(device)
            out, pullback = vjp(functools.partial(model.call, x=xb), params)
            u = cotangent[start : start + len(xb)].to(device, out.dtype)
            (grads,) = pullback(u)
            total += model.flatten(grads).double()
    return total


def jvp_rows(model: LinearizedGP, x: torch.Tensor, tangent: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """J(X) v (N, C) in float64 for a parameter-shaped v: one jvp per batch."""
    params, device = model.params(), model.gp_delta.device
    outs = []
    with _attention_math():
        for _, xb in _rows(x, batch_size):
            _, jv = jvp(functools.partial(model.call, x=xb.to(device)), (params,), (tangent,))
            outs.append(jv.double())
    return torch.cat(outs)


def kernel_matrix_free(model: LinearizedGP, x: torch.Tensor, n_classes: int, batch_size: int) -> torch.Tensor:
    """K_XX (N·C, N·C) column by column: K e_(i,c) = J(X) J(x_i)ᵀ e_c, computed on rows of examples
    j ≥ i; the rest by symmetry."""
    params, device = model.params(), model.gp_delta.device
    n, c = len(x), n_classes
    k = torch.zeros(n * c, n * c, dtype=torch.float64, device=device)
    eye = None
    with _attention_math():
        for i in range(n):
            xi = x[i : i + 1].to(device)
            out, pullback = vjp(functools.partial(model.call, x=xi), params)  # out (1, C)
            if eye is None:
                eye = torch.eye(c, dtype=out.dtype, device=device)
            for cls in range(c):
                (row,) = pullback(eye[cls].unsqueeze(0))  # J(x_i)ᵀ e_c, parameter-shaped
                column = jvp_rows(model, x[i:], row, batch_size)  # (N - i, C)
                k[i * c :, i * c + cls] = column.reshape(-1)
    return torch.tril(k) + torch.tril(k, -1).T  # every lower-triangle entry was computed


# --- the fit ---------------------------------------------------------------------------------


def fit_gp(model: LinearizedGP, train: Split, val: Split, cfg: LinearizedGPConfig, batch_size: int) -> TrainResult:
    """Fit the GP posterior mean on `train` and choose σ² on `val` (see the module doc). Only
    `train` and `val` are read."""
    n = len(train)
    if n > cfg.max_train:
        raise ValueError(
            f"linearized_gp: the budget has {n} training examples, more than linearized_gp.max_train = "
            f"{cfg.max_train}; the GP solve costs O((N·C)^3) time and (N·C)^2 memory. Raise "
            f"linearized_gp.max_train or use a smaller data fraction."
        )
    was_training = model.training
    model.eval()
    device = model.gp_delta.device
    x = train.x.to(device)
    f_x = prior_mean(model, x, batch_size) if n else None
    c = int(f_x.shape[1]) if n else int(_prior_width(model, val))
    explicit = n * c * model.n_params * model.gp_delta.element_size() <= cfg.jacobian_max_bytes
    sigma2s = torch.tensor(cfg.sigma2_grid, dtype=torch.float64, device=device)
    if n:
        y = F.one_hot(train.y.to(device).long(), c).double()
        residual = (y - f_x).reshape(-1)  # example-major, (N·C,)
        j = jacobian(model, x, c, batch_size) if explicit else None
        k = gram(j) if explicit else kernel_matrix_free(model, x, c, batch_size)
        k = (k + k.T) / 2  # exact symmetry for eigh
        scale = float(k.diagonal().mean())
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"linearized_gp: the kernel's mean diagonal is {scale}; the source's Jacobian is zero")
        sigma2s = sigma2s * scale
        lam, u = torch.linalg.eigh(k)
        betas = u @ ((u.T @ residual)[:, None] / (lam[:, None] + sigma2s))  # (N·C, G): one column per candidate
        deltas = transpose_product(j, betas) if explicit else None  # (P, G), one pass over J
    else:  # no training data: the posterior is the prior, the source itself
        scale = 1.0
    history, best = [], None
    for g, relative in enumerate(cfg.sigma2_grid):
        sigma2 = float(sigma2s[g])
        if n:
            beta = betas[:, g]
            delta = deltas[:, g] if explicit else vjp_sum(model, x, beta.view(n, c), batch_size)
        else:
            beta = torch.zeros(0, dtype=torch.float64, device=device)
            delta = torch.zeros(model.n_params, dtype=torch.float64, device=device)
        _load(model, beta, delta, sigma2)
        acc = evaluate(model, val, batch_size)["y"]
        history.append(acc)
        if best is None or (acc, sigma2) >= (best[0], best[1]):  # ties: the larger σ²
            best = (acc, sigma2, relative, beta, delta)
    acc, sigma2, relative, beta, delta = best
    _load(model, beta, delta, sigma2)
    train_acc = evaluate(model, train, batch_size)["y"] if n else math.nan
    model.train(was_training)
    row = {
        "sigma2": sigma2,
        "sigma2_relative": relative,
        "kernel_mean_diag": scale,
        "kernel_size": float(n * c),
        "explicit_jacobian": float(explicit),
        "train_acc": train_acc,
    }
    return TrainResult(best_val_acc=acc, best_epoch=0, epochs_run=0, steps=0, history=history, measurements=[row])


def _load(model: LinearizedGP, beta: torch.Tensor, delta: torch.Tensor, sigma2: float) -> None:
    model.gp_beta = beta.contiguous().clone()
    model.gp_delta = delta.to(model.gp_delta.dtype).contiguous().clone()
    model.gp_sigma2 = torch.tensor(sigma2, dtype=torch.float64, device=model.gp_delta.device)


@torch.no_grad()
def _prior_width(model: LinearizedGP, split: Split) -> int:
    """The number of logits, read from one example (for a fit without training data)."""
    with _attention_math():
        return model.call(model.params(), split.x[:1].to(model.gp_delta.device)).shape[1]


# --- the method ------------------------------------------------------------------------------


@register_method(
    "linearized_gp",
    needs=("source",),
    config=LinearizedGPConfig,
    description="GP posterior mean with the source's Jacobian kernel J(x) J(x')ᵀ (linearised network), no training",
)
class LinearizedGPMethod(Method):
    def build(self, ctx: MethodContext) -> nn.Module:
        return LinearizedGP(ctx.artifact("source"))

    def objective(self, ctx: MethodContext, model: nn.Module):
        raise TypeError("linearized_gp is fitted in closed form by its train(); it has no gradient objective")

    def train(
        self, ctx: MethodContext, model: nn.Module, generator: torch.Generator, mixed_precision: bool = False
    ) -> TrainResult:
        if not isinstance(ctx.config, LinearizedGPConfig):
            raise TypeError(
                f"linearized_gp needs its LinearizedGPConfig block in ctx.config, got {type(ctx.config).__name__}"
            )
        if not isinstance(model, LinearizedGP):
            raise TypeError(f"linearized_gp trains the LinearizedGP its build() returns, got {type(model).__name__}")
        return fit_gp(model, ctx.data.train, ctx.data.val, ctx.config, ctx.training.eval_batch_size)
