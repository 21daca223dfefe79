"""`representation_r2`: held-out variance of a layer explained by a one-hot feature."""

import math
import types

import numpy as np
import pytest
import torch

from common.seeding import numpy_generator, seeded_init
from methods.analyses.representation_r2 import R2Config, r2
from methods.analysis import ANALYSES, parse_analysis
from orchestrator.config import load_sweep
from tasks.shapes import Shapes, ShapesConfig, _normalise
from tasks.shapes_render import COLOURS, GREY
from tests.conftest import tiny_raw


def test_linear_function_of_the_feature_gives_one():
    gen = torch.Generator().manual_seed(0)
    k, d = 5, 12
    f_fit, f_eval = torch.randint(0, k, (200,), generator=gen), torch.randint(0, k, (200,), generator=gen)
    w = torch.randn(k, d, generator=gen)
    assert r2(f_fit, w[f_fit], f_eval, w[f_eval]) == pytest.approx(1.0, abs=1e-12)
    # Extra trailing dimensions are flattened per example.
    assert r2(f_fit, w[f_fit].reshape(200, 3, 4), f_eval, w[f_eval].reshape(200, 3, 4)) == pytest.approx(1.0)


def test_independent_layer_gives_about_zero():
    gen = torch.Generator().manual_seed(1)
    k, d, n = 4, 8, 4000
    f_fit, f_eval = torch.randint(0, k, (n,), generator=gen), torch.randint(0, k, (n,), generator=gen)
    phi_fit, phi_eval = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    assert abs(r2(f_fit, phi_fit, f_eval, phi_eval)) < 0.05


def test_mixture_is_the_variance_share():
    """φ = W f + noise with unit-variance signal and noise: R² ≈ signal / (signal + noise) = 0.5."""
    gen = torch.Generator().manual_seed(2)
    k, d, n = 4, 6, 4000
    w = torch.randn(k, d, generator=gen)
    w = (w - w.mean(0)) / w.std(0, correction=0)  # unit variance per unit over balanced classes
    f_fit, f_eval = torch.arange(n) % k, torch.arange(n) % k
    phi_fit = w[f_fit] + torch.randn(n, d, generator=gen)
    phi_eval = w[f_eval] + torch.randn(n, d, generator=gen)
    value = r2(f_fit, phi_fit, f_eval, phi_eval)
    assert 0 < value < 1
    assert value == pytest.approx(0.5, abs=0.05)


def test_closed_form_matches_least_squares_and_unseen_classes_predict_the_mean():
    gen = torch.Generator().manual_seed(3)
    k, d = 6, 5
    f_fit = torch.randint(0, k - 1, (60,), generator=gen)  # class k - 1 never in fit
    f_eval = torch.randint(0, k, (60,), generator=gen)
    phi_fit, phi_eval = torch.randn(60, d, generator=gen), torch.randn(60, d, generator=gen)
    mean = phi_fit.double().mean(0)
    x_fit = torch.nn.functional.one_hot(f_fit, k).double()
    w = torch.linalg.pinv(x_fit) @ (phi_fit.double() - mean)  # minimum-norm least squares
    pred = torch.nn.functional.one_hot(f_eval, k).double() @ w
    target = phi_eval.double() - mean
    expected = 1 - (pred - target).pow(2).sum() / target.pow(2).sum()
    assert r2(f_fit, phi_fit, f_eval, phi_eval) == pytest.approx(float(expected), abs=1e-10)


def test_constant_layer_is_nan():
    f = torch.arange(10) % 2
    assert math.isnan(r2(f, torch.ones(10, 3), f, torch.ones(10, 3)))


def test_config_block():
    name, config = parse_analysis({"name": "representation_r2", "n": 50, "layers": ["final"]}, "analyses[0]")
    assert name == "representation_r2" and config == R2Config(n=50, layers=("final",))
    with pytest.raises(ValueError, match="n"):
        parse_analysis({"name": "representation_r2", "n": 5}, "analyses[0]")


def _ctx(task, seed=0):
    return types.SimpleNamespace(
        task=task, data=None, device=torch.device("cpu"), eval_batch_size=64, seed=seed, artifacts={}
    )


def _run(ctx, model, config=None):
    spec = ANALYSES.get("representation_r2")
    return spec.check(spec.run(ctx, model, config))


