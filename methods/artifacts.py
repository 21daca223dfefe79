"""Artifact kinds: the upstream work trials share, computed once per key.

Each kind declares the kinds it needs, the sweep blocks it reads, the config paths of those that
are grid axes of its trials (`axes`, `shares`, `shorthand`: see `register_artifact`), and four
functions: `key(ctx)` (what determines it besides those blocks), `compute(ctx) -> (tensors, meta)`,
`load(ctx, tensors, meta)` (the object a method receives), and `columns(meta)` (what a trial's row
records about it). `ctx.settings` shows a kind only the blocks it declares (`blocks=`, its own
block, and `model`); reading another raises `common.config.UndeclaredBlock`. The store key is
`key(ctx)` plus every block it may read (`reads`) and, for a plug-in kind (or task, or model), the
hash of its module's source (`code`). A kind that trains the artifacts of several seeds as one pack
(`methods.packing`; source models) sets `packs_seeds` and implements `compute_many`; the
orchestrator asks it to where the sweep packs upstream work (`ctx.packed`, which its key must
hold). The orchestrator never branches on a kind's name: a new kind is one class plus
`@register_artifact(...)`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_serializer
from safetensors.torch import load_file
from torch import nn

from common.config import Frozen, declare_block
from common.registry import Registry
from common.seeding import torch_generator
from methods.discovery import discover_many
from methods.packing import NotPackable, fit_packed
from methods.training import TrainConfig, cross_entropy, evaluate, train


@dataclasses.dataclass
class ArtifactContext:
    """What computing or loading one artifact may draw on."""

    task: Any
    # The trial's effective sweep config, as the kind may read it: its declared blocks and `model`,
    # by attribute (.model, .discovery) or name (.block("guide")); `common.config.Declared`.
    settings: Any
    seed: int
    device: torch.device
    mixed_precision: bool
    fresh_model: Callable[[str], nn.Module]
    key_of: Callable[[str], dict]  # key of an upstream kind
    get: Callable[[str], Any]  # the loaded upstream artifact of a kind
    packed: bool = False  # train packed (kinds with `packs_seeds`, where the sweep packs upstream work)


class ArtifactKind:
    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    blocks: ClassVar[tuple[str, ...]] = ()  # sweep blocks it reads, all in its key (shared by every method needing it)
    axes: ClassVar[tuple[str, ...]] = ()  # config paths (of its blocks) that are grid axes of its trials
    shorthand: ClassVar[dict[str, str]] = {}  # sweep-file keys listing an axis' values: {"sparsities": "mask.sparsity"}
    reported: ClassVar[tuple[str, ...]] = ()  # row columns from `columns(meta)` that the report summarises
    Config: ClassVar[type | None] = None  # the kind's own settings block, under its name in the sweep file
    shares: ClassVar[tuple[str, ...]] = ()  # paths (of `axes`) whose artifacts one `compute_many` computes together
    packs_seeds: ClassVar[bool] = False  # `compute_many` trains the artifacts of several seeds as one pack

    def key(self, ctx: ArtifactContext) -> dict:
        """What determines the artifact besides the blocks it reads (the store adds those): its
        upstream keys (`ctx.key_of`), seed, the task's fields of its stage."""
        ...

    def compute(self, ctx: ArtifactContext) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def compute_many(self, contexts: list[ArtifactContext]) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """The artifacts of `contexts` (whose settings differ only at the `shares` paths, or with
        `packs_seeds` in their seed), each as `compute` would give it. Only kinds with `shares` or
        `packs_seeds` are asked."""
        raise NotImplementedError(f"artifact kind {self.name!r} declares no shared axes")

    def load(self, ctx: ArtifactContext, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any: ...

    def columns(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {}

    def uses(self, settings: Any) -> tuple[str, ...]:
        """The kinds of `needs` that this artifact reads under `settings` (what `ctx.settings` shows
        it): all of them unless a kind says otherwise. A trial computes, loads and gates on only
        these, so a kind left unread by a configuration neither costs time nor gates its findings."""
        return self.needs

    def gates(self, meta: dict[str, Any], chance: float) -> dict[str, bool]:
        """Quality gates: name -> whether this artifact passed it, `chance` being the task's chance
        accuracy. A trial needing an artifact that failed one records it (`gates_failed`) and the
        report gates its findings: a comparison built on a source that never learnt says nothing."""
        return {}


def learnt(accuracy: float | None, chance: float) -> bool:
    """The gates' rule, fixed before any result is read: an accuracy at least halfway from chance to 1."""
    return accuracy is not None and accuracy >= (1 + chance) / 2


ARTIFACTS = Registry("artifact kind")


def register_artifact(
    name: str,
    *,
    needs: tuple[str, ...] = (),
    blocks: tuple[str, ...] = (),
    axes: tuple[str, ...] = (),
    shares: tuple[str, ...] = (),
    shorthand: dict[str, str] | None = None,
    packs_seeds: bool = False,
    config: type | None = None,
):
    """Register an `ArtifactKind` class. `blocks`: sweep blocks it reads (all it can read, with
    `model` and its own block; each enters its key); `config`: a settings block of its own, written
    under `name` in the sweep file (`guide: {...}`), tunable and sweepable by path. `axes`: paths of
    its blocks that are grid axes of every trial needing it (one value, the block's, unless the
    sweep's `axes:` lists more); `shares`: those whose artifacts one `compute_many` computes (paths
    no kind it needs reads); `shorthand`: sweep-file keys listing an axis's values (`sparsities: [..]`
    is `axes: {mask.sparsity: [..]}`). `packs_seeds`: `compute_many` trains the artifacts of several
    seeds as one pack (the kind needs no other kind, whose artifacts would differ by seed too)."""
    readable = (*blocks, *((name,) if config is not None else ()))
    shorthand = dict(shorthand or {})
    if packs_seeds and needs:
        raise ValueError(f"artifact kind {name!r}: a kind that packs seeds cannot need other kinds ({needs})")
    if any(path.split(".")[0] not in readable or "." not in path for path in axes):
        raise ValueError(f"artifact kind {name!r}: axes {tuple(axes)} must be paths of the blocks it reads {readable}")
    if any(path not in axes for path in (*shares, *shorthand.values())):
        raise ValueError(f"artifact kind {name!r}: shares and shorthand must name its axes {tuple(axes)}")

    def add(cls):
        unknown = [n for n in needs if n not in ARTIFACTS]
        if unknown:
            raise ValueError(f"artifact kind {name!r} needs {unknown}, which are not registered (register them first)")
        upstream = {block for kind in closure(needs) for block in ARTIFACTS.get(kind).blocks}
        if any(path.split(".")[0] in upstream for path in shares):
            raise ValueError(f"artifact kind {name!r}: shares {tuple(shares)}, but a kind it needs reads that block")
        cls.name, cls.needs, cls.blocks, cls.axes = name, tuple(needs), readable, tuple(axes)
        cls.Config, cls.shares, cls.shorthand, cls.packs_seeds = config, tuple(shares), shorthand, packs_seeds
        ARTIFACTS.register(name)(cls())
        return cls

    return add


def closure(kinds: tuple[str, ...] | list[str], uses: Callable[[str], tuple[str, ...]] | None = None) -> list[str]:
    """`kinds` and everything they need, each after what it needs; `uses(kind)`: the kinds it needs
    in one configuration (`ArtifactKind.uses`), its declared `needs` without it."""
    out: list[str] = []

    def visit(kind: str) -> None:
        for dep in uses(kind) if uses else ARTIFACTS.get(kind).needs:
            visit(dep)
        if kind not in out:
            out.append(kind)

    for kind in kinds:
        visit(kind)
    return out


@declare_block("source")
class SourceTraining(TrainConfig):
    """The `source:` block, source-model training: the paper's AdamW 5e-4, batch 50, stopping once
    validation saturates.

    The paper's code instead trains with weight decay 0 and a linear learning-rate decay, and keeps
    the epoch of lowest validation loss, stopping after 10 epochs without a lower one
    (`weight_decay: 0, lr_schedule: linear, select: val_loss, patience: 10, target_val_acc: null`;
    docs/PAPER-SETTINGS.md)."""

    lr: float = Field(5e-4, gt=0)
    epochs: int = Field(20, ge=1)
    target_val_acc: float | None = Field(0.999, gt=0, le=1)
    patience: int | None = Field(5, ge=1)
    pretrained: str | None = Field(
        None,
        description="load the source from this local Hugging Face folder or safetensors file instead of training "
        "it (its sha256 enters the source's key)",
    )

    @model_serializer(mode="wrap")
    def _pretrained_only_when_set(self, handler) -> dict:
        """Every field, `pretrained` only when set: sweeps that train their source keep the trial
        identities and artifact keys they had before the field existed."""
        out = handler(self)
        if out.get("pretrained", 0) is None:
            del out["pretrained"]
        return out


def pretrained_file(path: str) -> Path:
    """The weights file of a local pretrained model: `path` itself, or in a Hugging Face folder its
    `model.safetensors` (else `pytorch_model.bin`). Nothing is downloaded: a missing path is an error."""
    where = Path(path).expanduser()
    if where.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (where / name).is_file():
                return where / name
        raise ValueError(f"source.pretrained: {where} holds neither model.safetensors nor pytorch_model.bin; "
                         "save the model there with save_pretrained(), or point at a safetensors file")  # fmt: skip
    if not where.is_file():
        raise ValueError(f"source.pretrained: {where} does not exist (a local folder or file; nothing is downloaded)")
    return where


@functools.lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (cached while its size and modification time stay)."""
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def load_pretrained(model: nn.Module, path: str) -> nn.Module:
    """Load the weights at `path` (`pretrained_file`) into `model`, safely (safetensors, or
    `torch.load(weights_only=True)`). A model may translate the file's names with a
    `pretrained_state(state) -> state` (hf_gpt2 reads Hugging Face's). Every name and shape must
    match: the error lists what differs."""
    file = pretrained_file(path)
    if file.suffix == ".safetensors":
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    translate = getattr(model, "pretrained_state", None)
    state = translate(state) if translate is not None else state
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(f"{what}: {names[:5]}{' ...' if len(names) > 5 else ''}"
                            for what, names in (("missing", missing), ("unexpected", unexpected),
                                                ("other shapes", wrong)) if names)  # fmt: skip
        raise ValueError(f"source.pretrained: {file} does not fit model {type(model).__name__} as the sweep builds it "
                         f"({details}); set the model block to the pretrained model's architecture")  # fmt: skip
    model.load_state_dict(state)
    return model


@register_artifact("source", blocks=("source",), packs_seeds=True)
class Source(ArtifactKind):
    """The source model trained on the base task: one per (task's base data, model, source training,
    seed). Where the sweep packs upstream work (`ctx.packed`), the sources of several seeds train as
    one pack (`fit_packed`), a lone one as a pack of one, and the key says `packed`."""

    reported = ("source_val_acc",)

    def key(self, ctx):  # the store adds the model and source blocks (`reads`)
        pretrained = ctx.settings.source.pretrained
        if pretrained is not None:  # loaded, not trained: the file's bytes determine it (and the task's val data)
            return {"task": ctx.task.key_fields("source"), "seed": ctx.seed,
                    "pretrained_sha256": file_digest(pretrained_file(pretrained))}  # fmt: skip
        return {
            "task": ctx.task.key_fields("source"),
            "seed": ctx.seed,
            # bfloat16 on GPU changes the numbers (masks inherit this through their source key)
            **({"mixed_precision": True} if ctx.mixed_precision else {}),
            # packed training follows the serial loop within float rounding, not bit for bit
            **({"packed": True} if ctx.packed else {}),
        }

    def compute(self, ctx):
        if ctx.settings.source.pretrained is not None:
            return self._pretrained(ctx)
        return self.compute_many([ctx])[0] if ctx.packed else self._alone(ctx)

    def compute_many(self, contexts):
        """The sources of `contexts` (one per seed, all `packed`) as one pack. A pack refused for its
        mix (say, base data of different sizes) trains each as a pack of one; a model refused alone
        trains with the serial loop (its meta says why). A model that diverges fails the whole run,
        its error re-raised: the trials then compute each source as a pack of one."""
        if contexts[0].settings.source.pretrained is not None:
            return [self._pretrained(c) for c in contexts]
        if not all(c.packed for c in contexts):
            raise ValueError("compute_many packs sources: every context must be `packed` (its key says so)")
        ctx, cfg = contexts[0], contexts[0].settings.source
        models = [c.fresh_model("source_init").to(c.device) for c in contexts]
        datas = [c.task.base_data(c.seed) for c in contexts]
        objectives = [cross_entropy(m, d, cfg.eval_batch_size) for m, d in zip(models, datas, strict=True)]
        generators = [torch_generator(c.seed, "source_train") for c in contexts]
        try:
            results = fit_packed(objectives, datas, cfg, generators, mixed_precision=ctx.mixed_precision)
        except NotPackable as refused:  # before any training
            if len(contexts) > 1:
                return [self.compute_many([c])[0] for c in contexts]
            return [self._alone(ctx, f"not packable: {refused}")]
        for c, result in zip(contexts, results, strict=True):
            if isinstance(result, BaseException):
                result.add_note(f"the source model of seed {c.seed}, trained in a pack of {len(contexts)}")
                raise result
        return [
            (m.state_dict(), {**self._meta(r), "pack": len(contexts)}) for m, r in zip(models, results, strict=True)
        ]

    def _alone(self, ctx, why: str | None = None):
        model = ctx.fresh_model("source_init").to(ctx.device)
        generator = torch_generator(ctx.seed, "source_train")
        result = train(model, ctx.task.base_data(ctx.seed), ctx.settings.source, generator,
                       mixed_precision=ctx.mixed_precision)  # fmt: skip
        return model.state_dict(), {**self._meta(result), **({"pack": 1, "alone": why} if why else {})}

    def _pretrained(self, ctx):
        """The source read from `source.pretrained` (no training), scored on the base task's validation split."""
        model = load_pretrained(ctx.fresh_model("source_init"), ctx.settings.source.pretrained).to(ctx.device)
        val = ctx.task.base_data(ctx.seed).val.to(ctx.device)
        cfg = ctx.settings.source
        acc = evaluate(model, val, cfg.eval_batch_size)["y"]
        return model.state_dict(), {"val_acc": acc, "best_epoch": 0, "epochs_run": 0, "pretrained": cfg.pretrained}

    @staticmethod
    def _meta(result):
        return {"val_acc": result.best_val_acc, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}

    def load(self, ctx, tensors, meta):
        model = ctx.fresh_model("source_init")
        model.load_state_dict(tensors)
        return model.to(ctx.device)

    def columns(self, meta):
        return {"source_val_acc": meta["val_acc"]}

    def gates(self, meta, chance):
        return {"learnt": learnt(meta["val_acc"], chance)}


class MaskConfig(Frozen):
    """The `mask:` block: what a discovered mask is asked for besides its `discovery:` settings."""

    sparsity: float = Field(0.75, ge=0, lt=1, description="the fraction of the masked weights set to 0")


@register_artifact(
    "mask",
    needs=("source",),
    blocks=("discovery",),
    config=MaskConfig,
    axes=("mask.sparsity",),
    shares=("mask.sparsity",),
    shorthand={"sparsities": "mask.sparsity"},
)
class DiscoveredMask(ArtifactKind):
    """The subnetwork discovered in the source model on the subtask, at `mask.sparsity` (an axis of
    every trial that needs a mask: `sparsities: [..]` lists its values). The sparsities of one
    source and discovery setting come from one discovery run (`discover_many`). The report compares
    masks and draws them against sparsity through the extras in `methods.mask_reports`."""

    reported = ("mask_density", "subtask_acc", "natural_density")  # its report extras: methods/mask_reports.py

    def key(self, ctx):  # the store adds the discovery and mask blocks (`reads`)
        return {"source": ctx.key_of("source"), "subtask": ctx.task.key_fields("subtask")}

    def compute(self, ctx):
        return self.compute_many([ctx])[0]

    def compute_many(self, contexts):
        ctx = contexts[0]
        found = discover_many(
            copy.deepcopy(ctx.get("source")),
            ctx.task.subtask_data(ctx.seed),
            ctx.settings.discovery,
            tuple(c.settings.mask.sparsity for c in contexts),
            torch_generator(ctx.seed, "discovery"),
            mixed_precision=ctx.mixed_precision,
        )
        return [(one.mask, self._meta(one)) for one in found]

    @staticmethod
    def _meta(found):  # every field of the Discovery but its mask
        return {f.name: getattr(found, f.name) for f in dataclasses.fields(found) if f.name != "mask"}

    def load(self, ctx, tensors, meta):
        return {name: t.bool() for name, t in tensors.items()}

    def columns(self, meta):
        return {"mask_density": meta["density"], "subtask_acc": meta["subtask_acc"],
                "natural_density": meta["natural_density"]}  # fmt: skip

    def gates(self, meta, chance):
        return {"computes_subtask": learnt(meta["subtask_acc"], chance)}
