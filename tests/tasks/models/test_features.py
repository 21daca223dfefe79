"""Every registered model exposes named intermediate features without changing its logits."""

import pytest
import torch

from methods.masking import MaskSelection, effective_state_dict, maskable_names
from methods.transfer import TransferConfig, transfer
from tasks import MODELS

B = 3


def _image(size=16):
    return lambda gen: torch.randn(B, 3, size, size, generator=gen)


# name -> (tiny config, task dimensions, input maker, expected feature shapes)
TINY = {
    "gpt": (
        {"n_layers": 2, "d_model": 16, "n_heads": 2, "dropout": 0.1},
        {"vocab_size": 11, "n_positions": 4, "n_classes": 7},
        lambda gen: torch.randint(0, 11, (B, 3), generator=gen),
        {"embed": (B, 3, 16), "block0": (B, 3, 16), "block1": (B, 3, 16), "final": (B, 16)},
    ),
    "hf_gpt2": (  # logits over the vocabulary (11), read as the classes
        {"n_layer": 2, "n_embd": 16, "n_head": 2},
        {"vocab_size": 11, "n_positions": 4, "n_classes": 7},
        lambda gen: torch.randint(0, 11, (B, 3), generator=gen),
        {"embed": (B, 3, 16), "block0": (B, 3, 16), "block1": (B, 3, 16), "final": (B, 16)},
    ),
    "resnet18": (
        {"width": 4},
        {"n_classes": 5, "image_size": 16},
        _image(),
        {
            "stem": (B, 4, 16, 16),
            "layer1": (B, 4, 16, 16),
            "layer2": (B, 8, 8, 8),
            "layer3": (B, 16, 4, 4),
            "layer4": (B, 32, 2, 2),
            "pool": (B, 32),
        },
    ),
    "torchvision": (  # torchvision's own resnet18 (ImageNet stem): 16 px -> 8 (conv1) -> 4 (max-pool)
        {"arch": "resnet18"},
        {"n_classes": 5, "image_size": 16},
        _image(),
        {
            "conv1": (B, 64, 8, 8),
            "bn1": (B, 64, 8, 8),
            "layer1": (B, 64, 4, 4),
            "layer2": (B, 128, 2, 2),
            "layer3": (B, 256, 1, 1),
            "layer4": (B, 512, 1, 1),
            "final": (B, 512),
        },
    ),
    "vit": (
        {"patch_size": 4, "n_layers": 2, "n_heads": 2, "hidden_dim": 16, "mlp_dim": 32, "dropout": 0.1},
        {"n_classes": 5, "image_size": 16},
        _image(),
        {"embed": (B, 17, 16), "block0": (B, 17, 16), "block1": (B, 17, 16), "final": (B, 16)},
    ),
    "mlp": (
        {"n_layers": 2, "width": 8, "embed_dim": 4, "dropout": 0.1},
        {"vocab_size": 11, "n_positions": 4, "n_classes": 7},
        lambda gen: torch.randint(0, 11, (B, 3), generator=gen),
        {"embed": (B, 16), "layer0": (B, 8), "layer1": (B, 8), "final": (B, 8)},
    ),
    "occam_resnet18": (
        {"width": 4},
        {"n_classes": 5, "image_size": 16},
        _image(),
        {
            "stem": (B, 4, 16, 16),
            "layer1": (B, 4, 16, 16),
            "layer2": (B, 8, 8, 8),
            "layer3": (B, 16, 4, 4),
            "layer4": (B, 32, 2, 2),
            "pool": (B, 8 + 16 + 32 + 3),  # pooled cam_in of exits 1-3, then their gate logits
        },
    ),
    "plain_cnn": (
        {"n_blocks": 3, "width": 4},
        {"n_classes": 5, "image_size": 16},
        _image(),
        {"block0": (B, 4, 16, 16), "block1": (B, 4, 8, 8), "block2": (B, 4, 4, 4), "pool": (B, 4)},
    ),
}


def _build(name: str, seed: int = 0):
    if name not in TINY:
        where = "tests/tasks/models/test_features.py::TINY"
        pytest.fail(f"model {name!r} is registered but has no tiny config in {where}; add one")
    config, dims, make_input, shapes = TINY[name]
    spec = MODELS.get(name)
    torch.manual_seed(seed)
    model = spec.build(spec.Config(name=name, **config), **dims)
    return model, make_input(torch.Generator().manual_seed(1)), shapes


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_intermediates_leave_the_logits_bit_identical(name, mode):
    model, x, _ = _build(name)
    model.train(mode == "train")
    torch.manual_seed(5)  # the same dropout draws for both calls
    plain = model(x)
    torch.manual_seed(5)
    logits, features = model(x, intermediates=True)
    assert torch.equal(plain, logits)
    assert isinstance(features, dict)


@pytest.mark.parametrize("name", MODELS.names())
def test_features_are_named_and_shaped_as_declared(name):
    model, x, shapes = _build(name)
    model.eval()
    logits, features = model(x, intermediates=True)
    assert tuple(features) == tuple(model.feature_names()) == tuple(shapes)
    for key, shape in shapes.items():
        assert tuple(features[key].shape) == shape, key
    # The penultimate feature is what the head reads.
    assert model.penultimate in features
    head = dict(model.named_modules())[model.head_name]
    assert torch.equal(head(features[model.penultimate]), logits)


@pytest.mark.parametrize("name", MODELS.names())
def test_features_of_a_masked_model_are_those_of_its_effective_weights(name):
    source, x, _ = _build(name, seed=0)
    fresh, _, _ = _build(name, seed=1)
    names = maskable_names(source, MaskSelection())
    gen = torch.Generator().manual_seed(2)
    params = dict(source.named_parameters())
    mask = {n: torch.rand(params[n].shape, generator=gen) < 0.5 for n in names}
    masked = transfer(source, fresh, mask, TransferConfig()).eval()
    plain, _, _ = _build(name, seed=3)
    plain.load_state_dict(effective_state_dict(masked))
    plain.eval()

    logits, features = masked(x, intermediates=True)
    plain_logits, plain_features = plain(x, intermediates=True)
    assert torch.equal(logits, masked(x))
    assert tuple(features) == tuple(plain_features)
    assert torch.equal(logits, plain_logits)
    for key in features:
        assert torch.equal(features[key], plain_features[key]), key


def test_vision_forwards_match_torchvisions_own():
    """The rewritten forwards run torchvision's steps: same logits as its original methods."""
    from torchvision.models import VisionTransformer
    from torchvision.models.resnet import ResNet

    for name, original in [("resnet18", ResNet._forward_impl), ("vit", VisionTransformer.forward)]:
        model, x, _ = _build(name)
        model.eval()
        assert torch.equal(model(x), original(model, x)), name
