"""The real-image task, on tiny directories generated in the expected layouts."""

import numpy as np
import pytest
import yaml
from PIL import Image

from orchestrator.artifacts import ArtifactStore
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tasks.imagenet16 import GEIRHOS_CLASSES, ImageNet16, ImageNet16Config, mean_pool

CLASSES = ("bird", "car", "cat", "dog")
assert set(CLASSES) <= set(GEIRHOS_CLASSES)


def _picture(rng, h=24, w=30):
    """A few random coloured rectangles with mild noise: structure for superpixels to find."""
    pixels = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.float64)
    for _ in range(4):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        pixels[y : y + rng.integers(4, h - y + 1), x : x + rng.integers(4, w - x + 1)] = rng.integers(0, 256, 3)
    return np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)


def _image(path, rng):
    Image.fromarray(_picture(rng)).save(path)


@pytest.fixture
def dirs(tmp_path):
    rng = np.random.default_rng(0)
    train, cue = tmp_path / "train", tmp_path / "cue"
    for c in CLASSES:
        (train / c).mkdir(parents=True)
        for i in range(8):
            _image(train / c / f"{c}_{i}.png", rng)
    (cue / "cat").mkdir(parents=True)
    _image(cue / "cat" / "cat1-car2.png", rng)
    _image(cue / "car3-bird1.png", rng)
    _image(cue / "bird2-bird3.png", rng)  # same class on both sides: left out of shape bias
    return train, cue


def _raw(tmp_path, train, cue, **task):
    return {
        "name": "real",
        "task": {"name": "imagenet16", "train_dir": str(train), "cue_conflict_dir": str(cue), "classes": list(CLASSES),
                 "image_size": 16, "test_fraction": 0.125, "val_fraction": 0.125, "pool_fraction": 0.25,
                 "slic_segments": 8, "cache_dir": str(tmp_path / "cache"), **task},
        "model": {"name": "resnet18", "width": 4},
        "source": {"epochs": 1},
        "discovery": {"epochs": 1, "batch_size": 8},
        "training": {"epochs": 1, "batch_size": 8},
        "methods": ["subtask_induction", "scratch"], "sparsities": [0.5], "data_fractions": [1.0],
    }  # fmt: skip


def test_splits_are_disjoint_balanced_and_cached(tmp_path, dirs):
    task = ImageNet16(ImageNet16Config(**_raw(tmp_path, *dirs)["task"]))
    parts = task._assignment(0)
    files = {k: {p for p, _ in v} for k, v in parts.items()}
    names = list(files)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not files[a] & files[b]
    assert sum(len(v) for v in files.values()) == 8 * len(CLASSES)
    assert sorted(label for _, label in parts["test"]) == [0, 1, 2, 3]
    data = task.downstream_data(0, 1.0)
    assert data.train.x.shape == (8, 3, 16, 16)
    assert list((tmp_path / "cache").glob("pool-*.npz"))


def test_cue_conflict_parsing_skips_same_class_stimuli(tmp_path, dirs):
    task = ImageNet16(ImageNet16Config(**_raw(tmp_path, *dirs)["task"]))
    pairs = sorted((p.name, s, t) for p, s, t in task.cue_files)
    idx = {c: i for i, c in enumerate(CLASSES)}
    assert pairs == [("car3-bird1.png", idx["car"], idx["bird"]), ("cat1-car2.png", idx["cat"], idx["car"])]
    cue = task.downstream_data(0, 1.0).evals["cue_conflict"]
    assert set(cue.labels) == {"shape", "texture"} and (cue.labels["shape"] != cue.labels["texture"]).all()


def test_mean_pooling_fills_each_superpixel_with_its_mean_colour():
    rng = np.random.default_rng(1)
    image = _picture(rng, 32, 32).transpose(2, 0, 1)
    pooled = mean_pool(image, 16)
    colours = {tuple(p) for p in pooled.reshape(3, -1).T}
    assert len({tuple(p) for p in image.reshape(3, -1).T}) > 500
    assert 2 <= len(colours) <= 40, "a handful of flat regions instead of ~1000 noisy pixels"
    assert abs(pooled.astype(float).mean() - image.astype(float).mean()) < 2.0  # means are kept


def test_a_trial_runs_and_reports_shape_bias(tmp_path, dirs):
    sweep = load_sweep(_raw(tmp_path, *dirs))
    row = run_trial(
        sweep,
        TrialSpec(method="subtask_induction", axes={"mask.sparsity": 0.5}, data_fraction=1.0, seed=0),
        ArtifactStore(tmp_path / "store"),
    )
    for col in ("test_acc", "splits_meanpooled_acc", "splits_cue_conflict_acc_shape", "shape_bias", "subtask_acc"):
        assert col in row


@pytest.mark.parametrize(
    "change, fragment",
    [
        ("missing-train", "task.train_dir: {train}x is not a directory"),
        ("missing-class", "has no subdirectory for ['car']"),
        ("few-images", "holds 2 images"),
        ("missing-cue", "task.cue_conflict_dir: {cue}x is not a directory"),
        ("bad-cue-name", "does not follow <shapeclass><n>-<textureclass><n>.png"),
    ],
)
def test_bad_data_paths_exit_2_naming_the_path_and_layout(tmp_path, dirs, capsys, change, fragment):
    train, cue = dirs
    raw = _raw(tmp_path, train, cue)
    if change == "missing-train":
        raw["task"]["train_dir"] = str(train) + "x"
    elif change == "missing-class":
        for f in (train / "car").iterdir():
            f.unlink()
        (train / "car").rmdir()
    elif change == "few-images":
        for f in sorted((train / "bird").iterdir())[2:]:
            f.unlink()
    elif change == "missing-cue":
        raw["task"]["cue_conflict_dir"] = str(cue) + "x"
    else:
        _image(cue / "not-a-stimulus.png", np.random.default_rng(0))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment.format(train=train, cue=cue) in err, err
    with pytest.raises(ConfigError):
        load_sweep(raw)
