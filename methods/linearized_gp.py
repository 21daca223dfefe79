"""Linearised networks as GP priors (Maddox, Tang, Garcia, Wilson, Izmailov, AISTATS 2021, "Fast
adaptation with linearized neural networks"): a downstream method with no gradient training.

The source network, in eval mode, is linearised at its weights θ over *all* P of its parameters:
f_lin(x; w) = f(x; θ) + J(x) w, J(x) the (C x P) Jacobian of the C logits. Classification is the
paper's: the linearised logits are trained with cross-entropy under a Gaussian prior w ~ N(0, δ⁻¹ I)
(the MAP), a Laplace approximation around the MAP gives the posterior, the prior precision δ is the
one that maximises the Laplace marginal likelihood (evidence) of the training data, and predictions
are predictive probabilities (Monte Carlo over the Laplace posterior's logits).

- The MAP, in function space. The prior is isotropic, so the MAP w lies in the span of J(X)ᵀ:
  w = J(X)ᵀ a / δ, and f(X) = f(X; θ) + K a / δ with K = J(X) J(X)ᵀ the (N·C x N·C) Jacobian
  kernel, example-major (row i·C + c is logit c of example i). This is GP classification with
  kernel K / δ and the network as prior mean, solved by Newton's method on a (Rasmussen & Williams,
  "Gaussian processes for machine learning", algorithm 3.1 with a block-diagonal W; a halving line
  search keeps every step an ascent). W = blockdiag(diag πᵢ − πᵢπᵢᵀ) is the softmax Hessian; for the
  linearised model J(X)ᵀ W J(X) is the exact Hessian of the cross-entropy in w (the GGN is exact).
- The evidence: log Z(δ) = Σᵢ log πᵢ[yᵢ] − aᵀ K a / (2δ) − ½ log det(I + W^½ K W^½ / δ), at the MAP
  (Sylvester's identity turns the P x P determinant of the Laplace Hessian into this N·C one).
  δ = `prior_precision_relative` x the kernel's mean diagonal, the relative value searched on a
  log10 grid of step 0.5 over `prior_precision_bounds`, then refined by golden-section search
  around the grid's best to `search_tolerance` decades; the largest evidence wins. Only the
  training data are read: validation accuracy is reported, never used to choose.
- The posterior: N(w_MAP, Σ), Σ = (δ I + J(X)ᵀ W J(X))⁻¹. The predictive logits at x* are
  Gaussian, mean f(x*; θ) + J(x*) w_MAP and covariance J(x*) Σ J(x*)ᵀ; the prediction is
  E[softmax] over `samples` draws (fixed standard-normal draws, taken once from the method's
  generator, so a prediction is the same for any batching). The covariance is taken over the
  parameters of the source's head (its `head_name` module, `methods.finetune.find_head`): their
  exact marginal under Σ, Σ_HH = (I − J_Hᵀ W^½ B⁻¹ W^½ J_H / δ) / δ with B = I + W^½ K W^½ / δ,
  the other parameters held at the MAP at prediction time (the full covariance would need the
  Jacobian of every test example against all P parameters: see the departures).
- `forward` returns log predictive probabilities (softmax of them is the predictive distribution;
  argmax, accuracy and cross-entropy read them as logits); `predict_proba` the probabilities.
  One `torch.func.jvp` per batch (the mean) and one vmapped Jacobian against the head.
- `history`: the validation accuracy of the prediction (one entry); `measurements`: one row
  (`prior_precision` (δ), `prior_precision_relative`, `log_evidence`, `at_bound` (1 where the best δ
  is an end of the bounds), `newton_steps` (at the chosen δ), `kernel_mean_diag`, `kernel_size`
  (N·C), `head_params`, `explicit_jacobian` (1 or 0), `train_acc`, `map_val_acc` (the MAP's logits
  without the predictive average), `prior_val_acc` (the source's own)). `best_epoch`, `epochs_run`
  and `steps` are 0; the source's weights never change.
- Without training data the posterior is the prior and δ is undefined: the prediction is the
  source's softmax (no covariance).
- K_XX: from the explicit Jacobian J(X) (`vmap(jacrev)`, chunked) when N·C·P·(bytes per element) ≤
  `jacobian_max_bytes`, else matrix-free: column (i, c) is J(X) (J(x_i)ᵀ e_c), one vjp on example i
  and one jvp over examples i..N (the rest by symmetry). w = J(X)ᵀ a / δ comes from the explicit
  Jacobian, or one vjp pass over X.
- Size: every Newton step is a Cholesky factorisation of an (N·C)² float64 matrix; `max_train`
  caps N. The explicit Jacobian costs N·C·P·4 bytes (45 GB for 100 examples x 10 classes of a
  ResNet-18): such models go matrix-free.
- Memory (docs/PERFORMANCE.md, "Linearised GP memory"): J(X) lives only while K is accumulated
  (peak J + K + one float32 (N·C)² product) and again, formed anew with the same numbers, for
  w = J(X)ᵀ a / δ after the search has freed K; the search holds K, K / δ, the Newton step's B and
  its factor, and the Cholesky factor of the best δ so far only (not one per δ tried); K is
  symmetrised in place. At compare-arithmetic's N = 1290 (N·C = 9030, P ≈ 120k) the fit's peak is
  about J + K + (N·C)²·4 bytes = 4.4 + 0.65 + 0.33 ≈ 5.4 GB above the process's own.
- Not checkpointed: the fit does not go through `methods.training.fit`; an interrupted trial fits
  again. A kept model reloads (`load_state_dict` resizes the fitted buffers).
- Features (`intermediates=True`, `feature_names()`) are the source's. Dropout and batch norm are the
  source's in eval mode, also when the model is put in train mode.
- Attention runs with the math kernel of `scaled_dot_product_attention` (the fused kernels have no
  forward-mode derivative), for every pass, the prior mean included.
- Analyses: `subnetwork_ablation` gives NaN (nothing was transplanted); `lmc_barrier` gives NaN, as
  the model declares `weight_space_point = False` (no weights of the source's architecture compute
  the GP's function: θ + w through the nonlinear network does not); `calibration` reads
  `predict_proba`.
- No mixed precision: Jacobian products run in the model's dtype, the kernel is accumulated in
  float64 (`gram`), Newton's method and the covariance are float64.

Departures from the paper (docs/COMPARISON.md gives their measured effect where measured):
- The predictive covariance is the head's marginal (above), not J(x*) Σ J(x*)ᵀ over all parameters;
  the MAP and the evidence are over all parameters.
- Monte Carlo over the Gaussian logits (`samples` draws), not a probit approximation.
- No conjugate gradients: direct Cholesky factorisations of the (N·C)² system in float64, exact,
  which caps N·C (`max_train`).
- The kernel is the full multi-output one (C x C blocks per pair of examples).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.config import Frozen
from methods.finetune import find_head
from methods.registry import Method, MethodContext, register_method
from methods.training import TrainResult, evaluate
from tasks.base import Split

_BLOCK_BYTES = 2**28  # working memory of one chunk (Jacobian rows, float64 column blocks)
_GRID_STEP = 0.5  # decades between the evidence grid's prior precisions
_GOLDEN = (math.sqrt(5) - 1) / 2
_NEWTON_TOL = 1e-10  # relative increase of the log posterior below which Newton's method stops
_NEWTON_MAX = 200


class LinearizedGPConfig(Frozen):
    """The `linearized_gp:` block of a sweep file."""

    prior_precision_bounds: tuple[float, float] = Field(
        (1e-4, 1e4),
        description="range of the prior precision δ searched by the evidence, relative to the kernel's mean "
        "diagonal (1 / the prior variance of a logit's change)",
    )
    search_tolerance: float = Field(
        0.01, gt=0, le=_GRID_STEP, description="decades to which the golden-section search refines δ"
    )
    samples: int = Field(1000, ge=1, description="Monte Carlo draws of the predictive logits per prediction")
    jacobian_max_bytes: int = Field(
        2**30, ge=0, description="largest explicit Jacobian J(X) (N·C·P elements) to form; beyond it, matrix-free"
    )
    max_train: int = Field(5000, ge=1, description="most training examples; each Newton step costs O((N·C)^3)")

    @model_validator(mode="after")
    def _bounds(self) -> LinearizedGPConfig:
        lo, hi = self.prior_precision_bounds
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"prior_precision_bounds must be two positive finite numbers, low <= high; got {[lo, hi]}")
        return self


def _attention_math():
    """The math kernel of scaled_dot_product_attention: the only one with forward-mode AD."""
    return sdpa_kernel([SDPBackend.MATH])


_FITTED = ("gp_delta", "gp_alpha", "gp_head_factor", "gp_draws")  # buffers whose shape the fit sets


class LinearizedGP(nn.Module):
    """The Laplace-approximated posterior of a frozen source network's linearisation (see the module
    doc): a deep copy of the source (eval mode, no gradients) and the fitted buffers `gp_delta` (the
    MAP w = J(X)ᵀ a / δ, flat, P), `gp_alpha` (a, N·C, float64), `gp_prior_precision` (δ),
    `gp_head_factor` (R with R Rᵀ = Σ_HH, the head's posterior covariance, float64) and `gp_draws`
    (standard-normal draws, samples x C). Before `fit_gp` w is 0 and there is no covariance: the
    prediction is the source's softmax."""

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
        self._head: list[str] | None = None  # the head's parameter names, found on the first input
        dtype = functools.reduce(torch.promote_types, (p.dtype for _, p in named))
        device = named[0][1].device
        f64 = {"dtype": torch.float64, "device": device}
        self.register_buffer("gp_delta", torch.zeros(sum(self._numels), dtype=dtype, device=device))
        self.register_buffer("gp_alpha", torch.zeros(0, **f64))
        self.register_buffer("gp_prior_precision", torch.tensor(math.nan, **f64))
        self.register_buffer("gp_head_factor", torch.zeros(0, 0, **f64))
        self.register_buffer("gp_draws", torch.zeros(0, 0, **f64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _FITTED:  # a fitted model's buffers have the fit's shapes: take them
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.gp_delta.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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

    def head_names(self, example: torch.Tensor) -> list[str]:
        """The parameters of the source's head (the module that outputs its logits), in order."""
        if self._head is None:
            head = find_head(self.source, example[:2])
            self._head = [n for n in self._names if n.startswith(f"{head}.")]
            if not self._head:
                raise ValueError(f"linearized_gp: the source's head {head!r} has no parameters of its own (a tied "
                                 f"head?); the predictive covariance is taken over the head's parameters")  # fmt: skip
        return self._head

    def head_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """J_H(x) (B, C, P_H): the logits' Jacobian against the head's parameters, per example."""
        params, head = self.params(), self.head_names(x)
        fixed = {n: v for n, v in params.items() if n not in head}

        def one(h, xi):
            return self.call({**fixed, **h}, xi.unsqueeze(0)).squeeze(0)

        with _attention_math():
            jac = vmap(jacrev(one), in_dims=(None, 0))({n: params[n] for n in head}, x)
        return torch.cat([jac[n].reshape(len(x), jac[n].shape[1], -1) for n in head], dim=2)

    # --- the predictor ---------------------------------------------------------------------

    def map_logits(self, x: torch.Tensor, intermediates: bool = False):
        """f(x; θ) + J(x) w_MAP (B, C); with `intermediates`, `(logits, source features)`."""
        params, tangent = self.params(), self.unflatten(self.gp_delta)
        with _attention_math():
            if intermediates:
                logits, jv, features = jvp(lambda p: self.call(p, x, True), (params,), (tangent,), has_aux=True)
                return logits + jv, features
            logits, jv = jvp(lambda p: self.call(p, x), (params,), (tangent,))
        return logits + jv

    def forward(
        self, x: torch.Tensor, intermediates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Log predictive probabilities (B, C); with `intermediates`, `(them, source features)`."""
        out = self.map_logits(x, intermediates)
        mean, features = out if intermediates else (out, None)
        logp = self._predictive(x, mean)
        return (logp, features) if intermediates else logp

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """The predictive probabilities (B, C): E[softmax(f)] under the Laplace posterior."""
        return self(x).exp()

    def _predictive(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        if self.gp_head_factor.numel() == 0 or self.gp_draws.numel() == 0:  # no posterior covariance
            return F.log_softmax(mean.double(), dim=-1).to(mean.dtype)
        u = self.head_jacobian(x).double() @ self.gp_head_factor  # (B, C, P_H): J_H R
        cov = u @ u.transpose(1, 2)  # (B, C, C)
        lam, vec = torch.linalg.eigh((cov + cov.transpose(1, 2)) / 2)
        root = vec * lam.clamp_min(0).sqrt().unsqueeze(1)  # (B, C, C): root rootᵀ = cov
        logits = mean.double().unsqueeze(1) + self.gp_draws @ root.transpose(1, 2)  # (B, S, C)
        logp = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(len(self.gp_draws))
        return logp.to(mean.dtype)


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

    # Filled in place: one copy of J at a time (a list of row blocks joined at the end held two).
    out = torch.empty(len(x) * n_classes, model.n_params, dtype=model.gp_delta.dtype, device=device)
    with _attention_math():
        for start, xb in _rows(x, chunk):
            jac = vmap(jacrev(one), in_dims=(None, 0))(params, xb.to(device))  # name -> (B, C, *shape)
            rows, col = slice(start * n_classes, (start + len(xb)) * n_classes), 0
            for n in model._names:
                block = jac.pop(n).reshape(len(xb) * n_classes, -1)
                out[rows, col : col + block.shape[1]] = block
                col += block.shape[1]
    return out


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
        k += block @ block.T  # promoted to float64 element by element: no float64 copy of the product
    return k


def _symmetrise_(k: torch.Tensor) -> torch.Tensor:
    """k ← (k + kᵀ) / 2 in place, tile by tile: the same numbers as `(k + k.T) / 2` (each entry is
    the same sum, halved) without its two (N·C)² temporaries."""
    step = _column_blocks(len(k), len(k))
    for a in range(0, len(k), step):
        for b in range(a, len(k), step):
            upper, lower = k[a : a + step, b : b + step], k[b : b + step, a : a + step]
            mean = (upper + lower.T) / 2
            upper.copy_(mean)
            lower.copy_(mean.T)
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


# --- GP classification: Newton's method and the evidence ------------------------------------------


def _blocks(pi: torch.Tensor) -> torch.Tensor:
    """W^½ (N, C, C): the symmetric square root of each softmax Hessian diag(πᵢ) − πᵢπᵢᵀ."""
    w = torch.diag_embed(pi) - pi.unsqueeze(2) * pi.unsqueeze(1)
    lam, vec = torch.linalg.eigh(w)
    return (vec * lam.clamp_min(0).sqrt().unsqueeze(1)) @ vec.transpose(1, 2)


def _block_left(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """blockdiag(s) @ m for m (N·C, ·)."""
    n, c, _ = s.shape
    return torch.einsum("iab,ibk->iak", s, m.reshape(n, c, -1)).reshape(n * c, -1)


class _Posterior:
    """The MAP and Laplace evidence of GP classification with kernel K / δ and prior mean f0 (see
    the module doc), at one δ: `a` (N·C), the latent `f` (N, C), `log_evidence`, `steps`, and the
    factors at the MAP: `root` (W^½ blocks) and `chol` (the Cholesky factor of B)."""

    def __init__(self, k: torch.Tensor, f0: torch.Tensor, y: torch.Tensor, delta: float, a0: torch.Tensor):
        n, c = f0.shape
        kd = k / delta
        labels = y.argmax(1)

        def objective(a: torch.Tensor) -> tuple[float, torch.Tensor]:
            g = kd @ a
            f = f0 + g.view(n, c)
            loglik = F.log_softmax(f, dim=1).gather(1, labels[:, None]).sum()
            return float(loglik - 0.5 * (a @ g)), f

        a = a0
        psi, f = objective(a)
        self.steps = 0
        for _ in range(_NEWTON_MAX):
            pi = F.softmax(f, dim=1)
            root = _blocks(pi)
            w_g = _block_left(root, _block_left(root, (f - f0).reshape(-1, 1))).reshape(-1)
            b = w_g + (y - pi).reshape(-1)
            chol = _b_factor(root, kd)
            inner = torch.cholesky_solve(_block_left(root, (kd @ b).reshape(-1, 1)), chol)
            del chol  # (N·C)²: freed before the next factorisation
            step = b - _block_left(root, inner).reshape(-1) - a
            t = 1.0
            while True:  # halve until the log posterior does not fall (it is concave: t small suffices)
                new_psi, new_f = objective(a + t * step)
                if new_psi >= psi or t < 1e-12:
                    break
                t /= 2
            self.steps += 1
            gain = new_psi - psi
            if gain >= 0:
                a, psi, f = a + t * step, new_psi, new_f
            if gain < _NEWTON_TOL * (1 + abs(psi)):
                break
        self.a, self.f, self.delta = a, f, delta
        self.factor(kd)
        self.log_evidence = psi - float(torch.log(self.chol.diagonal()).sum())  # − ½ log det B

    def factor(self, kd: torch.Tensor) -> None:
        """`root` and `chol` at the MAP, for kd = K / δ (again, after `drop`: the same numbers)."""
        self.root = _blocks(F.softmax(self.f, dim=1))
        self.chol = _b_factor(self.root, kd)

    def drop(self) -> None:
        """Free the (N·C)² Cholesky factor (the search keeps it for its best δ only)."""
        self.chol = None


def _b_factor(root: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of B = I + W^½ (K/δ) W^½, with one (N·C)² temporary besides the factor
    (the same numbers as `cholesky(eye + ...)`: adding the identity's zeros changes no entry)."""
    b = _block_left(root, _block_left(root, kd).T)  # symmetric
    b.diagonal().add_(1.0)
    return torch.linalg.cholesky(b)


def _search(k, f0, y, scale: float, cfg: LinearizedGPConfig) -> tuple[_Posterior, float, bool]:
    """The posterior at the δ of largest evidence: a log10 grid over the bounds (relative to
    `scale`), then golden-section search around its best (module doc). Returns it, its relative δ
    and whether that δ is an end of the bounds."""
    lo, hi = (math.log10(b) for b in cfg.prior_precision_bounds)
    found: dict[float, _Posterior] = {}
    key = lambda v: (found[v].log_evidence, v)  # noqa: E731  (ties: the tighter prior)
    kept: list[float] = []  # the best δ so far: only its posterior keeps its (N·C)² Cholesky factor
    warm = [torch.zeros(f0.numel(), dtype=f0.dtype, device=f0.device), 1.0]  # the last a and its δ

    def at(u: float) -> float:
        if u not in found:
            delta = scale * 10**u
            found[u] = _Posterior(k, f0, y, delta, warm[0] * (delta / warm[1]))  # the same f to start from
            warm[:] = [found[u].a, delta]
            if not kept:
                kept.append(u)
            elif key(u) > key(kept[0]):
                found[kept[0]].drop()
                kept[0] = u
            else:
                found[u].drop()
        return found[u].log_evidence

    grid = [lo + i * _GRID_STEP for i in range(int(math.floor((hi - lo) / _GRID_STEP + 1e-9)) + 1)]
    if grid[-1] < hi:
        grid.append(hi)
    for u in reversed(grid):  # from the tight prior (near the source) outwards: warm starts stay close
        at(u)
    best = max(grid, key=lambda u: (at(u), u))
    a, b = max(lo, best - _GRID_STEP), min(hi, best + _GRID_STEP)
    x1, x2 = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    while b - a > cfg.search_tolerance:
        if at(x1) >= at(x2):
            b, x2 = x2, x1
            x1 = b - _GOLDEN * (b - a)
        else:
            a, x1 = x1, x2
            x2 = a + _GOLDEN * (b - a)
    u = max(found, key=key)
    if found[u].chol is None:  # only where an evidence was NaN (no total order): factor it again
        found[u].factor(k / found[u].delta)
    return found[u], 10**u, u in (lo, hi)


def _head_factor(post: _Posterior, j_head: torch.Tensor) -> torch.Tensor:
    """R (P_H, P_H) with R Rᵀ = Σ_HH = (I − J_Hᵀ W^½ B⁻¹ W^½ J_H / δ) / δ, the head's marginal."""
    m = torch.linalg.solve_triangular(post.chol, _block_left(post.root, j_head), upper=False)
    cov = (torch.eye(j_head.shape[1], dtype=m.dtype, device=m.device) - m.T @ m / post.delta) / post.delta
    lam, vec = torch.linalg.eigh((cov + cov.T) / 2)
    return vec * lam.clamp_min(0).sqrt()


# --- the fit ---------------------------------------------------------------------------------


def fit_gp(
    model: LinearizedGP,
    train: Split,
    val: Split,
    cfg: LinearizedGPConfig,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> TrainResult:
    """Fit the Laplace posterior of the linearised model on `train`, δ by the evidence (module doc);
    `val` is only scored. `generator` draws the predictive's standard-normal draws."""
    n = len(train)
    if n > cfg.max_train:
        raise ValueError(
            f"linearized_gp: the budget has {n} training examples, more than linearized_gp.max_train = "
            f"{cfg.max_train}; each Newton step costs O((N·C)^3) time and (N·C)^2 memory. Raise "
            f"linearized_gp.max_train or use a smaller data fraction."
        )
    was_training = model.training
    model.eval()
    device = model.gp_delta.device
    row = {"prior_precision": math.nan, "prior_precision_relative": math.nan, "log_evidence": math.nan,
           "at_bound": math.nan, "newton_steps": 0.0, "kernel_mean_diag": math.nan, "kernel_size": 0.0,
           "head_params": math.nan, "explicit_jacobian": math.nan, "train_acc": math.nan}  # fmt: skip
    _load(model, torch.zeros(model.n_params), torch.zeros(0), math.nan, torch.zeros(0, 0), torch.zeros(0, 0))
    row["prior_val_acc"] = evaluate(model, val, batch_size)["y"]  # the prior: the source's softmax
    if n:
        x = train.x.to(device)
        f0 = prior_mean(model, x, batch_size)
        c = f0.shape[1]
        explicit = n * c * model.n_params * model.gp_delta.element_size() <= cfg.jacobian_max_bytes
        if explicit:
            j = jacobian(model, x, c, batch_size)
            k = gram(j)
            del j  # N·C·P: not held through the search; formed again below for w (the same numbers)
        else:
            k = kernel_matrix_free(model, x, c, batch_size)
        _symmetrise_(k)
        scale = float(k.diagonal().mean())
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"linearized_gp: the kernel's mean diagonal is {scale}; the source's Jacobian is zero")
        y = F.one_hot(train.y.to(device).long(), c).double()
        post, relative, at_bound = _search(k, f0, y, scale, cfg)
        del k
        j_head = torch.cat([model.head_jacobian(xb).double() for _, xb in _rows(x, batch_size)])
        factor = _head_factor(post, j_head.reshape(n * c, -1))
        post.drop()
        coef = post.a / post.delta
        if explicit:
            delta = transpose_product(jacobian(model, x, c, batch_size), coef)
        else:
            delta = vjp_sum(model, x, coef.view(n, c), batch_size)
        draws = torch.randn(cfg.samples, c, generator=generator, dtype=torch.float64)
        _load(model, delta, post.a, post.delta, factor, draws)
        row.update(prior_precision=post.delta, prior_precision_relative=relative, log_evidence=post.log_evidence,
                   at_bound=float(at_bound), newton_steps=float(post.steps), kernel_mean_diag=scale,
                   kernel_size=float(n * c), head_params=float(factor.shape[0]), explicit_jacobian=float(explicit),
                   train_acc=evaluate(model, train, batch_size)["y"])  # fmt: skip
    acc = evaluate(model, val, batch_size)["y"]
    row["map_val_acc"] = _map_accuracy(model, val, batch_size)
    model.train(was_training)
    return TrainResult(best_val_acc=acc, best_epoch=0, epochs_run=0, steps=0, history=[acc], measurements=[row])


@torch.no_grad()
def _map_accuracy(model: LinearizedGP, split: Split, batch_size: int) -> float:
    """Accuracy of the MAP's logits (no predictive average) on `split`."""
    device = model.gp_delta.device
    hits = sum(int((model.map_logits(xb.to(device)).argmax(-1).cpu() == split.y[s : s + len(xb)]).sum())
               for s, xb in _rows(split.x, batch_size))  # fmt: skip
    return hits / max(1, len(split))


def _load(model: LinearizedGP, delta, alpha, precision: float, factor, draws) -> None:
    device = model.gp_delta.device
    model.gp_delta = delta.to(device, model.gp_delta.dtype).contiguous().clone()
    model.gp_alpha = alpha.to(device, torch.float64).contiguous().clone()
    model.gp_prior_precision = torch.tensor(precision, dtype=torch.float64, device=device)
    model.gp_head_factor = factor.to(device, torch.float64).contiguous().clone()
    model.gp_draws = draws.to(device, torch.float64).contiguous().clone()


# --- the method ------------------------------------------------------------------------------


@register_method(
    "linearized_gp",
    needs=("source",),
    config=LinearizedGPConfig,
    description="the source's linearisation trained by cross-entropy (MAP), Laplace posterior, prior by the "
    "evidence, predictive probabilities; no gradient step",
)
class LinearizedGPMethod(Method):
    def build(self, ctx: MethodContext) -> nn.Module:
        return LinearizedGP(ctx.artifact("source"))

    def objective(self, ctx: MethodContext, model: nn.Module):
        raise TypeError("linearized_gp is fitted by Newton's method in its train(); it has no gradient objective")

    def train(
        self, ctx: MethodContext, model: nn.Module, generator: torch.Generator, mixed_precision: bool = False
    ) -> TrainResult:
        if not isinstance(ctx.config, LinearizedGPConfig):
            raise TypeError(
                f"linearized_gp needs its LinearizedGPConfig block in ctx.config, got {type(ctx.config).__name__}"
            )
        if not isinstance(model, LinearizedGP):
            raise TypeError(f"linearized_gp trains the LinearizedGP its build() returns, got {type(model).__name__}")
        return fit_gp(model, ctx.data.train, ctx.data.val, ctx.config, ctx.training.eval_batch_size, generator)
