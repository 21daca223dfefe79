"""The guidance targets `mlp` and `plain_cnn`: built by their tasks, features, masks, one trial each."""

import pytest
import torch

from methods.masking import MaskSelection, maskable_names, parameter_roles
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tests.conftest import tiny_raw
from tests.tasks.test_shapes import vision_raw

MLP = {"name": "mlp", "n_layers": 2, "width": 16, "embed_dim": 4}
PLAIN_CNN = {"name": "plain_cnn", "n_blocks": 3, "width": 4}


def _arith_raw(model=MLP, **overrides):
    raw = tiny_raw(**overrides)
    raw["model"] = model  # tiny_raw would merge the block into the gpt one
    return raw


def _arith(**overrides):
    return load_sweep(_arith_raw(**overrides))


def _vision(tmp_path, model, **overrides):
    return load_sweep(vision_raw(tmp_path, model, task={**vision_raw(tmp_path)["task"], "image_size": 16}, **overrides))


def _inputs(task, sweep):
    data = task.base_data(0)
    return data.train.x[:5]


@pytest.mark.parametrize("which", ["mlp_arith", "mlp_shapes", "plain_cnn_shapes"])
def test_models_build_through_their_task_and_expose_features(tmp_path, which):
    sweep = _arith() if which == "mlp_arith" else _vision(tmp_path, MLP if which == "mlp_shapes" else PLAIN_CNN)
    task = sweep.build_task()
    torch.manual_seed(0)
    model = task.build_model(sweep.model).eval()
    x = _inputs(task, sweep)
    logits = model(x)
    n_classes = task.config.modulus if which == "mlp_arith" else task.config.n_classes
    assert logits.shape == (5, n_classes)
    same, features = model(x, intermediates=True)
    assert torch.equal(logits, same)
    assert tuple(features) == model.feature_names()
    head = dict(model.named_modules())[model.head_name]
    assert torch.equal(head(features[model.penultimate]), logits)
    if which == "mlp_arith":
        assert features["embed"].shape == (5, task.n_positions * 4)
        assert [features[f"layer{i}"].shape for i in range(2)] == [(5, 16)] * 2
    elif which == "mlp_shapes":
        assert features["embed"].shape == (5, 3 * 16 * 16)
    else:  # 16 px: block0 keeps 16, block1 pools to 8, block2 to 4
        assert [tuple(features[f"block{i}"].shape) for i in range(3)] == [(5, 4, 16, 16), (5, 4, 8, 8), (5, 4, 4, 4)]
        assert features["pool"].shape == (5, 4)


def test_plain_cnn_stops_pooling_at_four_pixels():
    from tasks import MODELS

    spec = MODELS.get("plain_cnn")
    model = spec.build(spec.Config(name="plain_cnn", n_blocks=5, width=2), n_classes=3, image_size=16).eval()
    _, features = model(torch.randn(2, 3, 16, 16), intermediates=True)
    assert [features[f"block{i}"].shape[-1] for i in range(5)] == [16, 8, 4, 4, 4]


@pytest.mark.parametrize("which", ["mlp_arith", "mlp_shapes", "plain_cnn_shapes"])
def test_masks_cover_hidden_weights_only(tmp_path, which):
    sweep = _arith() if which == "mlp_arith" else _vision(tmp_path, MLP if which == "mlp_shapes" else PLAIN_CNN)
    model = sweep.build_task().build_model(sweep.model)
    names = maskable_names(model, MaskSelection())
    roles = parameter_roles(model)
    assert all(roles[n] == "weight" for n in names)
    head = model.head_name
    assert not any(n.startswith(head + ".") for n in names)
    if which == "plain_cnn_shapes":
        assert names == ["blocks.0.0.weight", "blocks.1.0.weight", "blocks.2.0.weight"]
        assert roles["blocks.0.1.weight"] == "norm"
    else:
        assert names == ["layers.0.weight", "layers.1.weight"]
        if which == "mlp_arith":
            assert roles["embed.weight"] == "embedding"


def test_arithmetic_refuses_plain_cnn():
    with pytest.raises(ValueError, match=r"plain_cnn.*accepts images.*feeds token sequences.*gpt, hf_gpt2, mlp"):
        load_sweep(_arith_raw(PLAIN_CNN))


def test_mlp_refuses_too_long_sequences():
    model = _arith().build_task().build_model(_arith().model)
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("which", ["mlp_arith", "mlp_shapes", "plain_cnn_shapes"])
def test_scratch_trial_runs(tmp_path, which):
    if which == "mlp_arith":
        sweep = _arith(methods=["scratch"])
    else:
        sweep = _vision(tmp_path, MLP if which == "mlp_shapes" else PLAIN_CNN, methods=["scratch"])
    row = run_trial(sweep, TrialSpec(method="scratch", data_fraction=0.5, seed=0), ArtifactStore(tmp_path / "store"))
    assert 0.0 <= row["test_acc"] <= 1.0
