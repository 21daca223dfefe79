"""`shapes`: the paper's shape-bias experiment (METHOD.md, Experiment 2) on procedural images.

Class k is shape k carrying texture k (Trifeature style, see `tasks.shapes_render`); colour, pose,
scale and texture phase vary at random. Splits:

- `textured` (shape and texture agree): base training of the source, downstream training (a budget
  of the pool), validation and test;
- `silhouette` (the shape in one flat colour, no texture): the subtask the mask is discovered on, the
  analogue of the paper's mean-pooled images; also a test split;
- `cue_conflict` (shape of class i, texture of class j != i): shape bias = shape decisions /
  (shape decisions + texture decisions);
- `texture_only` (texture over the whole frame, no shape): accuracy against the texture's class.

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
from pydantic import Field
from torch import nn

from common.config import Frozen, stable_hash
from common.seeding import numpy_generator
from tasks.base import Split, StageData, build_model_for, register_task
from tasks.shapes_render import SHAPES, TEXTURES, render

GENERATOR_VERSION = 2  # bump when rendering changes: cached splits and artifacts keyed on it are redone
MEAN, STD = 0.5, 0.25  # inputs are (pixel / 255 - MEAN) / STD


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
    not_identity: ClassVar[tuple[str, ...]] = ("cache_dir",)  # moving the cache changes no result


def _normalise(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).float() / 255.0 - MEAN) / STD


@register_task("shapes")
class Shapes:
    """Procedural shape/texture images; see the module docstring."""

    Config = ShapesConfig
    supported_models = ("resnet18", "vit", "mlp", "plain_cnn")
    trains_on_zero = False  # downstream training needs at least one textured image
    default_analyses = ("splits", "shape_bias")

    def __init__(self, config: ShapesConfig):
        self.config = config
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

    @functools.lru_cache(maxsize=16)  # noqa: B019 - a task object lives for one trial
    def split_arrays(self, split: str, n: int, seed: int) -> dict[str, np.ndarray]:
        """images uint8 [n, 3, S, S], shape ids and texture ids, from the cache or freshly rendered."""
        key = {**self._generator_fields(), "split": split, "n": n, "seed": seed}
        path = self.cache_dir / f"{split}-{stable_hash(key, 20)}.npz"
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    return {k: f[k] for k in ("images", "shape", "texture")}
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)  # a damaged cache file is regenerated
        arrays = self._render(split, n, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return arrays

    def _render(self, split: str, n: int, seed: int) -> dict[str, np.ndarray]:
        k = self.config.n_classes
        rng = numpy_generator(seed, f"shapes:{split}")
        shape = rng.permutation(np.arange(n) % k)  # exactly balanced classes
        if split == "cue_conflict":
            texture = (shape + rng.integers(1, k, n)) % k  # any other class, uniformly
        else:
            texture = shape.copy()
        if split in ("subtask", "subtask_val", "silhouette_test"):
            mode = "silhouette"
        elif split == "texture_only":
            mode = "texture_only"
        else:
            mode = "textured"
        images = render(shape, texture, rng, self.config.image_size, k, mode=mode,
                        texture_rotation=self.config.texture_rotation)  # fmt: skip
        return {"images": images, "shape": shape.astype(np.int64), "texture": texture.astype(np.int64)}

    def _split(self, split: str, n: int, seed: int, labels: tuple[str, ...] = ("y",)) -> Split:
        arrays = self.split_arrays(split, n, seed)
        sources = {"y": arrays["texture"] if split == "texture_only" else arrays["shape"],
                   "shape": arrays["shape"], "texture": arrays["texture"]}  # fmt: skip
        return Split(_normalise(arrays["images"]), {name: torch.from_numpy(sources[name]) for name in labels})

    # --- stages -----------------------------------------------------------------------------

    def key_fields(self, stage: str) -> dict:
        c = self.config
        if stage == "source":
            return {**self._generator_fields(), "n_base": c.n_base, "n_val": c.n_val}
        if stage == "subtask":
            return {**self._generator_fields(), "n_subtask": c.n_subtask, "n_val": c.n_val}
        raise ValueError(f"unknown stage {stage!r}; use 'source' or 'subtask'")

    def base_data(self, seed: int) -> StageData:
        c = self.config
        return StageData(self._split("base", c.n_base, seed), self._split("base_val", c.n_val, seed))

    def subtask_data(self, seed: int) -> StageData:
        c = self.config
        return StageData(self._split("subtask", c.n_subtask, seed), self._split("subtask_val", c.n_val, seed))

    def downstream_size(self, data_fraction: float) -> int:
        return int(round(data_fraction * self.config.pool_size))

    def downstream_data(self, seed: int, data_fraction: float) -> StageData:
        c = self.config
        n = self.downstream_size(data_fraction)
        if n < 1:
            raise ValueError(f"data fraction {data_fraction} of pool_size {c.pool_size} leaves no training images")
        pool = self._split("pool", c.pool_size, seed)
        train = Split(pool.x[:n], {"y": pool.y[:n]})
        return StageData(
            train=train,
            val=self._split("val", c.n_val, seed),
            evals={
                "test": self._split("test", c.n_test, seed),
                "silhouette": self._split("silhouette_test", c.n_test, seed),
                "cue_conflict": self._split("cue_conflict", c.n_test, seed, labels=("shape", "texture")),
                "texture_only": self._split("texture_only", c.n_test, seed),
            },
        )

    def probe_features(self, seed: int) -> tuple[Split, Split]:
        """(fit, eval) splits for representation analyses, labelled with features (not targets):
        shape, texture and colour. They are the two halves of the `cue_conflict` test split (already
        rendered for evaluation; nothing new is rendered): only there do shape and texture vary
        apart (in the textured splits texture == shape, so their R² would be identical). Texture is
        any class but the shape's, near-independent of it (a layer coding shape alone explains
        about 1/(k-1)^2 of its variance by texture).

        Colour is not stored with the images: it is recovered by replaying the split's random stream
        up to `render`'s first draw (`_render`'s class permutation and texture offsets, then the
        colour index), and the replayed shapes and textures are checked against the stored ones."""
        from tasks.shapes_render import COLOURS

        k, n = self.config.n_classes, self.config.n_test
        arrays = self.split_arrays("cue_conflict", n, seed)
        rng = numpy_generator(seed, "shapes:cue_conflict")
        shape = rng.permutation(np.arange(n) % k)
        texture = (shape + rng.integers(1, k, n)) % k
        colour = rng.integers(0, len(COLOURS), n)
        if not (np.array_equal(shape, arrays["shape"]) and np.array_equal(texture, arrays["texture"])):
            raise RuntimeError("shapes: replaying the cue_conflict split gave other labels; the colour replay is stale")
        features = {"shape": arrays["shape"], "texture": arrays["texture"], "colour": colour.astype(np.int64)}
        whole = Split(_normalise(arrays["images"]), {name: torch.from_numpy(v) for name, v in features.items()})
        return whole.take(torch.arange(n // 2)), whole.take(torch.arange(n // 2, n))

    def build_model(self, model_config: Frozen) -> nn.Module:
        return build_model_for(self, model_config, n_classes=self.config.n_classes, image_size=self.config.image_size)
