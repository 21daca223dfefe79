"""The procedural shapes task: generator, models, metrics."""

import types

import numpy as np
import pytest
import torch

from methods.masking import MaskedModel, MaskSelection, ScoreMask, maskable_names, parameter_roles
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import ConfigError, load_sweep
from orchestrator.trial import TrialSpec, fresh_model, run_trial
from tasks.shapes import Shapes, ShapesConfig
from tasks.shapes_render import GREY


@pytest.fixture
def task(tmp_path):
    return Shapes(
        ShapesConfig(
            n_classes=10,
            n_base=200,
            n_subtask=100,
            pool_size=100,
            n_val=50,
            n_test=100,
            cache_dir=str(tmp_path / "cache"),
        )
    )


def vision_raw(tmp_path, model=None, **overrides):
    raw = {
        "name": "vision",
        "task": {
            "name": "shapes",
            "n_classes": 4,
            "n_base": 80,
            "n_subtask": 60,
            "pool_size": 40,
            "n_val": 20,
            "n_test": 40,
            "cache_dir": str(tmp_path / "cache"),
        },
        "model": model or {"name": "resnet18", "width": 4},
        "source": {"epochs": 1, "lr": 1e-3},
        "discovery": {"epochs": 1, "batch_size": 20},
        "training": {"epochs": 1, "lr": 1e-3, "batch_size": 20},
        "methods": ["subtask_induction", "scratch"],
        "sparsities": [0.5],
        "data_fractions": [0.5],
    }
    raw.update(overrides)
    return raw


def test_classes_are_balanced(task):
    for split in ("base", "cue_conflict", "texture_only"):
        arrays = task.split_arrays(split, 100, 0)
        assert np.bincount(arrays["shape"], minlength=10).tolist() == [10] * 10


def test_generation_is_deterministic_and_cached(task, tmp_path):
    first = task.split_arrays("test", 30, 3)
    assert list((tmp_path / "cache").glob("test-*.npz")), "the split is cached on disk"
    fresh = Shapes(task.config).split_arrays("test", 30, 3)  # loads the cache
    rendered = Shapes(task.config.model_copy(update={"cache_dir": str(tmp_path / "other")})).split_arrays("test", 30, 3)
    for arrays in (fresh, rendered):
        assert np.array_equal(arrays["images"], first["images"])
    assert not np.array_equal(task.split_arrays("test", 30, 4)["images"], first["images"])


def test_a_damaged_cache_file_is_regenerated(task, tmp_path):
    first = task.split_arrays("val", 20, 0)
    for file in (tmp_path / "cache").glob("val-*.npz"):
        file.write_bytes(b"not an npz")
    again = Shapes(task.config).split_arrays("val", 20, 0)
    assert np.array_equal(again["images"], first["images"])


def test_silhouettes_carry_no_texture(task):
    images = task.split_arrays("subtask", 50, 0)["images"].astype(int)
    grey = round(GREY * 255)
    for img in images:
        figure = (img != grey).any(axis=0)  # pixels that are not background
        assert figure.sum() > 20
        colours = {tuple(img[:, y, x]) for y, x in zip(*np.nonzero(figure), strict=True)}
        assert len(colours) == 1, "a silhouette is one flat colour"
    # ... while textured images of the same shapes are patterned: the figure shows background through it
    textured = task.split_arrays("base", 50, 0)["images"].astype(int)
    assert np.mean([len({tuple(p) for p in img.reshape(3, -1).T}) for img in textured]) == pytest.approx(2, abs=0.2)


def test_validation_cue_conflict_images_are_their_own_draw(task):
    val, test = task.split_arrays("cue_conflict_val", 200, 0), task.split_arrays("cue_conflict", 200, 0)
    assert (val["shape"] != val["texture"]).all()
    assert not np.array_equal(val["images"], test["images"])


def test_cue_conflict_shape_and_texture_classes_differ(task):
    arrays = task.split_arrays("cue_conflict", 200, 0)
    assert (arrays["shape"] != arrays["texture"]).all()
    assert len(set(arrays["texture"].tolist())) == 10


def test_texture_only_images_have_no_shape_and_are_labelled_by_texture(task):
    split = task.downstream_data(0, 1.0).evals["texture_only"]
    arrays = task.split_arrays("texture_only", 100, 0)
    assert torch.equal(split.y, torch.from_numpy(arrays["texture"]))
    grey = round(GREY * 255)
    coloured = (arrays["images"] != grey).any(axis=1)  # [n, S, S]
    h = coloured.shape[1] // 2
    for quadrant in (coloured[:, :h, :h], coloured[:, :h, h:], coloured[:, h:, :h], coloured[:, h:, h:]):
        assert quadrant.any(axis=(1, 2)).all(), "the texture covers the whole frame"


