"""The lmc_barrier and subnetwork_ablation analyses, and the plug-in probe analysis, called directly."""

import copy
import math

import pytest
import torch

from common.seeding import seeded_init, torch_generator
from methods.analyses.lmc_barrier import LMCConfig, interpolate, recalibrate_batch_norm
from methods.analysis import ANALYSES, AnalysisContext
from methods.masking import MaskSelection, effective_state_dict, maskable_names
from methods.training import TrainConfig, evaluate, train
from methods.transfer import TransferConfig, transfer
from tasks import TASKS, Split, StageData
from tasks.models.gpt import GPTConfig
from tasks.models.vision import ResNet18Config

GPT = GPTConfig(n_layers=1, d_model=32, n_heads=2, dropout=0.0)


def _arithmetic():
    Task = TASKS.get("modular_arithmetic")
    return Task(Task.Config(operand_range=40, n_base=800, n_subtask=10, pool_size=0, n_val=100, n_test=100))


def _context(task, data, model_config, source=None, eval_batch_size=2000):
    def fresh(stage):
        with seeded_init(0, stage):
            return task.build_model(model_config)

    return AnalysisContext(
        task=task,
        data=data,
        artifacts={} if source is None else {"source": source},
        fresh_model=fresh,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        eval_batch_size=eval_batch_size,
        method="test",
    )


