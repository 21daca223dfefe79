"""`shapes`: the paper's shape-bias experiment (METHOD.md, Experiment 2) on procedural images.

Class k is shape k carrying texture k (Trifeature style, see `tasks.shapes_render`); colour, pose,
scale and texture phase vary at random. Splits:

- `textured` (shape and texture agree): base training of the source, downstream training (a budget
  of the pool), validation and test;
- `silhouette` (the shape in one flat colour, no texture): the subtask the mask is discovered on, the
  analogue of the paper's mean-pooled images; also a test split;
- `cue_conflict` (shape of class i, texture of class j != i): shape bias = shape decisions /
  (shape decisions + texture decisions); `cue_conflict_val` (n_val images, its own stream): the
  same on validation images, for choosing settings without looking at the test split;
- `texture_only` (texture over the whole frame, no shape): accuracy against the texture's class.

Two variants (docs/VISION.md), both off by default and both absent from every key when off:

- `cue: {kind: box, fraction, downstream_fraction}` (seed 003, CBFT): a small box whose position
  names the class, written after normalisation on a fraction of the source's images; adds the `cued`
  training stream downstream (the source's own training images, `fraction` of them boxed: the cue
  model's training distribution, which CBFT's authors zip with the small clean set) and the `cue`,
  `randomised_cue` and `randomised_image` evaluations, each also on the validation images
  (`cue_val`, `randomised_cue_val`, `randomised_image_val`) for choosing settings.
- `bias: {feature: colour | texture, p}` (seed 001, OccamNets): in the training distribution (base,
  base_val, pool, val) the feature takes the class's value with probability p; `test` is unbiased and
  `bias_aligned` shows the other side of the gap.

A third option, also off by default and absent from every key when off, sets what the source is
trained on (issue 22 item 6, budgets that mean the same for every method):

- `source_textures: other_family`: the source's images (base, base_val) carry textures drawn uniformly
  at random from the family the downstream task never uses (`TEXTURES[n_classes:]`), so texture says
  nothing about the class there and the source must learn shape. No source image is a downstream
  image or has a downstream texture: the downstream texture-class pairing, the downstream task's easy
  cue, is seen only in the n downstream images, by every method alike. The shape classes are the
  same, so the source's head reads the downstream classes: its zero-shot accuracy is defined (the
  `n = 0` row, `data_fraction: 0`), and every method built from the source runs unchanged.

Every split is a pure function of (generator settings, split name, seed) and is cached on disk as a
uint8 `.npz` (loaded with `allow_pickle=False`).
"""

from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_serializer, model_validator
from torch import nn

from common.config import Frozen, stable_hash
from common.seeding import numpy_generator
from tasks.base import Feeds, Images, Split, StageData, build_model_for, register_task
from tasks.shapes_render import COLOURS, SHAPES, TEXTURES, box_layout, paint_boxes, render

GENERATOR_VERSION = 2  # bump when rendering changes: cached splits and artifacts keyed on it are redone
MEAN, STD = 0.5, 0.25  # inputs are (pixel / 255 - MEAN) / STD
BOX_VALUE = (1 - MEAN) / STD  # the cue box: white in every channel, the largest normalised value
TRAINING_SPLITS = ("base", "base_val", "pool", "val")  # the training distribution, validation included


class CueConfig(Frozen):
    """A class-coding box (seed 003, CBFT). `fraction` of the source's images (base and base_val)
    carry their class's box; downstream training images carry it on `downstream_fraction`."""

    kind: Literal["box"] = "box"
    fraction: float = Field(0.6, ge=0, le=1, description="share of source images with the box (CBFT: 0.6)")
    downstream_fraction: float = Field(0.0, ge=0, le=1, description="share of downstream training images with it")


class BiasConfig(Frozen):
    """A feature that predicts the class in training (seed 001, Biased MNIST): with probability p it
    takes the class's value (colour k mod 10, or texture k), else a uniformly random other value.
    `both`: two bias variables, colour and texture, each drawn so on its own stream (independently
    of each other given the class), as Biased MNIST's seven are."""

    feature: Literal["colour", "texture", "both"]
    p: float = Field(0.95, ge=0, le=1, description="probability that the feature agrees with the class in training")


