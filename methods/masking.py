"""Masks over named parameters, one code path for every layer type.

A mask is a `dict[name, BoolTensor]` keyed by parameter name (as in `model.named_parameters()`).
Models are never edited in place: a `MaskedModel` wraps a module and substitutes effective weights
for the masked names through `torch.func.functional_call`, so Linear, Conv and raw Parameters are
handled alike.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from common.config import Frozen

Mask = dict[str, torch.Tensor]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)
_EMBEDDING_HINTS = ("pos_emb", "pos_embedding", "class_token", "cls_token")


class MaskSelection(Frozen):
    """Which parameters a mask covers. Defaults follow the paper: weight matrices of linear, conv
    and attention projections; not biases, norms, embeddings or the output head."""

    embeddings: bool = False
    head: bool = False
    norms: bool = False
    biases: bool = False
    exclude: tuple[str, ...] = Field((), description="glob patterns of parameter names to leave out")


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Role of every parameter: 'weight', 'embedding', 'head', 'norm' or 'bias'; the head is the
    module named by the model's `head_name` attribute (default 'head')."""
    head = getattr(model, "head_name", "head")
    roles, seen = {}, set()
    for module_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # a tied parameter keeps its first name, as in model.named_parameters()
                continue
            seen.add(id(param))
            name = f"{module_name}.{pname}" if module_name else pname
            if module_name == head or module_name.startswith(head + "."):
                roles[name] = "head"
            elif isinstance(module, nn.Embedding) or any(h in name for h in _EMBEDDING_HINTS):
                roles[name] = "embedding"
            elif isinstance(module, _NORMS):
                roles[name] = "norm"
            elif param.ndim < 2:
                roles[name] = "bias"
            else:
                roles[name] = "weight"
    return roles


def maskable_names(model: nn.Module, selection: MaskSelection) -> list[str]:
    """Names of the parameters `selection` puts under the mask, in the model's order."""
    on = {"embedding": selection.embeddings, "head": selection.head, "norm": selection.norms, "bias": selection.biases}
    allowed = {"weight"} | {role for role, wanted in on.items() if wanted}
    names = [
        name
        for name, role in parameter_roles(model).items()
        if role in allowed and not any(fnmatch.fnmatch(name, pat) for pat in selection.exclude)
    ]
    if not names:
        raise ValueError("the mask selection covers no parameter of the model; relax `exclude`")
    return names


# --- mask arithmetic ---------------------------------------------------------------------


def density(mask: Mask) -> float:
    """Fraction of ones over all masked weights."""
    ones = sum(int(m.sum()) for m in mask.values())
    return ones / sum(m.numel() for m in mask.values())


def topk_mask(scores: dict[str, torch.Tensor], sparsity: float) -> Mask:
    """Keep the top (1 - sparsity) fraction of all scores, pooled over parameters: exactly
    round((1 - sparsity) * N) ones, ties broken by position (stable sort)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    scores = _sorted(scores)
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    keep = int(round((1.0 - sparsity) * flat.numel()))
    order = torch.argsort(flat, descending=True, stable=True)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:keep]] = True
    return _unflatten(chosen, scores)


def sample_like(mask: Mask, generator: torch.Generator) -> Mask:
    """A uniformly random mask over the same parameters with exactly as many ones as `mask`."""
    mask = _sorted(mask)
    total = sum(m.numel() for m in mask.values())
    ones = sum(int(m.sum()) for m in mask.values())
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.randperm(total, generator=generator)[:ones]] = True
    return _unflatten(chosen, mask)


def complement(mask: Mask) -> Mask:
    return {name: ~m for name, m in mask.items()}


def _sorted(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Flattening follows name order, so a mask's meaning never depends on dict order (a mask loaded
    # from disk and the same mask fresh from discovery must give the same random draws and ties).
    return {name: tensors[name] for name in sorted(tensors)}


def _unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> Mask:
    out, start = {}, 0
    for name, ref in like.items():
        out[name] = flat[start : start + ref.numel()].reshape(ref.shape).clone()
        start += ref.numel()
    return out


# --- masked forward ----------------------------------------------------------------------


def _key(name: str) -> str:
    return name.replace(".", "__")  # module-dict keys may not contain dots


class MaskedModel(nn.Module):
    """Wraps `base`; each masked name's weight is replaced by `fns[name](weight)` in forward."""

    def __init__(self, base: nn.Module, fns: dict[str, nn.Module]):
        super().__init__()
        self.base = base
        # One order whatever the order of `fns` (a mask loaded from the store may list its tensors in
        # another): a compiled forward guards on this list, so every trial of a worker shares its graph.
        self.names = sorted(fns)
        self.fns = nn.ModuleDict({_key(n): f for n, f in fns.items()})
        params = dict(base.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"masked names not in the model: {missing}")

    def effective_weights(self) -> dict[str, torch.Tensor]:
        params = dict(self.base.named_parameters())
        return {n: self.fns[_key(n)](params[n]) for n in self.names}

    @property
    def own_loss(self) -> bool:
        """Whether the base model computes its own training loss (`forward(x, targets=y)`)."""
        return getattr(self.base, "own_loss", False)

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.effective_weights(), args, kwargs)


class ScoreMask(nn.Module):
    """Continuous sparsification: soft mask sigmoid(T * s) while training, a fixed hard mask at eval."""

    def __init__(self, shape: Iterable[int], init: float):
        super().__init__()
        self.scores = nn.Parameter(torch.full(tuple(shape), float(init)))
        self.temperature = 1.0
        self.hard: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.hard is not None:
            return weight * self.hard.to(weight.dtype)
        return weight * torch.sigmoid(self.temperature * self.scores)


class Transplant(nn.Module):
    """Effective weight `where(mask, source, own)`: exact where the mask is 1 (no arithmetic on
    the source value), the model's own trainable weight where it is 0."""

    def __init__(self, source: torch.Tensor, mask: torch.Tensor, trainable_source: bool):
        super().__init__()
        self.register_buffer("mask", mask.clone().bool())
        if trainable_source:
            self.source = nn.Parameter(source.detach().clone())
        else:
            self.register_buffer("source", source.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self.source, weight)


# --- plain views of a (masked) model ----------------------------------------------------


@torch.no_grad()
def effective_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain architecture with `model`'s effective weights (a `MaskedModel`'s
    base's, each masked weight as forward uses it; any other model's own): loaded into a fresh model
    of that architecture, a plain model computing the same function (e.g. to interpolate two models)."""
    if not isinstance(model, MaskedModel):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {k: v.detach().clone() for k, v in model.base.state_dict().items()}
    for name, weight in model.effective_weights().items():
        state[name] = weight.detach().clone()
    return state


def transplanted_mask(model: nn.Module) -> Mask | None:
    """The mask of source weights transplanted into `model` (ones: the source's weights), or None
    when the model holds no transplant (scratch, full transfer)."""
    if not isinstance(model, MaskedModel):
        return None
    fns = {name: model.fns[_key(name)] for name in model.names}
    out = {name: fn.mask.detach().cpu().clone() for name, fn in fns.items() if isinstance(fn, Transplant)}
    return out or None


def check_same_architecture(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], who: str) -> None:
    """Raise a ValueError naming the first differing entries unless `a` and `b` (state or parameter
    dicts) have the same names and shapes."""
    diff = sorted(set(a) ^ set(b)) or sorted(k for k in a if a[k].shape != b[k].shape)
    if diff:
        raise ValueError(f"{who} needs the two models to share one architecture; they differ at {diff[:5]}")