def test_end_to_end_on_a_tiny_gpt():
    sweep = load_sweep(tiny_raw())
    task = sweep.build_task()
    with seeded_init(0, "model"):
        model = task.build_model(sweep.model)
    model.train()
    out = _run(_ctx(task), model, R2Config(n=40))
    features = ("a", "b", "a_mod_p", "b_mod_p", "ab_mod_p", "base")
    layers = model.feature_names()
    assert out.pop("representation_r2_layers") == ",".join(layers)  # the model's order, for the report
    assert set(out) == {f"representation_r2_{layer}_{f}" for layer in layers for f in features}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert model.training  # mode restored
    # The embedding layer of an untrained GPT at the `a` position is a function of a: among the
    # layers, `embed` is explained by a (seen values) far more than by the unrelated ab mod p.
    only = _run(_ctx(task), model, R2Config(n=40, layers=("embed",)))
    assert set(only) == {f"representation_r2_embed_{f}" for f in features} | {"representation_r2_layers"}
    with pytest.raises(ValueError, match="no feature"):
        _run(_ctx(task), model, R2Config(layers=("nope",)))


def test_arithmetic_probe_features_are_disjoint_and_consistent():
    task = load_sweep(tiny_raw()).build_task()
    fit, held = task.probe_features(0)
    p = task.config.modulus
    pairs = {tuple(r) for r in fit.x[:, :2].tolist()}
    assert pairs.isdisjoint({tuple(r) for r in held.x[:, :2].tolist()})
    for split in (fit, held):
        a, b = split.x[:, 0], split.x[:, 1]
        assert torch.equal(split.labels["a"], a) and torch.equal(split.labels["b_mod_p"], b % p)
        assert torch.equal(split.labels["ab_mod_p"], (a * b) % p)
        assert torch.equal(split.labels["base"], (a + a * b) % p)
        assert "y" not in split.labels


def test_task_without_probe_features_is_a_clear_error():
    with pytest.raises(ValueError, match="probe_features"):
        _run(_ctx(object()), torch.nn.Linear(1, 1))