class ShapesConfig(Frozen):
    name: Literal["shapes"] = "shapes"
    n_classes: int = Field(10, ge=2, le=len(SHAPES))
    image_size: int = Field(32, ge=16, le=128)
    n_base: int = Field(10_000, ge=10, description="textured images for the source model")
    n_subtask: int = Field(5_000, ge=10, description="silhouettes for mask discovery")
    pool_size: int = Field(5_000, ge=1, description="textured downstream pool; n = fraction * pool_size")
    n_val: int = Field(1_000, ge=10)
    n_test: int = Field(2_000, ge=10, description="size of each test split")
    texture_rotation: float = Field(
        0.0,
        ge=0,
        le=180,
        description="textures turn by up to this many degrees; 0 keeps them upright, which makes texture the "
        "easy cue and scratch CNNs texture-biased (see docs/VISION.md)",
    )
    cache_dir: str | None = Field(None, description="where splits are cached; default ~/.cache/instill/shapes")
    cue: CueConfig | None = Field(None, description="the CBFT cue variant (a class-coding box); None: no cue")
    bias: BiasConfig | None = Field(None, description="the biased variant (colour or texture predicts the class)")
    source_textures: Literal["downstream", "other_family"] = Field(
        "downstream",
        description="the source's textures: 'downstream' (class k wears texture k, as downstream: the source is "
        "trained on the downstream task itself) or 'other_family' (textures drawn at random from those the "
        "downstream task never uses, TEXTURES[n_classes:]: the source learns shape, never a downstream image)",
    )
    not_identity: ClassVar[tuple[str, ...]] = ("cache_dir",)  # moving the cache changes no result

    @model_serializer(mode="wrap")
    def _variants_only_when_set(self, handler) -> dict:
        """Every field, but `cue`, `bias` and `source_textures` only when set, in every dump (nested in a
        sweep too): the plain task's trial identity and config hash stay what they were before the
        variants existed."""
        out = handler(self)
        for variant in ("cue", "bias"):
            if out.get(variant, 0) is None:
                del out[variant]
        if out.get("source_textures") == "downstream":
            del out["source_textures"]
        return out

    @model_validator(mode="after")
    def _other_family_exists(self) -> ShapesConfig:
        if self.source_textures == "other_family" and len(TEXTURES) - self.n_classes < 2:
            raise ValueError(
                f"source_textures: other_family needs at least 2 textures beyond the {self.n_classes} classes' "
                f"({len(TEXTURES)} exist); use n_classes <= {len(TEXTURES) - 2}"
            )
        return self


def _normalise(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).float() / 255.0 - MEAN) / STD


