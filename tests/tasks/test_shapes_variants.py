"""The `shapes` task's cue (seed 003, CBFT) and bias (seed 001, OccamNets) variants."""

import hashlib
import math
import os

import numpy as np
import pytest
import torch

from common.config import stable_hash
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import ConfigError, load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tasks.shapes import BOX_VALUE, Shapes, ShapesConfig
from tasks.shapes_render import COLOURS, GREY, box_layout, render
from tests.tasks.test_shapes import vision_raw

SMALL = {
    "n_classes": 10,
    "image_size": 32,
    "n_base": 200,
    "n_subtask": 20,
    "pool_size": 100,
    "n_val": 50,
    "n_test": 100,
}


def make(tmp_path, **settings) -> Shapes:
    return Shapes(ShapesConfig(**{**SMALL, "cache_dir": str(tmp_path / "cache"), **settings}))


def box_at(task: Shapes, x: torch.Tensor, box_class) -> torch.Tensor:
    """[N] bool: whether image i has, in every channel, the box of class box_class[i]."""
    side, corner = box_layout(task.config.image_size, task.config.n_classes)
    out = []
    for img, k in zip(x, torch.as_tensor(box_class).tolist(), strict=True):
        r, c = corner[k].tolist()
        out.append(bool((img[:, r : r + side, c : c + side] == BOX_VALUE).all()))
    return torch.tensor(out)


def outside_box(task: Shapes, box_class) -> torch.Tensor:
    """[N, 1, S, S] bool: every pixel but those of the box of class box_class[i]."""
    side, corner = box_layout(task.config.image_size, task.config.n_classes)
    s = task.config.image_size
    keep = torch.ones(len(box_class), 1, s, s, dtype=torch.bool)
    for i, k in enumerate(torch.as_tensor(box_class).tolist()):
        r, c = corner[k].tolist()
        keep[i, :, r : r + side, c : c + side] = False
    return keep


def decoded_colours(images: np.ndarray) -> np.ndarray:
    """The COLOURS index of each uint8 image's figure (its non-grey pixels), -1 where it has none."""
    grey = round(GREY * 255)
    out = []
    for img in images.astype(float):
        fg = (img != grey).any(axis=0)
        if not fg.any():
            out.append(-1)
            continue
        mean = img[:, fg].mean(axis=1) / 255
        out.append(int(((COLOURS.numpy() - mean) ** 2).sum(axis=1).argmin()))
    return np.array(out)


def figure(images: np.ndarray) -> np.ndarray:
    """[N, S, S] bool: the non-grey pixels of uint8 images."""
    return (images != round(GREY * 255)).any(axis=1)


def within_binomial(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p)) + 1


# --- the box ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, side", [(16, 2), (32, 3), (64, 6), (128, 12)])
@pytest.mark.parametrize("k", [2, 4, 5, 10, 16])
def test_every_class_gets_its_own_box_inside_the_image(size, side, k):
    got_side, corner = box_layout(size, k)
    assert got_side == side, "3 px at 32 px, scaled with the image, at least 2"
    assert corner.shape == (k, 2) and len({tuple(p) for p in corner.tolist()}) == k, "K distinct positions"
    assert (corner >= 0).all() and (corner + side <= size).all()
    covered = np.zeros((size, size), dtype=int)
    for r, c in corner.tolist():
        covered[r : r + side, c : c + side] += 1
    assert covered.max() == 1, "boxes never overlap"


