"""`shapes` with `source_textures: other_family` (issue 22 item 6): the source never sees a downstream
image or a downstream texture, so every method gets the same labelled downstream data; n = 0 is a
budget (every method as it comes: the source's zero-shot accuracy)."""

import numpy as np
import pytest

from common.config import stable_hash
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import ConfigError, load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tasks.shapes import Shapes, ShapesConfig
from tasks.shapes_render import TEXTURES
from tests.tasks.test_shapes import vision_raw
from tests.tasks.test_shapes_variants import PLAIN

SOURCE_SPLITS = ("base", "base_val")
DOWNSTREAM_SPLITS = ("pool", "val", "test")


def make(tmp_path, **settings) -> Shapes:
    return Shapes(ShapesConfig(**{**PLAIN, "cache_dir": str(tmp_path / "cache"), **settings}))


def test_the_default_is_the_plain_task(tmp_path):
    plain, explicit = make(tmp_path), make(tmp_path, source_textures="downstream")
    assert "source_textures" not in plain.config.canonical() and "source_textures" not in plain.config.model_dump()
    assert explicit.config.canonical() == plain.config.canonical(), "the trial identity is unchanged"
    assert stable_hash(ShapesConfig(**PLAIN).canonical(), 20) == "84d2fcbe3a0d414bafb6"  # as test_shapes_variants
    assert explicit.key_fields("source") == plain.key_fields("source")
    assert not plain.trains_on_zero
    base = plain.split_arrays("base", 24, 3)
    assert np.array_equal(base["texture"], base["shape"]), "the plain source is trained on the downstream task"


def test_source_and_downstream_share_no_texture_and_no_image(tmp_path):
    plain, other = make(tmp_path / "a"), make(tmp_path / "b", source_textures="other_family")
    k = other.config.n_classes
    for split in SOURCE_SPLITS:
        arrays, before = other.split_arrays(split, 48, 3), plain.split_arrays(split, 48, 3)
        assert ((arrays["texture"] >= k) & (arrays["texture"] < len(TEXTURES))).all(), split
        assert len(set(arrays["texture"].tolist())) == len(TEXTURES) - k, "every texture of the other family is drawn"
        assert np.array_equal(arrays["shape"], before["shape"]), "the same shape classes, the same stream"
        assert not np.array_equal(arrays["images"], before["images"])
    source = np.concatenate([other.split_arrays(s, 48, 3)["images"] for s in SOURCE_SPLITS])
    for split in DOWNSTREAM_SPLITS:
        arrays = other.split_arrays(split, 48, 3)
        assert np.array_equal(arrays["texture"], arrays["shape"]), "downstream: class k wears texture k, as ever"
        assert (arrays["texture"] < k).all()
        assert np.array_equal(arrays["images"], plain.split_arrays(split, 48, 3)["images"]), split
        flat = {img.tobytes() for img in source}
        assert not any(img.tobytes() in flat for img in arrays["images"]), f"{split} shares an image with the source"


def test_only_the_source_key_and_the_source_cache_files_change(tmp_path):
    plain, other = make(tmp_path), make(tmp_path, source_textures="other_family")
    assert other.key_fields("source")["source_textures"] == "other_family"
    assert stable_hash(other.key_fields("source")) != stable_hash(plain.key_fields("source"))
    assert other.key_fields("subtask") == plain.key_fields("subtask")
    assert other.config.canonical() != plain.config.canonical()
    for split in (*SOURCE_SPLITS, *DOWNSTREAM_SPLITS):
        plain.split_arrays(split, 24, 3)
    before = set((tmp_path / "cache").iterdir())
    for split in DOWNSTREAM_SPLITS:
        other.split_arrays(split, 24, 3)
    assert set((tmp_path / "cache").iterdir()) == before, "downstream splits keep the plain task's files"
    for split in SOURCE_SPLITS:
        other.split_arrays(split, 24, 3)
    assert len(set((tmp_path / "cache").iterdir()) - before) == len(SOURCE_SPLITS)


def test_n_zero_is_a_budget_only_when_the_source_never_saw_the_downstream_task(tmp_path):
    with pytest.raises(ConfigError, match="budget of 0"):
        load_sweep(vision_raw(tmp_path, data_fractions=[0.0, 0.5]))
    with pytest.raises(ValueError, match="other_family"):
        make(tmp_path).downstream_data(0, 0.0)
    other = make(tmp_path, source_textures="other_family")
    assert other.trains_on_zero
    data = other.downstream_data(0, 0.0)
    assert len(data.train) == 0 and len(data.evals["test"]) == other.config.n_test


def test_other_family_needs_textures_beyond_the_classes(tmp_path):
    with pytest.raises(ValueError, match="other_family needs at least 2 textures"):
        ShapesConfig(n_classes=len(TEXTURES) - 1, source_textures="other_family")
    with pytest.raises(ValueError, match="source_textures"):
        ShapesConfig(source_textures="cartoon")


def test_a_trial_at_n_zero_keeps_the_model_as_it_came(tmp_path):
    raw = vision_raw(tmp_path, methods=["full_transfer"], data_fractions=[0.0, 0.5])
    raw["task"]["source_textures"] = "other_family"
    sweep = load_sweep(raw)
    row = run_trial(sweep, TrialSpec(method="full_transfer", data_fraction=0.0, seed=0), ArtifactStore(tmp_path / "s"))
    assert row["status"] == "done" and row["n_train"] == 0
    assert row["best_epoch"] == 0 and row["epochs_run"] == 0, "no training data: no epoch, the source itself"
    assert 0.0 <= row["test_acc"] <= 1.0