@register_task("shapes")
class Shapes:
    """Procedural shape/texture images; see the module docstring."""

    Config = ShapesConfig
    default_analyses = ("splits", "shape_bias", "calibration")

    def __init__(self, config: ShapesConfig):
        self.config = config
        # n = 0 (no downstream image: every method as it comes, the source's zero-shot accuracy) is a
        # budget only where the source is not trained on the downstream task itself
        self.trains_on_zero = config.source_textures != "downstream"
        if len(TEXTURES) < config.n_classes:
            raise ValueError(f"only {len(TEXTURES)} textures for {config.n_classes} classes")

    # --- generation and cache ---------------------------------------------------------------

    def _generator_fields(self) -> dict:
        c = self.config
        return {"name": c.name, "version": GENERATOR_VERSION, "n_classes": c.n_classes, "image_size": c.image_size,
                "texture_rotation": c.texture_rotation}  # fmt: skip

    @property
    def cache_dir(self) -> Path:
        return Path(self.config.cache_dir or Path.home() / ".cache" / "instill" / "shapes").expanduser()

    def _bias_draw(self, split: str) -> dict | None:
        """How `split` differs from the plain task's under `bias` (None: not at all, same cache file).
        Training splits draw the feature biased; `test` draws it independently of the class (colour
        already is so in the plain task); `bias_aligned` (the test split's stream) sets it to the
        class's value (texture already is so in the plain task: then it renders the plain test images)."""
        b = self.config.bias
        if b is None:
            return None
        if split in TRAINING_SPLITS:
            return {"feature": b.feature, "draw": "biased", "p": b.p}
        if split == "test" and b.feature in ("texture", "both"):
            return {"feature": b.feature, "draw": "uniform"}
        if split == "bias_aligned" and b.feature in ("colour", "both"):
            return {"feature": b.feature, "draw": "aligned"}
        return None

    def _feature_draws(self, split: str) -> dict[str, dict]:
        """Per bias variable (colour, texture), how `split` draws it ({}: as the plain task). Under
        `both`, only the variables the plain split does not already draw so: the test split draws
        texture uniformly (colour already is), `bias_aligned` sets colour (texture already is)."""
        draw = self._bias_draw(split)
        if draw is None:
            return {}
        if draw["feature"] != "both":
            return {draw["feature"]: draw}
        if draw["draw"] == "uniform":
            return {"texture": draw}
        if draw["draw"] == "aligned":
            return {"colour": draw}
        return {"colour": draw, "texture": draw}

    @functools.lru_cache(maxsize=16)  # noqa: B019 - a task object lives for one trial
    def split_arrays(self, split: str, n: int, seed: int) -> dict[str, np.ndarray]:
        """images uint8 [n, 3, S, S], shape ids and texture ids (and colour ids where a colour bias
        set them), from the cache or freshly rendered. Cached images carry no cue box: it is written
        on the normalised images (`_cued`), so the cue needs no cache of its own."""
        key = {**self._generator_fields(), "split": split, "n": n, "seed": seed}
        if (draw := self._bias_draw(split)) is not None:
            key["bias"] = draw  # only when set: every plain split keeps its file
        if self._other_family(split):
            key["source_textures"] = "other_family"  # likewise
        path = self.cache_dir / f"{split}-{stable_hash(key, 20)}.npz"
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    optional = ("colour",) if "colour" in f.files else ()
                    return {k: f[k] for k in ("images", "shape", "texture", *optional)}
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)  # a damaged cache file is regenerated
        arrays = self._render(split, n, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return arrays

    def _other_family(self, split: str) -> bool:
        """Whether `split` is the source's and draws its textures from the other family."""
        return self.config.source_textures == "other_family" and split in ("base", "base_val")

    def _render(self, split: str, n: int, seed: int) -> dict[str, np.ndarray]:
        k = self.config.n_classes
        # `bias_aligned` replays the test split's stream: the same shapes and poses, aligned feature
        rng = numpy_generator(seed, f"shapes:{'test' if split == 'bias_aligned' else split}")
        shape = rng.permutation(np.arange(n) % k)  # exactly balanced classes
        if split in ("cue_conflict", "cue_conflict_val"):
            texture = (shape + rng.integers(1, k, n)) % k  # any other class, uniformly
        else:
            texture = shape.copy()
        if split in ("subtask", "subtask_val", "silhouette_test"):
            mode = "silhouette"
        elif split == "texture_only":
            mode = "texture_only"
        else:
            mode = "textured"
        colour = None
        for feature, draw in self._feature_draws(split).items():
            # its own stream, so that `rng` (and with it every pose) is the plain split's; under
            # `both` texture gets a second one, so the two variables are independent given the class
            second = feature == "texture" and draw["feature"] == "both"
            stream = f"shapes:bias:texture:{split}" if second else f"shapes:bias:{split}"
            n_values = len(COLOURS) if feature == "colour" else k
            value = _draw_feature(numpy_generator(seed, stream), shape % n_values, n_values, draw)
            if feature == "colour":
                colour = value
            else:
                texture = value
        if self._other_family(split):
            # its own stream, as the bias draws: every pose stays the plain split's
            texture = numpy_generator(seed, f"shapes:source_textures:{split}").integers(k, len(TEXTURES), n)
        images = render(shape, texture, rng, self.config.image_size, k, mode=mode,
                        texture_rotation=self.config.texture_rotation, colour_ids=colour)  # fmt: skip
        out = {"images": images, "shape": shape.astype(np.int64), "texture": texture.astype(np.int64)}
        return out if colour is None else {**out, "colour": colour.astype(np.int64)}

    def _split(self, split: str, n: int, seed: int, labels: tuple[str, ...] = ("y",)) -> Split:
        arrays = self.split_arrays(split, n, seed)
        sources = {"y": arrays["texture"] if split == "texture_only" else arrays["shape"],
                   "shape": arrays["shape"], "texture": arrays["texture"]}  # fmt: skip
        return Split(_normalise(arrays["images"]), {name: torch.from_numpy(sources[name]) for name in labels})

    # --- the cue box ---------------------------------------------------------------------------

    def _cue_fields(self) -> dict:
        """What the cue changes in the source's data: its settings and the box geometry."""
        c = self.config
        side, corner = box_layout(c.image_size, c.n_classes)
        return {"kind": c.cue.kind, "fraction": c.cue.fraction, "box_side": side, "box_value": BOX_VALUE,
                "positions": corner.tolist()}  # fmt: skip

    def cued_rows(self, stream: str, n: int, fraction: float, seed: int) -> np.ndarray:
        """[n] bool: which of n images carry the cue, exactly round(fraction * n) of them, drawn from
        the named stream `shapes:cue:<stream>`."""
        chosen = numpy_generator(seed, f"shapes:cue:{stream}").permutation(n)[: round(fraction * n)]
        rows = np.zeros(n, dtype=bool)
        rows[chosen] = True
        return rows

    def _cued(self, split: Split, box_class: np.ndarray, labels: dict[str, np.ndarray] | None = None) -> Split:
        """`split` with the box of class box_class[i] on image i (none where it is -1), relabelled
        with `labels` (numpy arrays) where given."""
        c = self.config
        x = paint_boxes(split.x, box_class, c.image_size, c.n_classes, BOX_VALUE)
        if labels is None:
            return Split(x, split.labels)
        return Split(x, {name: torch.from_numpy(v.astype(np.int64)) for name, v in labels.items()})

    def _cued_fraction(self, split: Split, stream: str, fraction: float, seed: int) -> Split:
        """`split` with its true class's box on `fraction` of its images."""
        y = split.y.numpy()
        return self._cued(split, np.where(self.cued_rows(stream, len(split), fraction, seed), y, -1))

    def _cue_evals(self, test: Split, seed: int, suffix: str = "") -> dict[str, Split]:
        """CBFT's evaluations on the (clean) test images: `cue` (the true class's box), `randomised_cue`
        (the box of a uniformly random other class; y the image's class, reading `cue` the box's) and
        `randomised_image` (the box of a class the image is not; y the box's class, reading `shape`
        the image's). With `suffix="_val"`, the same on the validation images (their own streams), for
        choosing settings (e.g. `training.select: {split: randomised_image_val, label: shape}`)."""
        k, y = self.config.n_classes, test.y.numpy()
        random_cue, random_image = (
            (y + numpy_generator(seed, f"shapes:cue:{stream}{suffix}").integers(1, k, len(y))) % k  # any other class
            for stream in ("randomised_cue", "randomised_image")
        )
        return {
            f"cue{suffix}": self._cued(test, y),
            f"randomised_cue{suffix}": self._cued(test, random_cue, {"y": y, "cue": random_cue}),
            f"randomised_image{suffix}": self._cued(test, random_image, {"y": random_image, "shape": y}),
        }

    # --- stages -----------------------------------------------------------------------------

    def key_fields(self, stage: str) -> dict:
        c = self.config
        if stage == "source":
            out = {**self._generator_fields(), "n_base": c.n_base, "n_val": c.n_val}
            if c.cue is not None:  # only when set: the plain task's source keeps its key
                out["cue"] = self._cue_fields()
            if c.bias is not None:
                out["bias"] = {"feature": c.bias.feature, "p": c.bias.p}
            if c.source_textures != "downstream":
                out["source_textures"] = c.source_textures
            return out
        if stage == "subtask":
            return {**self._generator_fields(), "n_subtask": c.n_subtask, "n_val": c.n_val}
        raise ValueError(f"unknown stage {stage!r}; use 'source' or 'subtask'")

    def base_data(self, seed: int) -> StageData:
        c = self.config
        train, val = self._split("base", c.n_base, seed), self._split("base_val", c.n_val, seed)
        if c.cue is not None:  # validation is the source's own distribution: cued alike
            train = self._cued_fraction(train, "base", c.cue.fraction, seed)
            val = self._cued_fraction(val, "base_val", c.cue.fraction, seed)
        return StageData(train, val)

    def subtask_data(self, seed: int) -> StageData:
        c = self.config
        return StageData(self._split("subtask", c.n_subtask, seed), self._split("subtask_val", c.n_val, seed))

    def downstream_size(self, data_fraction: float) -> int:
        return int(round(data_fraction * self.config.pool_size))

    def downstream_data(self, seed: int, data_fraction: float) -> StageData:
        c = self.config
        n = self.downstream_size(data_fraction)
        if n < 1 and not self.trains_on_zero:
            raise ValueError(
                f"data fraction {data_fraction} of pool_size {c.pool_size} leaves no training images; n = 0 is a "
                "budget only with source_textures: other_family (the source then never saw the downstream task)"
            )
        pool = self._split("pool", c.pool_size, seed)
        train = Split(pool.x[:n], {"y": pool.y[:n]})
        test, val = self._split("test", c.n_test, seed), self._split("val", c.n_val, seed)
        evals = {
            "test": test,
            "silhouette": self._split("silhouette_test", c.n_test, seed),
            "cue_conflict": self._split("cue_conflict", c.n_test, seed, labels=("shape", "texture")),
            # Shape bias on validation images (their own stream): what settings are chosen on.
            "cue_conflict_val": self._split("cue_conflict_val", c.n_val, seed, labels=("shape", "texture")),
            "texture_only": self._split("texture_only", c.n_test, seed),
        }
        streams = {}
        if c.bias is not None:
            evals["bias_aligned"] = self._split("bias_aligned", c.n_test, seed)
        if c.cue is not None:
            # CBFT's cued set: the cue model's own training images, boxed on `fraction` of them
            streams["cued"] = self.base_data(seed).train
            train = self._cued_fraction(train, "pool", c.cue.downstream_fraction, seed)
            evals.update(self._cue_evals(test, seed))
            evals.update(self._cue_evals(val, seed, "_val"))
        return StageData(train=train, val=val, evals=evals, streams=streams)

    PROBE_SETS: ClassVar[tuple[str, ...]] = ("in_distribution", "cue_conflict")

    def probe_features(self, seed: int, on: str = "in_distribution") -> tuple[Split, Split]:
        """(fit, eval) splits for representation analyses, labelled with features (not targets).

        `in_distribution` (the default): the two halves of the `test` split, images of the training
        distribution, labelled with `shape` (the class: what every model here is trained to compute;
        the texture there is the shape's, so it has no label of its own, except under a texture bias,
        whose test split draws texture independently and labels it) and `colour` (drawn independently
        of the class; under a colour bias the test split draws it uniformly). `cue_conflict`: the two halves of the
        `cue_conflict` split, labelled `shape`, `texture` and `colour`: only there do shape and
        texture vary apart, but the images are out of the training distribution (texture never equals
        shape), so this set answers which cue a representation carries, not how it is organised on the
        data it was trained on. Texture there is any class but the shape's, near-independent of it (a
        layer coding shape alone explains about 1/(k-1)^2 of its variance by texture).

        Colour is not stored with plain images: it is recovered by replaying the split's random stream
        up to `render`'s first draw (`_render`'s class permutation, the texture offsets of the
        cue-conflict split, then the colour index), and the replayed shapes and textures are checked
        against the stored ones. Neither variant writes a box on these splits."""
        from tasks.shapes_render import COLOURS

        if on not in self.PROBE_SETS:
            raise ValueError(f"shapes: no probe set {on!r}; choose one of {list(self.PROBE_SETS)}")
        split = "test" if on == "in_distribution" else "cue_conflict"
        k, n = self.config.n_classes, self.config.n_test
        arrays = self.split_arrays(split, n, seed)
        rng = numpy_generator(seed, f"shapes:{split}")
        shape = rng.permutation(np.arange(n) % k)
        # a texture bias draws the test split's textures on their own stream: they are stored
        texture = (shape + rng.integers(1, k, n)) % k if split == "cue_conflict" else arrays["texture"]
        colour = rng.integers(0, len(COLOURS), n)
        if not (np.array_equal(shape, arrays["shape"]) and np.array_equal(texture, arrays["texture"])):
            raise RuntimeError(f"shapes: replaying the {split} split gave other labels; the colour replay is stale")
        colour = arrays.get("colour", colour).astype(np.int64)  # a colour bias stores the colours it drew
        features = {"shape": arrays["shape"], "texture": arrays["texture"], "colour": colour}
        if np.array_equal(arrays["shape"], arrays["texture"]):
            del features["texture"]  # the same labels: the same R², shown once, as shape
        whole = Split(_normalise(arrays["images"]), {name: torch.from_numpy(v) for name, v in features.items()})
        return whole.take(torch.arange(n // 2)), whole.take(torch.arange(n // 2, n))

    def feeds(self) -> Feeds:
        """RGB images of `image_size` px, `n_classes` shape classes."""
        return Feeds(Images(size=self.config.image_size), n_classes=self.config.n_classes)

    def build_model(self, model_config: Frozen) -> nn.Module:
        return build_model_for(self, model_config)


def _draw_feature(rng: np.random.Generator, aligned: np.ndarray, n_values: int, draw: dict) -> np.ndarray:
    """A bias feature value per image: `aligned` (the class's value) with probability p and else a
    uniformly random other value ('biased'), independent of the class ('uniform'), or `aligned`."""
    n = len(aligned)
    if draw["draw"] == "biased":
        keep = rng.random(n) < draw["p"]
        return np.where(keep, aligned, (aligned + rng.integers(1, n_values, n)) % n_values)
    if draw["draw"] == "uniform":
        return rng.integers(0, n_values, n)
    return aligned.copy()