def test_source_images_carry_their_class_box_on_fraction_p(tmp_path):
    task, plain = make(tmp_path, cue={"fraction": 0.3}), make(tmp_path)
    data, plain_data = task.base_data(0), plain.base_data(0)
    for cued, clean, n in ((data.train, plain_data.train, 200), (data.val, plain_data.val, 50)):
        assert torch.equal(cued.y, clean.y)
        changed = (cued.x != clean.x).flatten(1).any(1)
        assert int(changed.sum()) == round(0.3 * n), "exactly round(p * n) images get a box"
        assert box_at(task, cued.x[changed], cued.y[changed]).all(), "each at its own class's position"
        keep = outside_box(task, cued.y).expand_as(cued.x)
        assert torch.equal(cued.x[keep], clean.x[keep]), "nothing but the box changes"
        with_box = int(box_at(task, cued.x, cued.y).sum())
        assert round(0.3 * n) <= with_box <= round(0.3 * n) + int(box_at(task, clean.x, clean.y).sum())
    again = make(tmp_path, cue={"fraction": 0.3}).base_data(0).train
    assert torch.equal(again.x, task.base_data(0).train.x), "a function of the seed"
    assert not torch.equal(make(tmp_path, cue={"fraction": 0.3}).base_data(1).train.x, again.x)


def test_downstream_training_is_clean_and_the_cued_stream_is_the_sources_training_distribution(tmp_path):
    task, plain = make(tmp_path, cue={"fraction": 0.6}), make(tmp_path)
    data, clean = task.downstream_data(0, 0.5), plain.downstream_data(0, 0.5)
    assert torch.equal(data.train.x, clean.train.x) and torch.equal(data.train.y, clean.train.y)
    assert torch.equal(data.val.x, clean.val.x), "downstream validation is clean"
    assert torch.equal(data.evals["test"].x, clean.evals["test"].x), "the clean test stays as it is"
    assert set(clean.evals) < set(data.evals) and not clean.streams
    # CBFT's cued set: the cue model's own training images (n_base of them, not the n downstream
    # ones), the box on exactly round(p * n_base), as the source saw them.
    cued, source = data.streams["cued"], task.base_data(0).train
    assert len(cued) == 200 != len(data.train)
    assert torch.equal(cued.x, source.x) and torch.equal(cued.y, source.y)
    boxed = (cued.x != plain.base_data(0).train.x).flatten(1).any(1)
    assert int(boxed.sum()) == round(0.6 * 200) and box_at(task, cued.x[boxed], cued.y[boxed]).all()
    # The same stream at every budget.
    assert torch.equal(task.downstream_data(0, 0.2).streams["cued"].x, cued.x)

    from methods.training import _stream

    assert _stream(data, "cued") is cued


def test_downstream_fraction_cues_that_share_of_training_images(tmp_path):
    task, plain = make(tmp_path, cue={"fraction": 0.6, "downstream_fraction": 0.5}), make(tmp_path)
    train, clean = task.downstream_data(0, 0.8).train, plain.downstream_data(0, 0.8).train
    changed = (train.x != clean.x).flatten(1).any(1)
    assert int(changed.sum()) == 40 and box_at(task, train.x[changed], train.y[changed]).all()


def test_cue_evaluation_boxes_every_test_image_with_its_class(tmp_path):
    task = make(tmp_path, cue={"fraction": 0.6})
    evals = task.downstream_data(0, 0.5).evals
    cue, test = evals["cue"], evals["test"]
    assert torch.equal(cue.y, test.y) and box_at(task, cue.x, cue.y).all()


def test_randomised_cue_puts_another_class_box_on_each_image(tmp_path):
    task = make(tmp_path, cue={"fraction": 0.6})
    evals = task.downstream_data(0, 0.5).evals
    rc, test = evals["randomised_cue"], evals["test"]
    assert torch.equal(rc.y, test.y), "labelled with the image's own class"
    assert (rc.labels["cue"] != rc.y).all()
    assert box_at(task, rc.x, rc.labels["cue"]).all()
    assert not box_at(task, rc.x, rc.y).any(), "never a box at the true class's position"
    keep = outside_box(task, rc.labels["cue"]).expand_as(rc.x)
    assert torch.equal(rc.x[keep], test.x[keep])
    offsets = set(((rc.labels["cue"] - rc.y) % 10).tolist())
    assert offsets == set(range(1, 10)), "any other class, uniformly"


