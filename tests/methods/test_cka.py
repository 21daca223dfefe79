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


def _hsic_u_reference(x: torch.Tensor, y: torch.Tensor) -> float:
    """Song et al. (2012)'s unbiased HSIC written out as the U-statistic over ordered index tuples
    of distinct examples (O(n^4): small n only), from its definition rather than the closed form:
    HSIC_1 = mean over distinct (i, j) of k_ij l_ij + mean over distinct (i, j, q, r) of k_ij l_qr
    - 2 mean over distinct (i, j, q) of k_ij l_iq."""
    import itertools

    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    k, m = (x @ x.T).tolist(), (y @ y.T).tolist()
    n = x.shape[0]
    t2 = [k[i][j] * m[i][j] for i, j in itertools.permutations(range(n), 2)]
    t3 = [k[i][j] * m[i][q] for i, j, q in itertools.permutations(range(n), 3)]
    t4 = [k[i][j] * m[q][r] for i, j, q, r in itertools.permutations(range(n), 4)]
    return sum(t2) / len(t2) + sum(t4) / len(t4) - 2 * sum(t3) / len(t3)


def test_unbiased_cka_is_the_u_statistic_ratio():
    x = _randn(7, 5, seed=11)
    y = _randn(7, 3, seed=12) + 0.5 * x[:, :3]
    ref = _hsic_u_reference(x, y) / math.sqrt(_hsic_u_reference(x, x) * _hsic_u_reference(y, y))
    assert linear_cka(x, y, "unbiased").item() == pytest.approx(ref, rel=1e-4)
    assert linear_cka(x, x, "unbiased").item() == pytest.approx(1.0, abs=1e-5)
    # Exactly invariant to shifting every example by one vector (so centring first is harmless).
    assert linear_cka(x + 3.0, y - 2.0, "unbiased").item() == pytest.approx(ref, rel=1e-4)


def test_biased_cka_inflates_with_more_features_than_examples_and_unbiased_does_not():
    """Two independent random representations share nothing (population CKA 0). With p >> n the
    biased estimate on a batch of 64 is near 1; the unbiased one stays near 0."""
    x, y = _randn(64, 4096, seed=20).float(), _randn(64, 4096, seed=21).float()
    assert linear_cka(x, y).item() > 0.9
    assert abs(linear_cka(x, y, "unbiased").item()) < 0.1


def test_unbiased_cka_on_small_batches_estimates_what_biased_cka_reaches_on_many_examples():
    """The paper's biased CKA at 256 examples is the target of the estimate; on batches of 32 the
    biased estimator overshoots the many-example value while the unbiased one's mean is near it."""
    x = _randn(8192, 8, seed=30).float()
    y = x[:, :4] @ _randn(4, 8, seed=31).float() + 2 * _randn(8192, 8, seed=32).float()
    many = linear_cka(x, y).item()
    parts = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 8192, 32)]
    biased = sum(linear_cka(a, b).item() for a, b in parts) / len(parts)
    unbiased = sum(linear_cka(a, b, "unbiased").item() for a, b in parts) / len(parts)
    assert biased - many > 0.05
    assert abs(unbiased - many) < 0.02


def test_gram_matrices_reused_across_pairs_give_the_same_cka():
    from methods.cka import cka_of_grams, gram

    x, y = _randn(16, 3, 4, 4, seed=40).float(), _randn(16, 20, seed=41).float()
    for est in ("biased", "unbiased"):
        assert cka_of_grams(gram(x, est), gram(y, est), est).item() == pytest.approx(
            linear_cka(x, y, est).item(), rel=1e-5
        )


def test_unbiased_cka_refuses_too_few_examples_and_unknown_estimators():
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(torch.randn(3, 5), torch.randn(3, 5), "unbiased")
    with pytest.raises(ValueError, match="estimator"):
        linear_cka(torch.randn(8, 5), torch.randn(8, 5), "debiased")
