"""Hard concrete discovery: the gate's distribution, exact sparsity by ranking, determinism, its own
noise stream, and (slow) a working subnetwork in the quickstart's source."""

import copy
import time

import pytest
import torch
from pydantic import ValidationError

from common.seeding import seeded_init, torch_generator
from methods import hard_concrete as _hard_concrete  # noqa: F401  (registers the discoverer)
from methods.discovery import DiscoveryConfig, discover
from methods.hard_concrete import HardConcreteGate, expected_gate, expected_open, half_open_log_alpha
from methods.masking import density
from methods.training import train

STRETCH = (-0.1, 1.1)
HC_LR = 0.1  # the quickstart's discovery lr (2e-3) is continuous sparsification's; see methods/hard_concrete.py


# --- the gate ----------------------------------------------------------------------------


def test_gate_samples_reach_exact_zero_and_one_and_match_the_penalty_and_expectation():
    n, log_alpha = 200_000, 0.7
    gate = HardConcreteGate((n,), log_alpha, 2 / 3, STRETCH)
    gate.noise = torch.rand(n, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = gate.gate()
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    assert 0.05 < float((z == 0).float().mean()) < 0.5 and 0.05 < float((z == 1).float().mean()) < 0.8
    # The L0 penalty's summand is P(z != 0); E[z] by quadrature matches the samples' mean.
    p_open = float(expected_open(torch.tensor(log_alpha), 2 / 3, STRETCH))
    assert abs(float((z > 0).float().mean()) - p_open) < 5e-3
    assert abs(float(z.mean()) - expected_gate(log_alpha, 2 / 3, STRETCH)) < 5e-3


def test_gate_modes():
    weight = torch.randn(4, 3)
    gate = HardConcreteGate(weight.shape, 0.0, 2 / 3, STRETCH)
    gate.hard = torch.tensor([[1, 0, 1]] * 4, dtype=torch.bool)
    assert torch.equal(gate(weight), weight * gate.hard)
    gate.hard = None  # no noise: the paper's test-time estimate, clamp(sigmoid(0) * 1.2 - 0.1) = 0.5
    torch.testing.assert_close(gate(weight), weight * 0.5)


def test_half_open_threshold():
    assert half_open_log_alpha(2 / 3, STRETCH) == 0.0  # symmetric stretch: E[z] = 1/2 at log_alpha = 0
    for stretch in [(-0.2, 1.1), (-0.1, 1.3)]:
        threshold = half_open_log_alpha(2 / 3, stretch)
        assert threshold != 0.0
        assert abs(expected_gate(threshold, 2 / 3, stretch) - 0.5) < 1e-9


def test_config_fields_and_validation():
    cfg = DiscoveryConfig()
    assert cfg.hc_beta == pytest.approx(2 / 3) and cfg.hc_stretch == STRETCH
    assert DiscoveryConfig.model_validate({"method": "hard_concrete", "hc_stretch": [-0.2, 1.2]}).hc_stretch == (
        -0.2,
        1.2,
    )
    for bad in ({"hc_stretch": [0.0, 1.1]}, {"hc_stretch": [-0.1, 1.0]}, {"hc_beta": 0.0}):
        with pytest.raises(ValidationError):
            DiscoveryConfig.model_validate(bad)


# --- discovery on a tiny source ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup():
    from orchestrator.config import load_sweep
    from tests.conftest import tiny_raw

    sweep = load_sweep(tiny_raw())
    task = sweep.build_task()
    with seeded_init(0, "source_init"):
        source = task.build_model(sweep.model)
    train(source, task.base_data(0), sweep.block("source"), torch_generator(0, "source_train"))
    return source, task.subtask_data(0)


def _cfg(**overrides) -> DiscoveryConfig:
    return DiscoveryConfig(method="hard_concrete", epochs=3, batch_size=50, lr=0.1, **overrides)


@pytest.mark.parametrize("sparsity", [0.3, 0.75, 0.9])
def test_requested_sparsity_is_hit_exactly(tiny_setup, sparsity):
    source, data = tiny_setup
    found = discover(copy.deepcopy(source), data, _cfg(), sparsity, torch_generator(0, "discovery"))
    total = sum(m.numel() for m in found.mask.values())
    ones = sum(int(m.sum()) for m in found.mask.values())
    assert ones == round((1 - sparsity) * total)
    assert abs((1 - found.density) - sparsity) < 0.005
    assert found.density == density(found.mask)
    assert 0.0 <= found.natural_density <= 1.0
    assert 1 <= found.best_epoch <= 3 and len(found.history) == 3
    assert found.subtask_acc == max(found.history)


def test_same_seed_same_mask_and_its_own_noise_stream(tiny_setup):
    source, data = tiny_setup
    runs = []
    for seed in (0, 0, 1):
        generator = torch_generator(seed, "discovery")
        found = discover(copy.deepcopy(source), data, _cfg(), 0.75, generator)
        runs.append((found, generator.get_state()))
    (a, state_a), (b, _), (c, _) = runs
    assert a.history == b.history and a.natural_density == b.natural_density
    assert all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask)
    assert any(not torch.equal(a.mask[n], c.mask[n]) for n in a.mask)
    # The discovery generator only shuffles batches: after the run it is where continuous
    # sparsification, which draws nothing else from it, leaves it.
    generator = torch_generator(0, "discovery")
    cs = DiscoveryConfig(epochs=3, batch_size=50, lr=0.1)
    discover(copy.deepcopy(source), data, cs, 0.75, generator)
    assert torch.equal(state_a, generator.get_state())


def test_natural_density_counts_gates_whose_expected_value_exceeds_a_half(tiny_setup):
    source, data = tiny_setup
    # 12 steps of at most lr = 0.1 each cannot carry a log_alpha from -3 or 3 across 0.
    closed = discover(copy.deepcopy(source), data, _cfg(hc_init_log_alpha=-3.0), 0.5, torch_generator(0, "discovery"))
    opened = discover(copy.deepcopy(source), data, _cfg(hc_init_log_alpha=3.0), 0.5, torch_generator(0, "discovery"))
    assert closed.natural_density < 0.05 and opened.natural_density > 0.95


# --- slow: the quickstart's source -------------------------------------------------------


@pytest.mark.slow
def test_finds_a_working_subnetwork_in_the_quickstart_source():
    """Train the quickstart's source (about 1-2 minutes on one CPU), then discover with the
    quickstart's discovery block, method hard_concrete and the learning rate it needs."""
    from orchestrator.config import load_sweep_file

    sweep = load_sweep_file("configs/quickstart.yaml")
    task = sweep.build_task()
    with seeded_init(0, "source_init"):
        source = task.build_model(sweep.model)
    started = time.perf_counter()
    trained = train(source, task.base_data(0), sweep.block("source"), torch_generator(0, "source_train"))
    assert trained.best_val_acc > 0.99
    cfg = sweep.block("discovery").model_copy(update={"method": "hard_concrete", "lr": HC_LR})
    found = discover(copy.deepcopy(source), task.subtask_data(0), cfg, 0.75, torch_generator(0, "discovery"))
    elapsed = time.perf_counter() - started
    print(f"hard concrete on the quickstart source: subtask acc {found.subtask_acc:.3f} at sparsity 0.75 "
          f"(natural density {found.natural_density:.3f}, best epoch {found.best_epoch}); {elapsed:.0f} s")  # fmt: skip
    assert abs((1 - found.density) - 0.75) < 0.005
    assert found.subtask_acc >= 0.9
