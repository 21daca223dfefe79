"""`imagenet16`: the paper's shape-bias experiment on real images from a local directory.

Nothing is downloaded: the sweep file names directories on local disk (or a mounted share).

- `train_dir`: ImageFolder layout, one subdirectory per class named as in `classes` (default: the 16
  classes of Geirhos et al.), holding .png/.jpg/.jpeg images. Each seed splits it, per class and
  deterministically, into test, validation, the downstream pool and the source's training set.
- The subtask split is *mean-pooled* images: every SLIC superpixel (scikit-image) filled with its mean
  colour, so texture is gone and shape remains (the paper used SAM segments). Built once and cached.
- `cue_conflict_dir`: Geirhos-style stimuli, files named `<shapeclass><n>-<textureclass><n>.png`
  (in any subdirectory). Images whose two classes are the same are left out of shape bias.

Every split is cached under `cache_dir` as uint8 arrays keyed by the file list, size and seed.
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from common.config import Frozen, stable_hash
from common.seeding import numpy_generator
from tasks.base import Feeds, Images, Split, StageData, build_model_for, register_task

GEIRHOS_CLASSES = (
    "airplane", "bear", "bicycle", "bird", "boat", "bottle", "car", "cat", "chair", "clock", "dog", "elephant",
    "keyboard", "knife", "oven", "truck",
)  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".JPEG", ".JPG", ".PNG")
MEAN, STD = 0.5, 0.25
LAYOUT = "TRAIN_DIR/<class>/<image>.png|jpg, one subdirectory per class"
CUE_PATTERN = "<shapeclass><n>-<textureclass><n>.png, e.g. cat3-elephant1.png"


class ImageNet16Config(Frozen):
    name: Literal["imagenet16"] = "imagenet16"
    train_dir: str = Field(description=f"ImageFolder directory: {LAYOUT}")
    cue_conflict_dir: str = Field(description=f"cue-conflict stimuli named {CUE_PATTERN}")
    classes: tuple[str, ...] = GEIRHOS_CLASSES
    image_size: int = Field(64, ge=16, le=512)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    pool_fraction: float = Field(0.3, gt=0, lt=1, description="share of each class kept for downstream budgets")
    slic_segments: int = Field(64, ge=4, description="superpixels per image for the mean-pooled split")
    cache_dir: str | None = Field(None, description="default ~/.cache/instill/imagenet16")
    not_identity: ClassVar[tuple[str, ...]] = ("cache_dir",)  # moving the cache changes no result

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v) or len(v) < 2:
            raise ValueError("classes must be at least two distinct names")
        return v


def _normalise(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).float() / 255.0 - MEAN) / STD


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 [3, size, size]: shorter side resized to `size`, then centre-cropped."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def mean_pool(image: np.ndarray, segments: int) -> np.ndarray:
    """Fill every SLIC superpixel of a [3, H, W] uint8 image with its mean colour."""
    from skimage.segmentation import slic

    hwc = image.transpose(1, 2, 0)
    labels = slic(hwc, n_segments=segments, compactness=10, start_label=0)
    flat = labels.reshape(-1)
    counts = np.bincount(flat)
    out = np.empty_like(hwc)
    for c in range(3):
        means = np.bincount(flat, weights=hwc[..., c].reshape(-1).astype(np.float64)) / np.maximum(counts, 1)
        out[..., c] = np.round(means[labels]).astype(np.uint8)
    return out.transpose(2, 0, 1)


@register_task("imagenet16")
class ImageNet16:
    """Real images from local directories; see the module docstring."""

    Config = ImageNet16Config
    trains_on_zero = False
    default_analyses = ("splits", "shape_bias", "calibration")

    def __init__(self, config: ImageNet16Config):
        self.config = config
        self.files = self._scan_train(Path(config.train_dir).expanduser())
        self.cue_files = self._scan_cue(Path(config.cue_conflict_dir).expanduser())

    # --- reading the directories -------------------------------------------------------------

    def _scan_train(self, root: Path) -> dict[str, list[Path]]:
        if not root.is_dir():
            raise ValueError(f"task.train_dir: {root} is not a directory; expected {LAYOUT}")
        missing = [c for c in self.config.classes if not (root / c).is_dir()]
        if missing:
            raise ValueError(f"task.train_dir: {root} has no subdirectory for {missing}; expected {LAYOUT}")
        files = {}
        for c in self.config.classes:
            images = sorted(p for p in (root / c).iterdir() if p.suffix in IMAGE_SUFFIXES)
            if len(images) < 4:
                raise ValueError(
                    f"task.train_dir: {root / c} holds {len(images)} images; each class needs at least 4 "
                    "(test, validation, pool and training each take one or more)"
                )
            files[c] = images
        return files

    def _scan_cue(self, root: Path) -> list[tuple[Path, int, int]]:
        if not root.is_dir():
            raise ValueError(f"task.cue_conflict_dir: {root} is not a directory; expected files named {CUE_PATTERN}")
        index = {c: i for i, c in enumerate(self.config.classes)}
        names = "|".join(sorted(map(re.escape, self.config.classes), key=len, reverse=True))
        pattern = re.compile(rf"^({names})\d+-({names})\d+$")
        stimuli = []
        for path in sorted(p for p in root.rglob("*") if p.suffix in IMAGE_SUFFIXES):
            match = pattern.match(path.stem)
            if not match:
                raise ValueError(
                    f"task.cue_conflict_dir: {path.name} does not follow {CUE_PATTERN} "
                    f"with classes from: {', '.join(self.config.classes)}"
                )
            shape, texture = index[match.group(1)], index[match.group(2)]
            if shape != texture:  # same-class stimuli say nothing about shape vs texture
                stimuli.append((path, shape, texture))
        if not stimuli:
            raise ValueError(f"task.cue_conflict_dir: {root} holds no cue-conflict image with two different classes")
        return stimuli

    # --- splits ------------------------------------------------------------------------------

    @property
    def cache_dir(self) -> Path:
        return Path(self.config.cache_dir or Path.home() / ".cache" / "instill" / "imagenet16").expanduser()

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a task object lives for one trial
    def _assignment(self, seed: int) -> dict[str, list[tuple[Path, int]]]:
        """Per class and seed: test, val, pool and base files (disjoint), each at least one."""
        c = self.config
        rng = numpy_generator(seed, "imagenet16:split")
        parts: dict[str, list[tuple[Path, int]]] = {"test": [], "val": [], "pool": [], "base": []}
        for label, cls in enumerate(c.classes):
            files = [self.files[cls][i] for i in rng.permutation(len(self.files[cls]))]
            n = len(files)
            n_test = max(1, round(c.test_fraction * n))
            n_val = max(1, round(c.val_fraction * n))
            n_pool = max(1, round(c.pool_fraction * n))
            bounds = np.cumsum([0, n_test, n_val, n_pool])
            if bounds[-1] >= n:
                raise ValueError(f"task: class {cls!r} has {n} images, too few for the test/val/pool fractions")
            for name, lo, hi in zip(("test", "val", "pool"), bounds[:-1], bounds[1:], strict=True):
                parts[name] += [(f, label) for f in files[lo:hi]]
            parts["base"] += [(f, label) for f in files[bounds[-1] :]]
        # interleave classes so that a budget's first n images are balanced
        shuffled = {}
        for k, v in parts.items():
            shuffled[k] = [v[i] for i in numpy_generator(seed, f"imagenet16:{k}").permutation(len(v))]
        return shuffled

    def _arrays(self, name: str, items: list[tuple[Path, int]], pooled: bool) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        key = {"files": [str(p) for p, _ in items], "size": c.image_size, "pooled": pooled,
               "segments": c.slic_segments if pooled else None}  # fmt: skip
        path = self.cache_dir / f"{name}-{stable_hash(key, 20)}.npz"
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as f:
                    return f["images"], f["labels"]
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)
        images = np.stack([load_image(p, c.image_size) for p, _ in items])
        if pooled:
            images = np.stack([mean_pool(img, c.slic_segments) for img in images])
        labels = np.array([label for _, label in items], dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, path)
        return images, labels

    def _split(self, name: str, seed: int, pooled: bool = False) -> Split:
        images, labels = self._arrays(name, self._assignment(seed)[name], pooled)
        return Split(_normalise(images), {"y": torch.from_numpy(labels)})

    def key_fields(self, stage: str) -> dict:
        c = self.config
        files = stable_hash({k: [str(p) for p in v] for k, v in self.files.items()})
        common = {"name": c.name, "files": files, "classes": c.classes, "image_size": c.image_size,
                  "fractions": [c.test_fraction, c.val_fraction, c.pool_fraction]}  # fmt: skip
        if stage == "source":
            return common
        if stage == "subtask":
            return {**common, "slic_segments": c.slic_segments}
        raise ValueError(f"unknown stage {stage!r}; use 'source' or 'subtask'")

    def base_data(self, seed: int) -> StageData:
        return StageData(self._split("base", seed), self._split("val", seed))

    def subtask_data(self, seed: int) -> StageData:
        return StageData(self._split("base", seed, pooled=True), self._split("val", seed, pooled=True))

    def downstream_size(self, data_fraction: float) -> int:
        pool = sum(max(1, round(self.config.pool_fraction * len(v))) for v in self.files.values())
        return int(round(data_fraction * pool))

    def downstream_data(self, seed: int, data_fraction: float) -> StageData:
        n = self.downstream_size(data_fraction)
        if n < 1:
            raise ValueError(f"data fraction {data_fraction} leaves no training images")
        pool = self._split("pool", seed)
        cue_items = [(p, s) for p, s, _ in self.cue_files]
        cue_images, shapes = self._arrays("cue_conflict", cue_items, pooled=False)
        textures = np.array([t for _, _, t in self.cue_files], dtype=np.int64)
        cue = Split(_normalise(cue_images), {"shape": torch.from_numpy(shapes), "texture": torch.from_numpy(textures)})
        return StageData(
            train=Split(pool.x[:n], {"y": pool.y[:n]}),
            val=self._split("val", seed),
            evals={
                "test": self._split("test", seed),
                "meanpooled": self._split("test", seed, pooled=True),
                "cue_conflict": cue,
            },  # fmt: skip
        )

    def feeds(self) -> Feeds:
        """RGB images of `image_size` px, one class per entry of `classes`."""
        return Feeds(Images(size=self.config.image_size), n_classes=len(self.config.classes))

    def build_model(self, model_config: Frozen) -> nn.Module:
        return build_model_for(self, model_config)