@pytest.fixture
def shapes(tmp_path):
    config = ShapesConfig(n_classes=4, image_size=16, n_base=10, n_subtask=10, pool_size=10, n_val=10,
                          n_test=400, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    return Shapes(config)


def test_shapes_probe_features_recover_colour(shapes):
    """Fit and eval are the two halves of the cue-conflict split (shape != texture), and the
    replayed colour index is the colour actually painted: the foreground pixels (those off the grey
    background) of each image are nearest to COLOURS[colour]."""
    fit, held = shapes.probe_features(3, "cue_conflict")
    assert set(fit.labels) == {"shape", "texture", "colour"} and len(fit) == 200 and len(held) == 200
    arrays = shapes.split_arrays("cue_conflict", 400, 3)
    assert torch.equal(torch.cat([fit.labels["shape"], held.labels["shape"]]), torch.from_numpy(arrays["shape"]))
    assert not (fit.labels["shape"] == fit.labels["texture"]).any()
    images = torch.from_numpy(arrays["images"]).float() / 255
    colours = torch.cat([fit.labels["colour"], held.labels["colour"]])
    checked = 0
    for image, colour in zip(images, colours, strict=True):
        pixels = image.reshape(3, -1).T
        fg = pixels[(pixels - GREY).abs().max(1).values > 0.02]
        if len(fg) == 0:
            continue
        assert int(torch.cdist(fg.mean(0, keepdim=True), COLOURS).argmin()) == int(colour)
        checked += 1
    assert checked > 390
    rng = numpy_generator(3, "shapes:cue_conflict")
    rng.permutation(np.arange(400) % 4)
    rng.integers(1, 4, 400)
    assert np.array_equal(colours.numpy(), rng.integers(0, len(COLOURS), 400))


def test_shapes_end_to_end_on_resnet(shapes):
    from tasks.models.vision import ResNet18Config

    with seeded_init(0, "model"):
        model = shapes.build_model(ResNet18Config())
    out = _run(_ctx(shapes), model, R2Config(n=200, layers=("stem", "pool"), on="cue_conflict"))
    assert out.pop("representation_r2_layers") == "stem,pool"
    assert set(out) == {f"representation_r2_{layer}_{f}" for layer in ("stem", "pool")
                        for f in ("shape", "texture", "colour")}  # fmt: skip
    # Colour (the flat fill of every foreground pixel) dominates an untrained network's pooled features.
    assert out["representation_r2_pool_colour"] > out["representation_r2_pool_shape"]
    assert out["representation_r2_pool_colour"] > out["representation_r2_pool_texture"]


@pytest.mark.slow
def test_a_silhouette_trained_model_represents_shape_more_than_texture(tmp_path):
    """Seed 002's kind of finding on our data: a network trained on silhouettes (shape only, no
    texture) represents shape more than texture on cue-conflict images, where the two disagree;
    trained on textured images (texture and shape agree, texture the easy cue), it is the reverse."""
    from methods.training import TrainConfig, train
    from tasks.models.plain_cnn import PlainCNNConfig

    config = ShapesConfig(n_classes=4, image_size=32, n_base=800, n_subtask=800, pool_size=10, n_val=100,
                          n_test=400, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    task = Shapes(config)
    spec = ANALYSES.get("representation_r2")
    ctx = types.SimpleNamespace(task=task, data=None, device=torch.device("cpu"), eval_batch_size=200, seed=0,
                                artifacts={})  # fmt: skip
    r2s = {}
    for name, data in (("silhouette", task.subtask_data(0)), ("textured", task.base_data(0))):
        with seeded_init(0, "model"):
            model = task.build_model(PlainCNNConfig())
        result = train(model, data, TrainConfig(epochs=12, lr=2e-3, batch_size=64), torch.Generator().manual_seed(0))
        assert result.best_val_acc > 0.7, (name, result.best_val_acc)  # it learnt its training task
        out = spec.run(ctx, model, R2Config(n=200, layers=(model.feature_names()[-1],), on="cue_conflict"))
        layer = model.feature_names()[-1].replace("_", "-").replace(".", "-")
        r2s[name] = (out[f"representation_r2_{layer}_shape"], out[f"representation_r2_{layer}_texture"])
    assert r2s["silhouette"][0] > r2s["silhouette"][1], r2s
    assert r2s["textured"][1] > r2s["textured"][0], r2s


def test_shapes_in_distribution_probes_are_the_test_split(shapes):
    """The default probe set: the textured test split's two halves, labelled with the class (shape; the
    texture there is the shape's, so it gets no column of its own) and the colour actually painted."""
    fit, held = shapes.probe_features(3)
    assert set(fit.labels) == {"shape", "colour"} and len(fit) == 200 and len(held) == 200
    arrays = shapes.split_arrays("test", 400, 3)
    assert torch.equal(torch.cat([fit.x, held.x]), _normalise(arrays["images"]))
    assert torch.equal(torch.cat([fit.labels["shape"], held.labels["shape"]]), torch.from_numpy(arrays["shape"]))
    images = torch.from_numpy(arrays["images"]).float() / 255
    colours = torch.cat([fit.labels["colour"], held.labels["colour"]])
    checked = 0
    for image, colour in zip(images, colours, strict=True):
        pixels = image.reshape(3, -1).T
        fg = pixels[(pixels - GREY).abs().max(1).values > 0.02]
        if len(fg) == 0:
            continue
        # textured foregrounds mix the colour with the texture's pattern; the mean stays nearest it
        checked += int(torch.cdist(fg.mean(0, keepdim=True), COLOURS).argmin()) == int(colour)
    assert checked > 0.9 * len(images)
    with pytest.raises(ValueError, match="no probe set 'nope'.*in_distribution"):
        shapes.probe_features(3, "nope")


def test_unknown_probe_set_is_recorded_as_a_clear_error():
    task = load_sweep(tiny_raw()).build_task()
    with pytest.raises(ValueError, match="no probe set 'cue_conflict'"):
        _run(_ctx(task), torch.nn.Linear(1, 1), R2Config(on="cue_conflict"))


def test_r2_beside_accuracy_pairs_only_accuracy_matched_series():
    import pandas as pd

    from methods.analyses.representation_r2 import beside_accuracy

    def row(series, acc, lo, hi, r2):
        spread = (("mean", 0), ("ci_lo", -0.1), ("ci_hi", 0.1))
        r2_cells = {f"representation_r2_pool_shape_{s}": r2 + d for s, d in spread}
        return {"series": series, "label": series, "task": "t", "n_train": 100, "test_acc_mean": acc,
                "test_acc_ci_lo": lo, "test_acc_ci_hi": hi, **r2_cells}  # fmt: skip

    summary = pd.DataFrame([row("a", 0.80, 0.75, 0.85, 0.5), row("b", 0.83, 0.78, 0.88, 0.2),
                            row("c", 0.95, 0.93, 0.97, 0.4)])  # fmt: skip
    table = pd.DataFrame({"series": ["a", "b", "c"], "representation_r2_layers": ["stem,pool"] * 3})
    out = beside_accuracy(summary, table).set_index("series")
    assert out.loc["a", "accuracy-matched with"] == "b" and out.loc["b", "accuracy-matched with"] == "a"
    assert out.loc["c", "accuracy-matched with"] == "none"
    assert set(out["layer"]) == {"pool"} and set(out["feature"]) == {"shape"}
    assert out.loc["a", "R²"] == "0.500 [0.400, 0.600]"
    assert beside_accuracy(summary, table.drop(columns="representation_r2_layers")).empty
