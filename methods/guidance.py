"""Representational guidance (seed 004, "Training the Untrainable", arXiv 2410.20035): a fresh
target model trained on cross-entropy plus an alignment of its layers to a frozen guide network's.

    loss = CE(target(x), y) + alpha * sum over mapped pairs (t, g) of (1 - CKA_linear(A_t, G_g))

- The `guide` kind declares the source as a need but uses it only where the guide is the source
  itself (`uses`): a guide of another architecture, or an untrained one, neither trains nor loads
  the source, and the source's quality gate does not gate its findings.
- The guide is an artifact kind, `guide`, with its own block `guide: {trained, model}`. `trained:
  true` trains it on the base task with the source's settings (with `model: null`, the sweep's own
  model, the guide *is* the source model: same key, same weights); `trained: false` is a fresh init
  seeded by (seed, "guide_init"), unlike the target's. `model` may name another architecture (e.g.
  `{name: mlp, n_layers: 2, width: 16}`) that fits the task. The guide is frozen: eval mode, no gradient.
- Layers: the paper aligns every layer's output before its nonlinearity. Here the aligned
  activations are the *pre-activations*: the input of every call of an activation module (ReLU,
  GELU, Tanh, SiLU, ...) in the order of the forward pass, recorded by forward pre-hooks
  (`preactivations`). A plain CNN gives one per block (its conv or batch-norm output), an MLP one
  per hidden layer, a torchvision ResNet-18 17 (the stem, then each BasicBlock's two: after `bn1`,
  and the residual sum before the block's last ReLU), a GPT one per block (its MLP's hidden layer).
  The logits are never aligned (no activation follows them). Guide layer g goes to target layer
  round(g (n_t - 1) / (n_g - 1)) (`methods.cka.layer_map`); when several guide layers map to one
  target layer every pair is kept, so the sum has one term per guide pre-activation.
- Activations are flattened per example; linear CKA in fp32 (`methods.cka`), by default with the
  unbiased HSIC estimator (`guidance.estimator`), whose estimate does not depend on the number of
  examples and does not inflate when features outnumber examples; each layer's Gram matrix is
  computed once however many pairs use it.
- Which examples CKA is estimated on (`guidance.cka_examples`): null (the default), the loop's
  training batch (`training.batch_size`); m, a CKA batch of its own each guided step, min(m,
  n_train) downstream training examples drawn without replacement by the method's own seeded
  generator (`CkaRows`; all of them, without a draw, when m >= n_train), while cross-entropy stays
  on the loop's batch, so the training budget (batches, steps, learning rate) is every method's.
  The paper computes both on one training batch of 256; m = 256 is its number of examples per CKA
  estimate. Chosen over the alternatives because it is the closest to the paper that keeps the
  shared training settings: a CKA batch that extends the loop's batch to m rows would need the
  loop's row indices, which an objective does not see; accumulating features over several batches
  would not give one gradient through a 256-example CKA.
- One forward pass of the target per step gives the logits and, through the hooks, the
  pre-activations: on the loop's batch, or on the loop's batch and the CKA batch concatenated
  (one forward, one batch-norm update, over both; the CE reads the first rows' logits, CKA the
  CKA batch's pre-activations). The guide runs under `torch.no_grad` on the CKA rows.
- `guidance.guidance_steps = N`: the alignment term only for the first N optimisation steps, then
  cross-entropy only, without running the guide at all. With `alpha = 0` (or N = 0) the guide is
  never run and the method is `scratch` bit for bit.
- Measurements per epoch: `ce`, `cka_loss` (the summed 1 - CKA, averaged over *all* the epoch's
  steps, counting 0 for unguided ones) and `guided` (the fraction of the epoch's steps that were
  guided: `cka_loss / guided` is the mean over guided steps). The score is validation accuracy.

Departures from the paper (and its code):
- Their code forwards the target twice per step (once for CE, once for the features): different
  dropout masks and a double batch-norm update. Here one forward.
- Their layer map overwrites when several guide layers map to one target layer (only the last counts);
  here every pair is kept.
- The paper aligns the outputs of conv / linear / attention / norm layers (before the nonlinearity);
  here only the inputs of the nonlinearities, so a conv followed by batch norm counts once (its
  normalised output), and attention / projection outputs not followed by a nonlinearity (in a
  transformer) are not aligned.
- The paper estimates CKA with the biased HSIC on its training batches of 256; here with the
  unbiased HSIC (`estimator: biased` gives the paper's estimator, which on a batch of 64 with
  thousands of features scores even independent representations near 1), by default on the
  downstream block's `batch_size` (50-64; at n = 20, all 20); `cka_examples: 256` gives the paper's
  256 examples per estimate where n_train allows, on a CKA batch drawn apart from the CE batch (the
  paper's CE batch is the same 256), and with batch norm the target's batch statistics then span
  both batches. Effect of 256 against the batch: docs/COMPARISON.md (guidance in its paper's setting).
- The optimiser is the shared loop's AdamW with the downstream settings, not the paper's per-target
  optimiser schedules.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

import tasks
from common.config import Frozen
from common.seeding import seeded_init, stage_seed, torch_generator
from methods.artifacts import ArtifactKind, learnt, register_artifact
from methods.cka import Estimator, cka_of_grams, gram, layer_map
from methods.registry import Method, MethodContext, register_method
from methods.training import Objective, cross_entropy, train
from tasks.base import parse_block


class GuideConfig(Frozen):
    """The `guide:` block of a sweep file."""

    trained: bool = Field(True, description="train the guide on the base task (false: a fresh init)")
    model: dict[str, Any] | None = Field(
        None, description="the guide's architecture, {name: ..., <fields>}; null: the sweep's own model block"
    )

    @field_validator("model")
    @classmethod
    def _model(cls, value):
        if value is None:
            return None
        # Every field, defaults included, so equal architectures have equal keys.
        return parse_block(tasks.MODELS, value, "guide.model").canonical()

    def model_cfg(self) -> Frozen | None:
        """The guide's model block as a validated config (None: the sweep's own model)."""
        return None if self.model is None else parse_block(tasks.MODELS, dict(self.model), "guide.model")


def _guide_model_cfg(settings) -> tuple[Frozen, bool]:
    """The guide's model config and whether it is the sweep's own architecture (`settings`: what
    `ctx.settings` shows the guide kind)."""
    own = settings.model
    block = settings.block("guide")
    if block.model is None or block.model == own.canonical():
        return own, True
    return block.model_cfg(), False


@register_artifact("guide", needs=("source",), blocks=("source",), config=GuideConfig)
class Guide(ArtifactKind):
    """The frozen guide network: the source model itself, another architecture trained like the
    source, or a fresh (untrained) initialisation."""

    def key(self, ctx):
        cfg, own = _guide_model_cfg(ctx.settings)
        trained = ctx.settings.block("guide").trained
        if trained and own:
            return {"source": ctx.key_of("source"), "trained": True}
        return {  # the store adds the blocks it reads: model, source (trained or not) and guide
            "task": ctx.task.key_fields("source"),
            "model": cfg.canonical(),
            "seed": ctx.seed,
            "trained": trained,
            **({"mixed_precision": True} if trained and ctx.mixed_precision else {}),
        }

    def compute(self, ctx):
        cfg, own = _guide_model_cfg(ctx.settings)
        trained = ctx.settings.block("guide").trained
        if trained and own:
            source = ctx.get("source")
            return {n: t.detach().cpu() for n, t in source.state_dict().items()}, {"val_acc": None, "source": True}
        with seeded_init(ctx.seed, "guide_init"):
            model = ctx.task.build_model(cfg)
        model = model.to(ctx.device)
        meta: dict[str, Any] = {"val_acc": None, "source": False}
        if trained:
            result = train(model, ctx.task.base_data(ctx.seed), ctx.settings.source,
                           torch_generator(ctx.seed, "guide_train"), mixed_precision=ctx.mixed_precision)  # fmt: skip
            meta.update(val_acc=result.best_val_acc, best_epoch=result.best_epoch, epochs_run=result.epochs_run)
        return {n: t.detach().cpu() for n, t in model.state_dict().items()}, meta

    def uses(self, settings):  # only the source itself as the guide reads the source
        _, own = _guide_model_cfg(settings)
        return ("source",) if settings.block("guide").trained and own else ()

    def load(self, ctx, tensors, meta):
        cfg, _ = _guide_model_cfg(ctx.settings)
        with seeded_init(ctx.seed, "guide_init"):
            model = ctx.task.build_model(cfg)
        model.load_state_dict(tensors)
        return model.to(ctx.device).eval().requires_grad_(False)  # frozen

    def columns(self, meta):
        return {"guide_val_acc": meta.get("val_acc")}

    def gates(self, meta, chance):  # an untrained guide, or the source itself, has no training to check
        return {"learnt": learnt(meta["val_acc"], chance)} if meta.get("val_acc") is not None else {}


class GuidanceConfig(Frozen):
    """The `guidance:` block of a sweep file."""

    alpha: float = Field(1.0, ge=0, description="weight of the summed (1 - CKA) alignment term")
    guidance_steps: int | None = Field(
        None, ge=0, description="align only for the first N optimisation steps, then CE only (null: always)"
    )
    estimator: Estimator = Field("unbiased", description="the HSIC estimator of CKA: unbiased or biased (the paper's)")
    cka_examples: int | None = Field(
        None,
        ge=4,
        description="CKA on a batch of its own of min(this, n_train) training examples drawn each guided step "
        "(the paper's 256), CE on the loop's batch; null: CKA on the loop's batch",
    )


@register_method(
    "guidance",
    needs=("guide",),
    config=GuidanceConfig,
    description="a fresh model trained on CE + alpha * sum (1 - linear CKA) to a frozen guide's layers",
)
class Guidance(Method):
    def build(self, ctx: MethodContext) -> nn.Module:
        return ctx.fresh

    def objective(self, ctx: MethodContext, model: nn.Module) -> Objective:
        base = cross_entropy(model, ctx.data, ctx.training.eval_batch_size)  # for its score and params
        if not isinstance(ctx.config, GuidanceConfig):
            raise TypeError(f"guidance needs its GuidanceConfig block in ctx.config, got {type(ctx.config).__name__}")
        alpha, limit, estimator = ctx.config.alpha, ctx.config.guidance_steps, ctx.config.estimator
        guide = ctx.artifact("guide")
        pairs: list[tuple[int, int]] = []  # (target, guide) pre-activation indices, set at the first guided step
        rows = None if ctx.config.cka_examples is None else CkaRows(ctx, ctx.config.cka_examples)

        def loss(batch, step):
            x, y = batch["train"].x, batch["train"].y
            if not (alpha > 0 and (limit is None or step < limit)):
                ce = F.cross_entropy(model(x).float(), y)
                if alpha > 0:
                    zero = torch.zeros((), device=ce.device)
                    return ce, {"ce": ce, "cka_loss": zero, "guided": zero}
                return ce, {"ce": ce}
            aligned = x if rows is None else rows.draw()  # the examples CKA is estimated on
            with preactivations(model) as feats:
                # One forward: the loop's batch (for CE), then the CKA batch when it is another.
                logits = model(x if rows is None else torch.cat([x, aligned]))
            if rows is not None:
                logits, feats[:] = logits[: len(x)], [f[len(x) :] for f in feats]
            guide.eval()
            with torch.no_grad(), preactivations(guide) as guide_feats:
                guide(aligned)
            if not pairs:
                pairs.extend(layer_map(len(feats), len(guide_feats)))
            ce = F.cross_entropy(logits.float(), y)
            cka_loss = alignment_loss(feats, guide_feats, pairs, estimator)
            one = torch.ones((), device=ce.device)
            return ce + alpha * cka_loss, {"ce": ce, "cka_loss": cka_loss.detach(), "guided": one}

        if rows is None:
            return dataclasses.replace(base, loss=loss)
        return dataclasses.replace(base, loss=loss, state=rows.state, load_state=rows.load_state)


class CkaRows:
    """The CKA batches of `guidance.cka_examples = m`: each call of `draw` gives min(m, n_train)
    training inputs on the model's device, drawn without replacement (all of them, in order, when
    m >= n_train, without a draw) by a generator of the method's own, seeded by (the method
    stream's seed, "guidance_cka") without drawing from that stream. Its state is the objective's
    (`state` / `load_state`), so a resumed run draws what an uninterrupted one would. The draw runs
    eagerly under torch.compile (`torch.compiler.disable`), so that a compiled run draws the eager
    run's rows at every step (tested)."""

    def __init__(self, ctx: MethodContext, examples: int):
        self.x = ctx.data.train.x.to(ctx.device)
        self.n, self.m = len(self.x), min(examples, len(self.x))
        self.generator = torch.Generator()
        self.generator.manual_seed(stage_seed(ctx.generator.initial_seed(), "guidance_cka"))

    @torch.compiler.disable
    def draw(self) -> torch.Tensor:
        if self.m >= self.n:
            return self.x
        idx = torch.randperm(self.n, generator=self.generator)[: self.m]
        return self.x[idx.to(self.x.device)]

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Hardtanh, nn.Mish)


