"""model: {name: torchvision, arch: ..., weights: PATH}: torchvision classifiers by name, from local weights."""

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import get_model

from methods.masking import MaskSelection, maskable_names
from tasks import MODELS

SPEC = MODELS.get("torchvision")


def _build(n_classes=5, **config):
    return SPEC.build(SPEC.Config(**config), n_classes=n_classes, image_size=16)


def test_an_architecture_by_name_with_the_feature_api():
    torch.manual_seed(0)
    model = _build(arch="mobilenet_v3_small").eval()
    x = torch.randn(2, 3, 16, 16)
    logits, features = model(x, intermediates=True)
    assert logits.shape == (2, 5) and torch.equal(model(x), logits)
    assert model.head_name == "net.classifier.3"
    assert tuple(features) == model.feature_names() == ("features", "final")
    head = dict(model.named_modules())[model.head_name]
    assert torch.equal(head(features["final"]), logits)
    names = maskable_names(model, MaskSelection())
    assert names and not any(n.startswith("net.classifier.3.") for n in names)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_are_loaded_and_a_classifier_of_other_classes_is_replaced(tmp_path, suffix):
    torch.manual_seed(1)
    pretrained = get_model("resnet18", weights=None, num_classes=10)  # e.g. weights saved beforehand
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(pretrained.state_dict(), str(path))
    else:
        torch.save(pretrained.state_dict(), path)
    same = _build(n_classes=10, arch="resnet18", weights=str(path))
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(same.net.state_dict()[name], tensor), name
    other = _build(n_classes=5, arch="resnet18", weights=str(path))
    assert other.net.fc.out_features == 5
    assert torch.equal(other.net.layer4[1].conv2.weight, pretrained.layer4[1].conv2.weight)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet19'"):
        SPEC.Config(arch="resnet19")
    with pytest.raises(ValueError, match="is not a file.*nothing is downloaded"):
        _build(arch="resnet18", weights=str(tmp_path / "missing.pt"))
    path = tmp_path / "vgg.safetensors"
    save_file({"fc.weight": torch.zeros(5, 3)}, str(path))
    with pytest.raises(ValueError, match="does not fit torchvision's resnet18"):
        _build(arch="resnet18", weights=str(path))