def test_randomised_image_is_labelled_by_its_cue(tmp_path):
    task = make(tmp_path, cue={"fraction": 0.6})
    evals = task.downstream_data(0, 0.5).evals
    ri, test = evals["randomised_image"], evals["test"]
    assert box_at(task, ri.x, ri.y).all(), "y is the class whose box the image carries"
    assert torch.equal(ri.labels["shape"], test.y) and (ri.labels["shape"] != ri.y).all()
    keep = outside_box(task, ri.y).expand_as(ri.x)
    assert torch.equal(ri.x[keep], test.x[keep]), "the image itself is a test image of another class"
    # The same evaluation on the validation images, for choosing settings: never a test image.
    data = task.downstream_data(0, 0.5)
    ri_val = data.evals["randomised_image_val"]
    assert torch.equal(ri_val.labels["shape"], data.val.y) and box_at(task, ri_val.x, ri_val.y).all()
    assert torch.equal(ri_val.x[outside_box(task, ri_val.y).expand_as(ri_val.x)],
                       data.val.x[outside_box(task, ri_val.y).expand_as(data.val.x)])  # fmt: skip
    assert {"cue_val", "randomised_cue_val"} <= set(data.evals)


def test_the_cue_is_part_of_the_source_key_only(tmp_path):
    plain, cued = make(tmp_path), make(tmp_path, cue={"fraction": 0.6})
    keys = {stable_hash(t.key_fields("source")) for t in (plain, cued, make(tmp_path, cue={"fraction": 0.5}))}
    assert len(keys) == 3
    assert cued.key_fields("source")["cue"]["positions"] == box_layout(32, 10)[1].tolist()
    assert cued.key_fields("source")["cue"]["box_side"] == 3
    assert cued.key_fields("subtask") == plain.key_fields("subtask")
    downstream_only = make(tmp_path, cue={"fraction": 0.6, "downstream_fraction": 0.2})
    assert downstream_only.key_fields("source") == cued.key_fields("source"), "the source does not see it"


# --- the plain task is unchanged --------------------------------------------------------------------