@contextlib.contextmanager
def preactivations(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of `model` appends to the yielded list the input of each call
    of an activation module (`ACTIVATIONS`), in call order: the model's pre-activations. The inputs
    are cloned, so an in-place activation (torchvision's ReLU) does not overwrite them; gradients
    flow through the clones. Raises if the model has no activation module (nothing to align)."""
    recorded: list[torch.Tensor] = []
    modules = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    if not modules:
        raise ValueError(
            f"guidance aligns pre-activations, the inputs of activation modules, and "
            f"{type(model).__name__} has none (nn.ReLU, nn.GELU, ...): build its nonlinearities as modules"
        )
    handles = [m.register_forward_pre_hook(lambda _m, args: recorded.append(args[0].clone())) for m in modules]
    try:
        yield recorded
    finally:
        for h in handles:
            h.remove()


def preactivation_count(model: nn.Module, x: torch.Tensor) -> int:
    """How many pre-activations one forward of `model` on `x` records (eval mode, no gradient; the
    model's mode is restored)."""
    was_training = model.training
    try:
        with torch.no_grad(), preactivations(model.eval()) as feats:
            model(x)
    finally:
        model.train(was_training)
    return len(feats)


def alignment_loss(
    target_feats: list[torch.Tensor],
    guide_feats: list[torch.Tensor],
    pairs: list[tuple[int, int]],
    estimator: Estimator = "unbiased",
) -> torch.Tensor:
    """sum over pairs (t, g) of 1 - linear CKA(target_feats[t], guide_feats[g]) (flattened per
    example, fp32), each layer's Gram matrix computed once."""
    t_gram = {t: gram(target_feats[t], estimator) for t in {t for t, _ in pairs}}
    g_gram = {g: gram(guide_feats[g], estimator) for g in {g for _, g in pairs}}
    return torch.stack([1 - cka_of_grams(t_gram[t], g_gram[g], estimator) for t, g in pairs]).sum()
