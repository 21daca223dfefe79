"""Linear CKA against the HSIC formula, its invariances, and the guidance layer map."""

import math

import pytest
import torch

from methods.cka import hsic_cka, layer_map, linear_cka


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(32, 8), (16, 40), (10, 3, 4, 4)])
def test_cka_of_a_representation_with_itself_is_one(shape):
    x = _randn(*shape)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling():
    x, y = _randn(40, 12, seed=0), _randn(40, 7, seed=1) + 0.5 * _randn(40, 12, seed=0)[:, :7]
    q, _ = torch.linalg.qr(_randn(12, 12, seed=2))
    base = linear_cka(x, y).item()
    assert linear_cka(x @ q, y).item() == pytest.approx(base, abs=1e-5)
    assert linear_cka(3.7 * x, y).item() == pytest.approx(base, abs=1e-5)
    assert linear_cka(x, 0.01 * y).item() == pytest.approx(base, abs=1e-5)
    assert 0.0 < base < 1.0


@pytest.mark.parametrize(
    "n, x_shape, y_shape",
    [(50, (6,), (9,)), (20, (64,), (30,)), (8, (4, 5, 5), (3,)), (12, (12,), (200,)), (30, (30,), (30,))],
)
def test_cka_equals_the_hsic_formula(n, x_shape, y_shape):
    """Both the feature form (p, q < n) and the Gram form (features > n) agree with tr(KHLH)."""
    x = _randn(n, *x_shape, seed=3)
    y = _randn(n, *y_shape, seed=4) + 0.3 * x.reshape(n, -1)[:, :1]  # some shared signal
    assert linear_cka(x, y).item() == pytest.approx(hsic_cka(x, y).item(), rel=1e-4)
    assert linear_cka(x, y).dtype == torch.float32


def test_cka_is_differentiable():
    x = _randn(16, 10, seed=5).float().requires_grad_()
    y = _randn(16, 3, 4, seed=6).float()
    (1 - linear_cka(x, y)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    wide = _randn(6, 50, seed=7).float().requires_grad_()  # the Gram form
    (1 - linear_cka(wide, y[:6])).backward()
    assert torch.isfinite(wide.grad).all() and wide.grad.abs().sum() > 0
    const = torch.ones(8, 5, requires_grad=True)  # no variance: CKA 0, gradients finite
    value = linear_cka(const, _randn(8, 4).float())
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(const.grad).all()


def test_cka_refuses_mismatched_batches():
    with pytest.raises(ValueError, match="examples"):
        linear_cka(torch.randn(4, 3), torch.randn(5, 3))


def test_layer_map_of_equal_depths_is_the_identity():
    assert layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_map(1, 1) == [(0, 0)]
    assert layer_map(5, 1) == [(0, 0)]


def test_layer_map_rounds_half_up_and_keeps_every_pair():
    # g (n_t - 1) / (n_g - 1) for (2, 5): 0, .25, .5, .75, 1 -> 0, 0, 1, 1, 1 (round() would send .5 to 0)
    assert layer_map(2, 5) == [(0, 0), (0, 1), (1, 2), (1, 3), (1, 4)]
    assert layer_map(1, 3) == [(0, 0), (0, 1), (0, 2)]
    assert layer_map(7, 3) == [(0, 0), (3, 1), (6, 2)]


@pytest.mark.parametrize("n_t, n_g", [(2, 5), (3, 9), (10, 4), (4, 10), (20, 7), (5, 5)])
def test_layer_map_follows_the_formula(n_t, n_g):
    pairs = layer_map(n_t, n_g)
    assert [g for _, g in pairs] == list(range(n_g))  # one pair per guide layer, none overwritten
    for t, g in pairs:
        assert t == math.floor(g * (n_t - 1) / (n_g - 1) + 0.5)
        assert 0 <= t < n_t
    assert pairs[0][0] == 0 and pairs[-1][0] == n_t - 1


def test_layer_map_refuses_empty_models():
    with pytest.raises(ValueError):
        layer_map(0, 3)
