"""Models are not locked to tasks: a task declares what it feeds (tasks.base.Feeds), and every
registered model that accepts it fits; any other is refused naming the ones that do."""

import pytest

from orchestrator.config import load_sweep
from tasks import MODELS
from tasks.base import Feeds, Images, Tokens, models_fitting, register_model
from tests.conftest import tiny_raw


def test_models_fit_by_what_they_accept():
    tokens = Feeds(Tokens(vocab_size=31, n_positions=4, labels_are_tokens=True), n_classes=7)
    images = Feeds(Images(size=16), n_classes=5)
    assert {"gpt", "hf_gpt2", "mlp"} <= set(models_fitting(tokens))
    assert {"resnet18", "vit", "plain_cnn", "mlp", "torchvision", "occam_resnet18"} <= set(models_fitting(images))
    assert "resnet18" not in models_fitting(tokens) and "gpt" not in models_fitting(images)


def test_a_vocabulary_head_needs_labels_that_are_tokens():
    spec = MODELS.get("hf_gpt2")
    labels_not_tokens = Feeds(Tokens(vocab_size=5, n_positions=4), n_classes=7)
    assert "labels are not tokens" in spec.fits(labels_not_tokens, spec.Config())
    needs_lm = Feeds(Tokens(vocab_size=31, n_positions=4, labels_are_tokens=True, sequence_loss=True), n_classes=7)
    assert spec.fits(needs_lm, spec.Config()) is None
    gpt = MODELS.get("gpt")
    assert "language-model head" in gpt.fits(needs_lm, gpt.Config())
    assert gpt.fits(needs_lm, gpt.Config(head="tied_lm")) is None


def test_a_model_of_the_wrong_inputs_is_refused_naming_the_ones_that_fit():
    raw = tiny_raw()
    raw["model"] = {"name": "resnet18"}
    with pytest.raises(ValueError, match=r"model 'resnet18' does not fit task 'modular_arithmetic': it accepts images"
                       r".*feeds token sequences.*models that accept tokens: .*gpt, hf_gpt2, mlp"):  # fmt: skip
        load_sweep(raw)


def test_a_new_image_model_fits_image_tasks_with_no_task_change(tmp_path):
    """The image tasks pass `channels` only where it is not 3: a builder for RGB images need not take it."""
    assert Images(size=8).dims() == {"image_size": 8}
    assert Images(size=8, channels=1).dims() == {"image_size": 8, "channels": 1}
    with pytest.raises(ValueError, match="unknown input kinds"):
        register_model("nope", MODELS.get("mlp").Config, accepts=("audio",))
