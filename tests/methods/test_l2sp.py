"""L2-SP through the shared loop: alpha = 0 is full transfer bit for bit; alpha > 0 stays nearer the source."""

import pytest
import torch
from pydantic import ValidationError

from common.seeding import seeded_init, torch_generator
from methods import l2sp as _l2sp  # noqa: F401  (registers the method)
from methods.l2sp import L2SPConfig, l2sp_penalty
from methods.registry import MethodContext, get_method
from methods.training import evaluate, fit, train


@pytest.fixture(scope="module")
def setup():
    from orchestrator.config import load_sweep
    from tests.conftest import tiny_raw

    sweep = load_sweep(tiny_raw(training={"epochs": 4, "lr": 3e-3}))
    task = sweep.build_task()

    def fresh(stage: str) -> torch.nn.Module:
        with seeded_init(0, stage):
            return task.build_model(sweep.model)

    source = fresh("source_init")
    train(source, task.base_data(0), sweep.block("source"), torch_generator(0, "source_train"))
    return sweep, task, fresh, source


def _context(setup, config) -> MethodContext:
    sweep, task, fresh, source = setup
    return MethodContext(
        task=task,
        data=task.downstream_data(0, 0.5),
        config=config,
        training=sweep.training,
        artifacts={"source": source},
        generator=torch_generator(0, "method"),
        device=torch.device("cpu"),
        fresh_model=fresh,
    )


def _run(setup, name: str, config):
    ctx = _context(setup, config)
    method = get_method(name)
    model = method.build(ctx)
    result = fit(method.objective(ctx, model), ctx.data, ctx.training, torch_generator(0, "downstream_train"))
    return ctx, model, result


@torch.no_grad()
def _distance(model, source) -> float:
    src = dict(source.named_parameters())
    return float(sum(((p - src[n]) ** 2).sum() for n, p in model.named_parameters()))


def test_alpha_zero_is_full_transfer_bit_for_bit(setup):
    source = setup[3]
    before = {k: v.clone() for k, v in source.state_dict().items()}
    ctx, full, full_result = _run(setup, "full_transfer", None)
    _, l2sp, l2sp_result = _run(setup, "l2sp", L2SPConfig(alpha=0.0))

    full_state, l2sp_state = full.state_dict(), l2sp.state_dict()
    assert full_state.keys() == l2sp_state.keys()
    assert all(torch.equal(full_state[k], l2sp_state[k]) for k in full_state)
    assert l2sp_result.history == full_result.history
    assert (l2sp_result.best_val_acc, l2sp_result.best_epoch) == (full_result.best_val_acc, full_result.best_epoch)
    assert [m["ce"] for m in l2sp_result.measurements] == [m["ce"] for m in full_result.measurements]
    for split in (ctx.data.val, *ctx.data.evals.values()):
        assert evaluate(l2sp, split) == evaluate(full, split)
    # Fine-tuning moved the copies, never the shared source artifact.
    assert _distance(full, source) > 0
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())


def test_penalty_keeps_weights_nearer_the_source(setup):
    source = setup[3]
    _, free, _ = _run(setup, "l2sp", L2SPConfig(alpha=0.0))
    _, held, result = _run(setup, "l2sp", L2SPConfig(alpha=1.0))
    assert _distance(held, source) < 0.5 * _distance(free, source)
    # The penalty is reported every epoch beside the cross-entropy, and it is the squared distance.
    assert all({"ce", "l2sp"} <= set(m) for m in result.measurements)
    assert all(m["l2sp"] >= 0 for m in result.measurements)
    assert result.measurements[-1]["l2sp"] > 0


def test_penalty_is_the_squared_distance_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=gen, requires_grad=True), torch.randn(5, generator=gen, requires_grad=True)]
    anchors = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    penalty = l2sp_penalty(params, anchors)
    expected = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    for p, a in zip(params, anchors, strict=True):
        torch.testing.assert_close(p.grad, 2 * (p.detach() - a))


def test_config_block_is_validated():
    assert L2SPConfig().alpha == 0.01
    assert L2SPConfig.model_validate({"alpha": 0.001}).alpha == 0.001
    with pytest.raises(ValidationError):
        L2SPConfig(alpha=-1.0)
    with pytest.raises(ValidationError):
        L2SPConfig.model_validate({"alpah": 0.1})
    method = get_method("l2sp")
    assert method.Config is L2SPConfig and method.needs == ("source",)