def test_zero_budget_is_refused_for_shapes(tmp_path):
    with pytest.raises(ConfigError, match="0 training samples"):
        load_sweep(vision_raw(tmp_path, data_fractions=[0.0, 0.5]))


@pytest.mark.parametrize(
    "model, head, expected",
    [
        (
            {"name": "resnet18", "width": 4},
            "fc.weight",
            {"conv1.weight", "layer4.1.conv2.weight", "layer2.0.downsample.0.weight"},
        ),
        (
            {"name": "vit", "n_layers": 1, "hidden_dim": 16, "mlp_dim": 32, "n_heads": 2},
            "heads.head.weight",
            {"conv_proj.weight", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"},
        ),
    ],
)
def test_vision_models_are_maskable(tmp_path, model, head, expected):
    sweep = load_sweep(vision_raw(tmp_path, model))
    net = fresh_model(sweep, sweep.build_task(), 0, "init").eval()
    with torch.no_grad():  # torchvision zero-initialises the ViT head; make outputs depend on the body
        dict(net.named_parameters())[head].normal_()
    names = maskable_names(net, MaskSelection())
    roles = parameter_roles(net)
    assert expected <= set(names)
    assert head not in names and roles[head] == "head"
    assert not any(roles[n] in ("norm", "bias", "embedding") for n in names)
    with_norms = maskable_names(net, MaskSelection(norms=True, head=True))
    assert head in with_norms and any(roles[n] == "norm" for n in with_norms)
    x = torch.randn(3, 3, 32, 32)
    params = dict(net.named_parameters())
    fns = {n: ScoreMask(params[n].shape, 0.0) for n in names}
    for n, fn in fns.items():
        fn.hard = torch.ones_like(params[n], dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(MaskedModel(net, fns).eval()(x), net(x)), "an all-ones mask changes nothing"
        for fn in fns.values():
            fn.hard = torch.zeros_like(fn.hard)
        assert not torch.equal(MaskedModel(net, fns).eval()(x), net(x))


def test_shape_bias_analysis_counts_decisions_on_cue_conflict_images():
    """shape_bias = shape decisions / (shape + texture decisions), from the cue-conflict split."""
    from methods.analyses.shape_bias import shape_bias
    from tasks.base import Split, StageData

    class Fixed(torch.nn.Module):  # predicts the given classes in order
        def __init__(self, preds):
            super().__init__()
            self.preds, self.anchor = preds, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(self.preds[: len(x)], 4).float()

    shape, texture = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([1, 2, 3, 0, 1, 2])
    split = Split(torch.zeros(6, 1), {"shape": shape, "texture": texture})
    preds = torch.tensor([0, 2, 2, 0, 3, 3])  # 2 shape decisions, 2 texture decisions, 2 neither
    ctx = types.SimpleNamespace(data=StageData(split, split, {"cue_conflict": split}), eval_batch_size=100, task=None)
    assert shape_bias(ctx, Fixed(preds), None) == {"shape_bias": pytest.approx(0.5)}
    preds = torch.tensor([0, 1, 2, 3, 3, 3])  # 4 shape decisions, none by texture
    assert shape_bias(ctx, Fixed(preds), None)["shape_bias"] == pytest.approx(1.0)
    preds = torch.tensor([2, 3, 0, 1, 2, 3])  # no decision by either cue: undefined
    assert np.isnan(shape_bias(ctx, Fixed(preds), None)["shape_bias"])


def test_trial_reports_every_vision_metric(tmp_path):
    sweep = load_sweep(vision_raw(tmp_path))
    row = run_trial(
        sweep,
        TrialSpec(method="subtask_induction", axes={"mask.sparsity": 0.5}, data_fraction=0.5, seed=0),
        ArtifactStore(tmp_path / "store"),
    )
    for col in (
        "test_acc",
        "splits_silhouette_acc",
        "splits_cue_conflict_acc_shape",
        "splits_cue_conflict_acc_texture",
        "splits_texture_only_acc",
        "shape_bias",
        "shape_bias_val",
        "splits_cue_conflict_val_acc_shape",
        "subtask_acc",
    ):
        assert 0.0 <= row[col] <= 1.0, col
    shape, texture = row["splits_cue_conflict_acc_shape"], row["splits_cue_conflict_acc_texture"]
    assert row["shape_bias"] == pytest.approx(shape / (shape + texture))