def _run(name, ctx, model, config=None):
    spec = ANALYSES.get(name)
    return spec.check(spec.run(ctx, model, config))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def trained():
    """Two tiny GPTs trained on the base rule a + ab from different seeds (about 2 s; both reach
    over 90% validation accuracy), and the task and data with the base validation split as "test"."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        task = _arithmetic()
        base = task.base_data(0)
        data = StageData(base.train, base.val, {"test": base.val})
        models = []
        for seed in (0, 1):
            with seeded_init(seed, "model"):
                model = task.build_model(GPT)
            cfg = TrainConfig(epochs=60, lr=3e-3, batch_size=100, weight_decay=0.0)
            train(model, base, cfg, torch_generator(seed, "t"))
            models.append(model.eval())
        return task, data, models
    finally:
        torch.set_num_threads(threads)


# --- lmc_barrier -------------------------------------------------------------------------------


def test_interpolation_is_exact_at_the_ends_and_keeps_integer_buffers():
    a = {"w": torch.randn(5), "n": torch.tensor(3)}
    b = {"w": torch.randn(5), "n": torch.tensor(7)}
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert int(interpolate(a, b, 1.0)["n"]) == 3


def test_lmc_barrier_is_zero_for_a_model_against_itself(trained):
    task, data, (a, _) = trained
    out = _run("lmc_barrier", _context(task, data, GPT, source=a), a, LMCConfig())
    assert 0.0 <= out["lmc_barrier"] < 1e-5
    assert out["lmc_barrier_acc_mid"] == evaluate(a, data.evals["test"])["y"]


def test_lmc_barrier_is_large_between_independently_trained_models(trained):
    task, data, (a, b) = trained
    assert evaluate(a, data.val)["y"] > 0.8 and evaluate(b, data.val)["y"] > 0.8
    before = _state(a), _state(b)
    out = _run("lmc_barrier", _context(task, data, GPT, source=a), b, LMCConfig(points=5))
    assert out["lmc_barrier"] > 1.0  # about 2.4 nats; the self-barrier is ~1e-7
    assert out["lmc_barrier_loss_mid"] > out["lmc_barrier"] / 2
    assert out["lmc_barrier_acc_mid"] < 0.5  # the midpoint model is neither solution
    assert _unchanged(a, before[0]) and _unchanged(b, before[1]), "the analysis must not touch its inputs"


def test_lmc_barrier_is_small_for_a_model_fine_tuned_from_its_source(trained):
    task, data, (a, _) = trained
    tuned = copy.deepcopy(a)
    train(tuned, data, TrainConfig(epochs=3, lr=1e-3, batch_size=100), torch_generator(5, "t"))
    out = _run("lmc_barrier", _context(task, data, GPT, source=a), tuned, LMCConfig())
    assert out["lmc_barrier"] < 0.1


def test_lmc_barrier_is_never_negative(trained):
    task, data, (a, b) = trained
    with seeded_init(7, "other"):
        untrained = task.build_model(GPT)
    names = maskable_names(a, MaskSelection())
    gen = torch.Generator().manual_seed(3)
    mask = {n: torch.rand(dict(a.named_parameters())[n].shape, generator=gen) < 0.5 for n in names}
    masked = transfer(a, copy.deepcopy(untrained), mask, TransferConfig())
    pairs = [(a, b), (b, a), (a, untrained), (untrained, b), (masked, a), (masked, b)]
    for trained_model, source in pairs:
        for points in (3, 4, 11):
            out = _run("lmc_barrier", _context(task, data, GPT, source=source), trained_model, LMCConfig(points=points))
            assert out["lmc_barrier"] >= 0.0 and math.isfinite(out["lmc_barrier_loss_mid"])


def test_lmc_barrier_refuses_an_unknown_split(trained):
    task, data, (a, _) = trained
    with pytest.raises(ValueError, match="no evaluation split 'nope'.*val, test"):
        _run("lmc_barrier", _context(task, data, GPT, source=a), a, LMCConfig(split="nope"))


def _images(n, gen, classes=5, size=16):
    return Split(torch.randn(n, 3, size, size, generator=gen), {"y": torch.randint(0, classes, (n,), generator=gen)})


def _resnet_setup():
    Task = TASKS.get("shapes")
    task = Task(Task.Config(n_classes=5, image_size=16))
    gen = torch.Generator().manual_seed(0)
    data = StageData(_images(30, gen), _images(10, gen), {"test": _images(20, gen)})
    config = ResNet18Config(width=4)
    ctx = _context(task, data, config, eval_batch_size=10)
    with seeded_init(1, "a"):
        a = task.build_model(config)
    with seeded_init(2, "b"):
        b = task.build_model(config)
    return task, data, config, ctx, a, b


def test_batch_norm_statistics_are_re_estimated_on_the_training_split():
    task, data, config, ctx, a, _ = _resnet_setup()
    with torch.no_grad():
        a.bn1.running_mean.fill_(5.0)
        a.bn1.running_var.fill_(5.0)
    recalibrate_batch_norm(a, data.train, batch_size=10)
    assert not a.training
    assert int(a.bn1.num_batches_tracked) == 3  # 30 rows in three batches of 10
    with torch.no_grad():
        pre = a.conv1(data.train.x)  # what bn1 normalises
    # Equal batches: the cumulative average of batch means is the mean over the whole split.
    assert torch.allclose(a.bn1.running_mean, pre.mean((0, 2, 3)), atol=1e-5)
    assert torch.all(a.bn1.running_var < 5.0)


def test_lmc_barrier_with_batch_norm():
    task, data, config, ctx, a, b = _resnet_setup()
    ctx.artifacts["source"] = a
    before = _state(a), _state(b)
    self_barrier = _run("lmc_barrier", ctx, a, LMCConfig(points=3, bn_data="train"))["lmc_barrier"]
    assert 0.0 <= self_barrier < 1e-5
    out = _run("lmc_barrier", ctx, b, LMCConfig(points=3, bn_data="train"))
    assert out["lmc_barrier"] >= 0.0 and math.isfinite(out["lmc_barrier_loss_mid"])
    # The inputs keep their own statistics and momentum; only the analysis's probe model is re-estimated.
    assert _unchanged(a, before[0]) and _unchanged(b, before[1])
    assert a.bn1.momentum == 0.1


# --- subnetwork_ablation -----------------------------------------------------------------------


def _transplant(task, ctx, source, fill: bool):
    names = maskable_names(source, MaskSelection())
    params = dict(source.named_parameters())
    mask = {n: torch.full(params[n].shape, fill, dtype=torch.bool) for n in names}
    return transfer(source, ctx.fresh_model("init"), mask, TransferConfig())


def test_subnetwork_ablation_is_nan_without_a_transplant(trained):
    task, data, (a, _) = trained
    out = _run("subnetwork_ablation", _context(task, data, GPT), a)
    assert set(out) == {"subnetwork_ablation_drop", "subnetwork_ablation_random_drop", "subnetwork_ablation_acc"}
    assert all(math.isnan(v) for v in out.values())


def test_subnetwork_ablation_of_an_empty_mask_changes_nothing(trained):
    task, data, (a, _) = trained
    ctx = _context(task, data, GPT, source=a)
    model = _transplant(task, ctx, a, fill=False)
    out = _run("subnetwork_ablation", ctx, model)
    assert out["subnetwork_ablation_drop"] == 0.0
    assert out["subnetwork_ablation_random_drop"] == 0.0
    assert out["subnetwork_ablation_acc"] == evaluate(model, data.evals["test"])["y"]


def test_subnetwork_ablation_drops_when_the_transplant_carries_the_task(trained):
    task, data, (a, _) = trained
    ctx = _context(task, data, GPT, source=a)
    model = _transplant(task, ctx, a, fill=True)  # every weight matrix is the trained source's
    base = evaluate(model, data.evals["test"])["y"]
    before = _state(model)
    out = _run("subnetwork_ablation", ctx, model)
    assert base > 0.8
    assert out["subnetwork_ablation_drop"] > 0.3
    assert out["subnetwork_ablation_acc"] == pytest.approx(base - out["subnetwork_ablation_drop"])
    # An all-ones mask leaves the random control no other choice than the same set.
    assert out["subnetwork_ablation_random_drop"] == out["subnetwork_ablation_drop"]
    assert _unchanged(model, before)


def test_subnetwork_ablation_resets_exactly_the_masked_positions_to_init(trained):
    from methods.analyses.subnetwork_ablation import ablate

    task, data, (a, _) = trained
    ctx = _context(task, data, GPT, source=a)
    names = maskable_names(a, MaskSelection())
    gen = torch.Generator().manual_seed(4)
    params = dict(a.named_parameters())
    mask = {n: torch.rand(params[n].shape, generator=gen) < 0.3 for n in names}
    state = effective_state_dict(a)
    init = ctx.fresh_model("init").state_dict()
    out = ablate(state, init, mask)
    for name in state:
        if name in mask:
            assert torch.equal(out[name][mask[name]], init[name][mask[name]])
            assert torch.equal(out[name][~mask[name]], state[name][~mask[name]])
        else:
            assert torch.equal(out[name], state[name])


# --- a plug-in analysis ------------------------------------------------------------------------


def test_probe_plugin_registers_and_measures_effective_weights(trained):
    import tests.plugins.probe_analysis  # noqa: F401  (registers "probe")

    task, data, (a, b) = trained
    ctx = _context(task, data, GPT)
    spec = ANALYSES.get("probe")
    assert spec.needs == () and set(spec.columns) == {"probe_norm"}
    masked = _transplant(task, ctx, a, fill=True)
    plain = ctx.fresh_model("init")
    plain.load_state_dict(effective_state_dict(masked))
    norm = _run("probe", ctx, masked)["probe_norm"]
    assert norm == pytest.approx(_run("probe", ctx, plain)["probe_norm"])
    assert norm == pytest.approx(_run("probe", ctx, a)["probe_norm"])  # an all-ones transplant is its source