def _h(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


# Recorded from the code before the variants existed (commit 8796e7f). The images are rendered in
# float32 torch: a CPU with other vectorised sin/cos could move a pixel; the labels and keys cannot move.
PLAIN = {"n_classes": 4, "image_size": 16, "n_base": 24, "n_subtask": 24, "pool_size": 24, "n_val": 12, "n_test": 24}
BEFORE = {
    "base": "3b7e856f1495872c52f61011c52968b9",
    "base_val": "f6520755f9e2b8098dce9073a5377b21",
    "pool": "b21236cfaeb7072fcdbeb25102ca7793",
    "val": "9ba9fe3ca2cae5a1c187eb983f0fd240",
    "test": "b1169d0760f186b773ada27a86055f33",
    "cue_conflict": "6bd699ea339de87a6bd47c008eceaad0",
    "texture_only": "983f77ae8f477db89886efe32ab29aa1",
    "silhouette_test": "21fcae2866e381d0d6bc7b3f4c811c3f",
    "subtask": "d44bedac0038120a123f9c60d7b9381f",
}
FILES_BEFORE = ["base-8187ff478fa613218667.npz", "base_val-8069645e276b8ae9a5cd.npz",
                "cue_conflict-6b4b91fe7a3dfdcb6a87.npz", "pool-a8e12c3b8e2bbb7ae037.npz",
                "silhouette_test-7507367806d979c9d35d.npz", "subtask-6105554fb0180859c0dc.npz",
                "test-d0689224aa1d41497bb5.npz", "texture_only-8422dfc5823f132b0858.npz",
                "val-1080a99343a2e5eecbb0.npz"]  # fmt: skip


def test_plain_task_keys_and_labels_are_as_before(tmp_path):
    config = ShapesConfig(**PLAIN)
    assert "cue" not in config.canonical() and "bias" not in config.model_dump()
    assert stable_hash(config.canonical(), 20) == "84d2fcbe3a0d414bafb6", "the trial identity keeps its hash"
    task = Shapes(config.model_copy(update={"cache_dir": str(tmp_path)}))
    assert stable_hash(task.key_fields("source"), 20) == "271d3a1268cea28794f9"
    assert stable_hash(task.key_fields("subtask"), 20) == "3d4c5238b0964a2c4d00"
    for split, before in BEFORE.items():
        arrays = task.split_arrays(split, 24, 3)
        assert set(arrays) == {"images", "shape", "texture"}
        assert _h(np.stack([arrays["shape"], arrays["texture"]])) == before[16:], split
    assert sorted(os.listdir(tmp_path)) == FILES_BEFORE, "every split keeps its cache file"
    fit, ev = task.probe_features(3, "cue_conflict")
    assert _h(torch.cat([fit.labels["colour"], ev.labels["colour"]]).numpy()) == "1546af9ebda0cdef"


def test_plain_task_images_are_bit_identical_to_before(tmp_path):
    task = Shapes(ShapesConfig(**PLAIN, cache_dir=str(tmp_path)))
    for split, before in BEFORE.items():
        assert _h(task.split_arrays(split, 24, 3)["images"]) == before[:16], split


def test_explicit_colours_change_only_the_colour():
    shape = np.arange(20) % 4
    plain = render(shape, shape, np.random.default_rng(0), 16, 4)
    drawn = np.random.default_rng(0).integers(0, len(COLOURS), 20)  # render's first draw
    assert np.array_equal(render(shape, shape, np.random.default_rng(0), 16, 4, colour_ids=drawn), plain)
    red = render(shape, shape, np.random.default_rng(0), 16, 4, colour_ids=np.zeros(20, dtype=int))
    assert np.array_equal(figure(red), figure(plain)), "same poses and textures"
    assert (decoded_colours(red) == 0).all() and np.array_equal(decoded_colours(plain), drawn)
    with pytest.raises(ValueError, match="colour_ids"):
        render(shape, shape, np.random.default_rng(0), 16, 4, colour_ids=np.full(20, len(COLOURS)))


# --- the bias ---------------------------------------------------------------------------------------

BIASED = {"n_classes": 10, "image_size": 16, "n_base": 400, "pool_size": 400, "n_val": 400, "n_test": 400}


@pytest.mark.parametrize("p", [0.95, 0.6])
def test_colour_predicts_the_class_in_training_only(tmp_path, p):
    task, plain = make(tmp_path, bias={"feature": "colour", "p": p}, **BIASED), make(tmp_path, **BIASED)
    others = set()
    for split in ("base", "base_val", "pool", "val"):
        arrays = task.split_arrays(split, 400, 0)
        colour = decoded_colours(arrays["images"])
        assert np.array_equal(colour[colour >= 0], arrays["colour"][colour >= 0]), "the stored colour is drawn"
        agree = arrays["colour"] == arrays["shape"] % len(COLOURS)
        assert within_binomial(int(agree.sum()), 400, p), (split, agree.mean())
        others |= set(arrays["colour"][~agree].tolist())
        assert np.array_equal(arrays["texture"], arrays["shape"]), "texture as in the plain task"
        same = plain.split_arrays(split, 400, 0)
        assert np.array_equal(same["shape"], arrays["shape"])
        assert np.array_equal(figure(arrays["images"]), figure(same["images"])), "only the colour differs"
    assert others == set(range(len(COLOURS))), "else any other colour"
    data = task.downstream_data(0, 0.5)
    test = task.split_arrays("test", 400, 0)
    test_colour = decoded_colours(test["images"])
    assert within_binomial(int((test_colour == test["shape"] % len(COLOURS)).sum()), 400, 0.1), "unbiased test"
    aligned = data.evals["bias_aligned"]
    aligned_colour = decoded_colours(task.split_arrays("bias_aligned", 400, 0)["images"])
    assert np.array_equal(aligned_colour[aligned_colour >= 0], (aligned.y.numpy() % len(COLOURS))[aligned_colour >= 0])
    assert torch.equal(aligned.y, data.evals["test"].y), "the test split's images, aligned"


def test_texture_predicts_the_class_in_training_only(tmp_path):
    task, plain = make(tmp_path, bias={"feature": "texture", "p": 0.9}, **BIASED), make(tmp_path, **BIASED)
    others = set()
    for split in ("base", "base_val", "pool", "val"):
        arrays, same = task.split_arrays(split, 400, 0), plain.split_arrays(split, 400, 0)
        agree = arrays["texture"] == arrays["shape"]
        assert within_binomial(int(agree.sum()), 400, 0.9), (split, agree.mean())
        others |= set(arrays["texture"][~agree].tolist())
        differs = (arrays["images"] != same["images"]).reshape(400, -1).any(1)
        assert not differs[agree].any(), "an agreeing image is the plain one"
        assert differs[~agree].mean() > 0.9, "a disagreeing one carries another texture"
    assert others == set(range(10)), "else any other texture"
    data = task.downstream_data(0, 0.5)
    test = task.split_arrays("test", 400, 0)
    assert within_binomial(int((test["texture"] == test["shape"]).sum()), 400, 0.1), "unbiased test"
    assert torch.equal(data.evals["test"].y, torch.from_numpy(test["shape"])), "labels are the shape"
    assert len(data.train) == 200 and within_binomial(int((data.train.y == torch.from_numpy(
        task.split_arrays("pool", 400, 0)["texture"][:200])).sum()), 200, 0.9)  # fmt: skip
    plain_test = plain.downstream_data(0, 0.5).evals["test"]
    assert torch.equal(data.evals["bias_aligned"].x, plain_test.x), "texture = shape: the plain test images"


def test_biased_splits_get_their_own_cache_files_and_unbiased_ones_keep_theirs(tmp_path):
    plain = make(tmp_path)
    for split in ("base", "test", "cue_conflict", "silhouette_test"):
        plain.split_arrays(split, 40, 0)
    before = set(os.listdir(tmp_path / "cache"))
    colour = make(tmp_path, bias={"feature": "colour", "p": 0.9})
    for split in ("base", "test", "cue_conflict", "silhouette_test"):
        colour.split_arrays(split, 40, 0)
    new = set(os.listdir(tmp_path / "cache")) - before
    assert [f.split("-")[0] for f in sorted(new)] == ["base"], "only the biased split is new"
    make(tmp_path, bias={"feature": "colour", "p": 0.8}).split_arrays("base", 40, 0)
    make(tmp_path, bias={"feature": "texture", "p": 0.9}).split_arrays("test", 40, 0)
    assert len(set(os.listdir(tmp_path / "cache")) - before) == 3, "p and the feature are in the key"
    keys = {stable_hash(t.key_fields("source")) for t in (plain, colour, make(tmp_path, bias={"feature": "texture"}))}
    assert len(keys) == 3 and colour.key_fields("subtask") == plain.key_fields("subtask")


@pytest.mark.parametrize(
    "bias", [None, {"feature": "colour", "p": 0.95}, {"feature": "texture", "p": 0.95}, {"feature": "both", "p": 0.95}]
)
def test_probe_colours_match_the_images(tmp_path, bias):
    task = make(tmp_path, bias=bias, n_test=60)
    fit, ev = task.probe_features(0, "cue_conflict")
    colour = decoded_colours(task.split_arrays("cue_conflict", 60, 0)["images"])
    labels = torch.cat([fit.labels["colour"], ev.labels["colour"]]).numpy()
    assert (colour >= 0).mean() > 0.9 and np.array_equal(colour[colour >= 0], labels[colour >= 0])


# --- config and a whole trial ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, message",
    [
        ({"cue": {"fraction": 1.5}}, "task.cue.fraction"),
        ({"cue": {"fraction": 0.5, "downstream_fraction": -0.1}}, "task.cue.downstream_fraction"),
        ({"cue": {"kind": "patch"}}, "task.cue.kind"),
        ({"bias": {"feature": "shape"}}, "task.bias.feature"),
        ({"bias": {"feature": "colour", "p": 1.2}}, "task.bias.p"),
        ({"bias": {"p": 0.9}}, "task.bias.feature"),
    ],
)
def test_bad_variant_settings_are_refused(tmp_path, variant, message):
    raw = vision_raw(tmp_path)
    raw["task"].update(variant)
    with pytest.raises(ConfigError, match=message):
        load_sweep(raw)


