import numpy as np
import pytest
import torch

from orchestrator.config import ConfigError, load_sweep
from tasks import expr
from tasks.arithmetic import ModularArithmetic, ModularArithmeticConfig
from tests.conftest import tiny_raw


@pytest.fixture
def task():
    return ModularArithmetic(ModularArithmeticConfig(**{k: v for k, v in tiny_raw()["task"].items()}))


def _pairs(split):
    return {tuple(r) for r in split.x[:, :2].tolist()}


def test_downstream_and_competing_readings_agree_on_the_ambiguous_samples(task):
    a = np.arange(task.config.operand_range)
    readings = [task.config.downstream, *task.config.competing, "a^2 + b^2"]
    values = [expr.evaluate(expr.parse(r), a, a, task.config.modulus) for r in readings]
    for v in values[1:]:
        np.testing.assert_array_equal(v, values[0])
    # ... and the ambiguous part of the training set is exactly the a == b pairs
    train = task.downstream_data(0, 0.0).train
    assert len(train) == task.config.operand_range
    assert (train.x[:, 0] == train.x[:, 1]).all()


def test_competing_readings_disagree_off_the_ambiguous_samples(task):
    test = task.downstream_data(0, 1.0).evals["test"]
    assert set(test.labels) == {"y", "2a2", "2b2"}
    assert (test.labels["y"] != test.labels["2a2"]).float().mean() > 0.5


def test_splits_are_disjoint_and_sized(task):
    c = task.config
    down = task.downstream_data(0, 1.0)
    base, sub = task.base_data(0), task.subtask_data(0)
    pool = _pairs(down.train) - {(a, a) for a in range(c.operand_range)}
    splits = {
        "pool": pool,
        "val": _pairs(down.val),
        "test": _pairs(down.evals["test"]),
        "base": _pairs(base.train),
        "base_val": _pairs(base.val),
        "subtask": _pairs(sub.train),
        "subtask_val": _pairs(sub.val),
    }
    sizes = {
        "pool": c.pool_size,
        "val": c.n_val,
        "test": c.n_test,
        "base": c.n_base,
        "base_val": c.n_val,
        "subtask": c.n_subtask,
        "subtask_val": c.n_val,
    }
    for name, pairs in splits.items():
        assert len(pairs) == sizes[name], name
        assert all(a != b for a, b in pairs), f"{name} holds an ambiguous pair"
    names = list(splits)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not splits[x] & splits[y], f"{x} and {y} overlap"


def test_labels_follow_the_rules(task):
    p = task.config.modulus
    base = task.base_data(0).train
    a, b = base.x[:, 0], base.x[:, 1]
    assert torch.equal(base.y, (a + a * b) % p)
    sub = task.subtask_data(0).train
    assert torch.equal(sub.y, (sub.x[:, 0] * sub.x[:, 1]) % p)
    assert (base.x[:, 2] == task.config.operand_range).all()  # the '=' token


def test_budgets_are_nested_and_data_is_deterministic(task):
    small = task.downstream_data(0, 0.2).train
    large = task.downstream_data(0, 0.6).train
    assert torch.equal(large.x[: len(small)], small.x)
    assert len(small) - task.config.operand_range == task.downstream_size(0.2) == 20
    again = ModularArithmetic(task.config).downstream_data(0, 0.6).train
    assert torch.equal(again.x, large.x)
    other_seed = task.downstream_data(1, 0.6).train
    assert not torch.equal(other_seed.x, large.x)


def test_downstream_splits_do_not_move_with_base_sizes(task):
    bigger = ModularArithmetic(task.config.model_copy(update={"n_base": 400}))
    assert torch.equal(bigger.downstream_data(0, 1.0).evals["test"].x, task.downstream_data(0, 1.0).evals["test"].x)


def test_too_many_samples_for_the_operand_range_is_a_config_error():
    with pytest.raises(ConfigError, match="distinct .* pairs"):
        load_sweep(tiny_raw(task={"n_base": 100_000}))


def test_a_reading_that_does_not_fit_the_ambiguous_data_is_refused():
    with pytest.raises(ConfigError, match="not a competing reading"):
        load_sweep(tiny_raw(task={"competing": ["a + b"]}))