def test_a_trial_with_cue_and_bias_reports_the_variant_evaluations(tmp_path):
    raw = vision_raw(tmp_path, methods=["scratch"])
    raw["task"].update({"cue": {"fraction": 0.6}, "bias": {"feature": "colour", "p": 0.95}})
    sweep = load_sweep(raw)
    assert load_sweep(sweep.canonical()) == sweep
    plain = load_sweep(vision_raw(tmp_path, methods=["scratch"]))
    assert sweep.config_hash != plain.config_hash
    row = run_trial(sweep, TrialSpec(method="scratch", data_fraction=0.5, seed=0), ArtifactStore(tmp_path / "s"))
    for col in ("splits_cue_acc", "splits_randomised_cue_acc", "splits_randomised_cue_acc_cue",
                "splits_randomised_image_acc", "splits_randomised_image_acc_shape", "splits_bias_aligned_acc",
                "test_acc"):  # fmt: skip
        assert 0.0 <= row[col] <= 1.0, col


def test_two_bias_variables_each_predict_the_class_in_training_only(tmp_path):
    """`feature: both`: colour and texture each agree with the class with probability p, on their own
    streams (so independently given the class); the test split draws both independently of the
    class, and `bias_aligned` sets both to the class."""
    task, plain = make(tmp_path, bias={"feature": "both", "p": 0.9}, **BIASED), make(tmp_path, **BIASED)
    for split in ("base", "pool", "val"):
        arrays, same = task.split_arrays(split, 400, 0), plain.split_arrays(split, 400, 0)
        assert np.array_equal(arrays["shape"], same["shape"]), "the plain split's shapes"
        colour_agrees = arrays["colour"] == arrays["shape"] % len(COLOURS)
        texture_agrees = arrays["texture"] == arrays["shape"]
        assert within_binomial(int(colour_agrees.sum()), 400, 0.9), (split, colour_agrees.mean())
        assert within_binomial(int(texture_agrees.sum()), 400, 0.9), (split, texture_agrees.mean())
        # Independent given the class: both disagree on about 1% of images, not 10%.
        assert within_binomial(int((~colour_agrees & ~texture_agrees).sum()), 400, 0.01)
        decoded = decoded_colours(arrays["images"])
        assert np.array_equal(decoded[decoded >= 0], arrays["colour"][decoded >= 0]), "the stored colour is drawn"
    data = task.downstream_data(0, 0.5)
    test = task.split_arrays("test", 400, 0)
    assert within_binomial(int((test["texture"] == test["shape"]).sum()), 400, 0.1), "unbiased texture"
    test_colour = decoded_colours(test["images"])
    assert within_binomial(int((test_colour == test["shape"] % len(COLOURS)).sum()), 400, 0.1), "unbiased colour"
    aligned = task.split_arrays("bias_aligned", 400, 0)
    aligned_colour = decoded_colours(aligned["images"])
    y = data.evals["bias_aligned"].y.numpy()
    assert np.array_equal(aligned_colour[aligned_colour >= 0], (y % len(COLOURS))[aligned_colour >= 0])
    assert np.array_equal(aligned["texture"], aligned["shape"]), "texture = shape there"
    # Single-variable keys are unchanged; `both` has its own source key.
    keys = {stable_hash(make(tmp_path, bias={"feature": f}).key_fields("source")) for f in ("colour", "both")}
    assert len(keys) == 2
