"""The CBFT comparison (seed 003): naive fine-tuning is full transfer bit for bit; LLRT trains the
head alone on frozen features; LPFT probes, then fine-tunes; CBFT's barrier term, invariance term,
warm-up and step alternation are what the paper writes; and every method runs as a trial."""

import contextlib
import copy
import json
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from common.seeding import seeded_init, torch_generator
from methods import cbft as _cbft  # noqa: F401  (registers the method)
from methods import finetune as finetune_module
from methods.analyses.lmc_barrier import interpolate
from methods.cbft import CBFTConfig, barrier_loss, draw_t, invariance_loss
from methods.finetune import LPFTConfig, find_head, merge_phases
from methods.registry import MethodContext, get_method
from methods.training import TrainConfig, TrainResult, train
from tasks import MODELS
from tasks.base import Split, StageData
from tasks.shapes import BOX_VALUE
from tasks.shapes_render import paint_boxes
from tests.conftest import tiny_raw

K, SIZE = 3, 8
CNN = MODELS.get("plain_cnn")


def _cnn(stage: str) -> nn.Module:
    with seeded_init(0, stage):
        return CNN.build(CNN.Config(n_blocks=2, width=4), n_classes=K, image_size=SIZE)


def plant_cue(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each image with its class's box, as the shapes task's cue variant paints it."""
    return paint_boxes(x, y.numpy(), SIZE, K, BOX_VALUE)


def _split(n: int, gen: torch.Generator) -> Split:
    y = torch.arange(n) % K
    return Split(torch.randn(n, 3, SIZE, SIZE, generator=gen), {"y": y[torch.randperm(n, generator=gen)]})


def _data(cued: bool = True) -> StageData:
    gen = torch.Generator().manual_seed(0)
    train, val, test = _split(24, gen), _split(12, gen), _split(12, gen)
    streams = {"cued": Split(plant_cue(train.x, train.y), train.labels)} if cued else {}
    return StageData(train, val, {"test": test}, streams)


@contextlib.contextmanager
def _one_thread():
    """conftest's single-thread fixture is per test; module fixtures run before it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """A cue model: the CNN trained a little on cued images, so its statistics are its own."""
    model = _cnn("source_init")
    data = _data()
    cued = StageData(data.streams["cued"], data.val)
    with _one_thread():
        train(model, cued, TrainConfig(epochs=3, lr=1e-2, batch_size=8), torch_generator(0, "source_train"))
    return model


def _ctx(source, config=None, data=None, **training) -> MethodContext:
    return MethodContext(
        task=None,
        data=data or _data(),
        config=config,
        training=TrainConfig(
            **{"epochs": 2, "lr": 1e-2, "batch_size": 8, "eval_batch_size": 100, "keep_initial": False, **training}
        ),  # these tests look at what training moves
        artifacts={"source": source},
        generator=torch_generator(0, "method"),
        device=torch.device("cpu"),
        fresh_model=_cnn,
    )


def _run(name, ctx):
    method = get_method(name)
    model = method.build(ctx)
    return model, method.train(ctx, model, torch_generator(0, "downstream_train"))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


# --- the head ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain_cnn", "resnet18", "vit", "mlp", "gpt"])
def test_find_head_is_the_declared_head_for_every_model(name):
    spec = MODELS.get(name)
    small = {"resnet18": {"width": 4}, "vit": {"n_layers": 1, "n_heads": 2, "hidden_dim": 8, "mlp_dim": 8},
             "mlp": {"n_layers": 1, "width": 8}, "gpt": {"n_layers": 1, "d_model": 8, "n_heads": 2},
             "plain_cnn": {"n_blocks": 1, "width": 4}}[name]  # fmt: skip
    tokens = name == "gpt"
    dims = {"vocab_size": 5, "n_positions": 3} if tokens else {"image_size": SIZE}
    model = spec.build(spec.Config(**small), n_classes=K, **dims)
    x = torch.randint(0, 5, (2, 3)) if tokens else torch.randn(2, 3, SIZE, SIZE)
    assert find_head(model, x) == model.head_name


class _Bare(nn.Module):
    """No head_name: the head must be found by its output."""

    def __init__(self, twin: bool = False, scaled: bool = False):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.out = nn.Linear(4, K)
        self.aux = nn.Linear(4, K)
        if twin:
            self.aux.load_state_dict(self.out.state_dict())
        self.scaled = scaled

    def forward(self, x):
        h = torch.relu(self.body(x))
        self.aux(h)  # an auxiliary output, computed and dropped
        logits = self.out(h)
        return 2 * logits if self.scaled else logits


def test_find_head_by_output_and_its_errors():
    x = torch.randn(2, 4)
    assert find_head(_Bare(), x) == "out"
    with pytest.raises(ValueError, match=r"several do \(out, aux\).*set head_name"):
        find_head(_Bare(twin=True), x)
    with pytest.raises(ValueError, match="none of body, out, aux does.*set head_name"):
        find_head(_Bare(scaled=True), x)
    wrong = _Bare()
    wrong.head_name = "aux"
    with pytest.raises(ValueError, match="head_name = 'aux', but that module's output is not the model's logits"):
        find_head(wrong, x)
    wrong.head_name = "nope"
    with pytest.raises(ValueError, match="names no submodule"):
        find_head(wrong, x)


# --- naive fine-tuning, llrt, lpft ---------------------------------------------------------------


def test_naive_finetune_is_full_transfer_bit_for_bit(source):
    before = _state(source)
    full, full_result = _run("full_transfer", _ctx(source))
    naive, naive_result = _run("naive_finetune", _ctx(source))
    assert _changed(_state(full), _state(naive)) == set()
    assert naive_result == full_result
    assert _changed(before, _state(naive)), "fine-tuning moved nothing"
    assert _changed(before, _state(source)) == set(), "the source artifact moved"


def test_llrt_trains_a_fresh_head_on_frozen_features(source):
    before = _state(source)
    ctx = _ctx(source)
    model = get_method("llrt").build(ctx)
    fresh_head = _cnn("init").fc.state_dict()
    assert all(torch.equal(v, model.fc.state_dict()[k]) for k, v in fresh_head.items()), "head not re-initialised"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    after_build = _state(model)
    result = get_method("llrt").train(ctx, model, torch_generator(0, "downstream_train"))
    after = _state(model)
    # Everything but the head, batch-norm statistics included, is the source's, bit for bit.
    assert _changed(before, after) == {"fc.weight", "fc.bias"}
    assert _changed(after_build, after) == {"fc.weight", "fc.bias"}, "training left the head as initialised"
    assert result.epochs_run == 2 and len(result.history) == 2


def test_lpft_probes_the_head_then_fine_tunes_everything(source, monkeypatch):
    snapshots, results = [], []
    real_fit = finetune_module.fit

    def recording_fit(objective, *args, **kwargs):
        result = real_fit(objective, *args, **kwargs)
        snapshots.append(_state(objective.module))
        results.append(result)
        return result

    monkeypatch.setattr(finetune_module, "fit", recording_fit)
    before = _state(source)
    ctx = _ctx(source, LPFTConfig(probe_epochs=2), epochs=3)
    model, result = _run("lpft", ctx)
    assert len(snapshots) == 2
    probed, tuned = snapshots
    assert _changed(before, probed) == {"fc.weight", "fc.bias"}
    trunk = _changed(probed, tuned) - {"fc.weight", "fc.bias"}
    assert any(k.endswith("running_mean") for k in trunk), "batch norm did not train in phase 2"
    assert any(k.endswith(".weight") and "blocks.0.0" in k for k in trunk), "the first conv did not train"
    # One result for both phases: the fine-tuning phase's score, epochs counted over both.
    probe, final = results
    assert result.history == probe.history + final.history
    assert result.best_val_acc == final.best_val_acc
    assert result.best_epoch == 2 + final.best_epoch and result.epochs_run == 2 + 3
    assert result.steps == probe.steps + final.steps
    assert [m["probe"] for m in result.measurements] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert all(p.requires_grad for p in model.parameters())


def test_merged_phases_score_the_last_phase():
    probe = TrainResult(best_val_acc=0.9, best_epoch=2, epochs_run=2, steps=6, history=[0.8, 0.9],
                        measurements=[{"ce": 1.0}, {"ce": 0.5}])  # fmt: skip
    tuned = TrainResult(best_val_acc=0.7, best_epoch=1, epochs_run=1, steps=3, history=[0.7],
                        measurements=[{"ce": 0.2}])  # fmt: skip
    merged = merge_phases([(True, probe), (False, tuned)])
    assert (merged.best_val_acc, merged.best_epoch, merged.epochs_run, merged.steps) == (0.7, 3, 3, 9)
    assert merged.history == [0.8, 0.9, 0.7]
    assert merged.measurements == [{"ce": 1.0, "probe": 1.0}, {"ce": 0.5, "probe": 1.0}, {"ce": 0.2, "probe": 0.0}]


def test_lpft_without_probe_epochs_is_one_phase(source):
    _, result = _run("lpft", _ctx(source, LPFTConfig(probe_epochs=0)))
    assert [m["probe"] for m in result.measurements] == [0.0, 0.0]


# --- cbft: the barrier term --------------------------------------------------------------------


def test_t_lies_in_the_clipped_range_and_is_seeded():
    gen = torch.Generator().manual_seed(1)
    ts = [draw_t(gen) for _ in range(2000)]
    assert min(ts) == 0.25 and max(ts) == 0.75  # clipped at both ends, about 31% each
    assert 0.2 < sum(t == 0.75 for t in ts) / len(ts) < 0.4
    assert len(set(ts)) > 500  # the interior (38%) is continuous
    again = torch.Generator().manual_seed(1)
    assert [draw_t(again) for _ in range(10)] == ts[:10]


def _linear_setup():
    gen = torch.Generator().manual_seed(2)
    theta = nn.Linear(5, K)
    with torch.no_grad():
        for p in theta.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    anchor = {n: torch.randn(p.shape, generator=gen) for n, p in theta.named_parameters()}
    x, y = torch.randn(16, 5, generator=gen), torch.randint(0, K, (16,), generator=gen)
    return theta, anchor, x, y


@pytest.mark.parametrize("t", [0.25, 0.4, 0.75])
def test_barrier_gradient_reaches_theta_scaled_by_one_minus_t(t):
    theta, anchor, x, y = _linear_setup()
    # The same loss at theta_t, theta_t a leaf of its own (lmc_barrier's path, (1 - t) a + t b).
    theta_t = nn.Linear(5, K)
    theta_t.load_state_dict(interpolate(theta.state_dict(), anchor, t))
    ce_at_t = F.cross_entropy(theta_t(x), y)
    for barrier in (0.1, 10.0):  # CE above B, and below it
        theta.zero_grad(), theta_t.zero_grad()
        value, ce = barrier_loss(theta, anchor, x, y, t, barrier)
        torch.testing.assert_close(ce, ce_at_t)
        torch.testing.assert_close(value, (barrier - ce_at_t).abs())
        value.backward()
        (barrier - F.cross_entropy(theta_t(x), y)).abs().backward()
        for name, p in theta.named_parameters():
            expected = (1 - t) * dict(theta_t.named_parameters())[name].grad
            torch.testing.assert_close(p.grad, expected)
            assert p.grad.abs().sum() > 0
        assert all(not a.requires_grad and a.grad is None for a in anchor.values())


def test_barrier_forward_leaves_batch_norm_statistics_alone(source):
    model = copy.deepcopy(source).train()
    before = _state(model)
    data = _data()
    anchor = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    value, _ = barrier_loss(model, anchor, data.streams["cued"].x, data.train.y, 0.5, 1.0)
    value.backward()
    assert _changed(before, _state(model)) == set()
    # ...while a plain train-mode forward does update them (so the check above can fail).
    model(data.train.x)
    assert any(k.endswith("running_mean") for k in _changed(before, _state(model)))


# --- cbft: the invariance term -----------------------------------------------------------------


def _direct_invariance(z_clean, y_clean, z_cued, y_cued, n_classes):
    total = torch.zeros(())
    for c in range(n_classes):
        a, b = z_clean[y_clean == c], z_cued[y_cued == c]
        if len(a) and len(b):
            total = total + (F.normalize(a.mean(0), dim=0) - F.normalize(b.mean(0), dim=0)).norm() ** 2
    return total / n_classes


def test_invariance_is_zero_when_class_means_coincide_and_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(3)
    z, y = torch.randn(12, 6, generator=gen), torch.arange(12) % 4
    # The cued batch: the same examples in another order, and scaled (normalisation removes scale).
    order = torch.randperm(12, generator=gen)
    assert invariance_loss(z, y, 3 * z[order], y[order], 4) < 1e-6
    assert invariance_loss(z, y, z, y, 4) == 0
    # Otherwise: classes present in both batches only (class 3 is missing from the cued one).
    z_cued, y_cued = torch.randn(9, 6, generator=gen), torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1])
    got = invariance_loss(z, y, z_cued, y_cued, 5)
    torch.testing.assert_close(got, _direct_invariance(z, y, z_cued, y_cued, 5))
    assert got > 0.1
    # Feature maps are flattened per example.
    maps = torch.randn(12, 2, 3, generator=gen)
    torch.testing.assert_close(
        invariance_loss(maps, y, z_cued, y_cued, 4), _direct_invariance(maps.flatten(1), y, z_cued, y_cued, 4)
    )


# --- cbft: the objective -----------------------------------------------------------------------


def test_cbft_refuses_a_task_without_a_cued_stream(source):
    with pytest.raises(ValueError, match=r"'cued' training stream.*provides only: train.*cue: \{kind: box"):
        get_method("cbft").build(_ctx(source, CBFTConfig(), data=_data(cued=False)))


def test_cbft_steps_alternate_barrier_and_clean_and_warm_up(source):
    # 24 rows in batches of 8, 2 epochs: 12 optimiser steps; warm-up 0.5 of them: steps 0 to 5.
    ctx = _ctx(source, CBFTConfig(barrier=1.5, invariance=2.0, warmup=0.5))
    method = get_method("cbft")
    model = method.build(ctx)
    objective = method.objective(ctx, model)
    assert objective.streams == ("train", "cued")
    data = ctx.data
    clean, cued = data.train.take(torch.arange(8)), data.streams["cued"].take(torch.arange(8, 16))
    batch = {"train": clean, "cued": cued}
    ts = torch_generator(ctx.generator.initial_seed(), "cbft:t")
    anchor = {n: p.detach() for n, p in source.named_parameters()}
    model.train()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():  # away from the source, so that theta_t depends on t
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        # Even steps: the barrier at theta_t on the cued batch, t from the method's derived stream.
        for step in (0, 2, 4, 6, 8, 10):
            value, _ = objective.loss(batch, step)
            expected, _ = barrier_loss(model, anchor, cued.x, cued.y, draw_t(ts), 1.5)
            torch.testing.assert_close(value, expected)
        # Odd steps in the warm-up (steps 1, 3, 5): clean cross-entropy alone.
        for step in (1, 5):
            probe = copy.deepcopy(model)
            value, _ = objective.loss(batch, step)
            torch.testing.assert_close(value, F.cross_entropy(probe(clean.x), clean.y))
        # After it: plus lambda times the invariance of the penultimate features.
        probe = copy.deepcopy(model)
        value, _ = objective.loss(batch, 7)
        logits, f_clean = probe(clean.x, intermediates=True)
        _, f_cued = probe(cued.x, intermediates=True)
        inv = invariance_loss(f_clean["pool"], clean.y, f_cued["pool"], cued.y, K)
        assert inv > 0
        torch.testing.assert_close(value, F.cross_entropy(logits, clean.y) + 2.0 * inv)


def test_cbft_trains_with_the_invariance_term_off_in_warm_up(source):
    before = _state(source)
    ctx = _ctx(source, CBFTConfig(warmup=1 / 3), epochs=3)  # the first of 3 epochs
    model, result = _run("cbft", ctx)
    rows = result.measurements
    assert [set(r) for r in rows] == [{"barrier_loss", "barrier_ce", "t", "ce", "invariance"}] * 3
    assert rows[0]["invariance"] == 0 and rows[1]["invariance"] > 0 and rows[2]["invariance"] > 0
    assert all(0.25 <= r["t"] <= 0.75 for r in rows)
    assert all(math.isclose(r["barrier_loss"], abs(1.0 - r["barrier_ce"]), abs_tol=1.0) for r in rows)
    assert result.steps == 3 * 3 * 2  # 24 rows in batches of 8: 3 batches an epoch, two steps each
    assert _changed(before, _state(model)) and not _changed(before, _state(source))
    # No warm-up: the term is on from the first epoch.
    _, result = _run("cbft", _ctx(source, CBFTConfig(warmup=0), epochs=1))
    assert result.measurements[0]["invariance"] > 0


def test_config_blocks_are_validated():
    assert CBFTConfig().model_dump() == {"barrier": 1.0, "invariance": 1.0, "warmup": 0.05}
    assert LPFTConfig().probe_epochs == 20 and LPFTConfig().probe_training == {}
    with pytest.raises(ValidationError, match="lpft.probe_epochs"):
        LPFTConfig(probe_training={"epochs": 3})
    with pytest.raises(ValidationError, match="lrr"):
        LPFTConfig(probe_training={"lrr": 3})
    with pytest.raises(ValidationError):
        LPFTConfig(probe_training={"lr": -1})
    with pytest.raises(ValidationError):
        CBFTConfig(warmup=1.5)
    with pytest.raises(ValidationError):
        CBFTConfig(barrier=-1)
    with pytest.raises(ValidationError):
        CBFTConfig.model_validate({"lambda": 1.0})
    with pytest.raises(ValidationError):
        LPFTConfig(probe_epochs=-1)
    for name, config in (("cbft", CBFTConfig), ("lpft", LPFTConfig), ("llrt", None), ("naive_finetune", None)):
        method = get_method(name)
        assert method.Config is config and method.needs == ("source",)


# --- trials ------------------------------------------------------------------------------------


def _cued_raw(tmp_path, **overrides) -> dict:
    """A tiny sweep on the shapes task's cue variant: the source sees the box on every image."""
    raw = tiny_raw()
    shapes = {
        "name": "shapes",
        "n_classes": 3,
        "image_size": 16,
        "n_base": 30,
        "n_subtask": 10,
        "pool_size": 24,
        "n_val": 12,
        "n_test": 12,
        "cache_dir": str(tmp_path / "cache"),
        "cue": {"kind": "box", "fraction": 1.0},
    }
    defaults = dict(
        task=shapes,
        model={"name": "plain_cnn", "n_blocks": 2, "width": 4},
        source={"epochs": 2, "lr": 1e-2, "batch_size": 10},
        training={"epochs": 2, "lr": 1e-2, "batch_size": 8},
        methods=["full_transfer", "naive_finetune", "llrt", "lpft", "cbft"],
        lpft={"probe_epochs": 1},
        cbft={"barrier": 1.0},
        data_fractions=[1.0],
    )  # fmt: skip
    raw.update({**defaults, **overrides})
    return raw


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep
    from orchestrator.trial import TrialSpec, run_trial

    tmp = tmp_path_factory.mktemp("cbft_trials")
    # The paper's protocol, the last epoch kept: else LPFT may keep its probed model (epoch 0 of fine-tuning).
    raw = _cued_raw(tmp, analyses=["lmc_barrier"])
    sweep = load_sweep({**raw, "training": {**raw["training"], "select": "last"}})
    store = ArtifactStore(tmp / "store")
    with _one_thread():
        return {m: run_trial(sweep, TrialSpec(method=m, data_fraction=1.0, seed=0), store) for m in sweep.methods}


@pytest.mark.parametrize("method", ["naive_finetune", "llrt", "lpft", "cbft"])
def test_each_method_runs_as_a_trial_with_the_lmc_barrier(trials, method):
    row = trials[method]
    assert row["status"] == "done", row
    # LLRT moves only the head: its barrier is 0 by construction, so it is reported as no evidence.
    assert row["lmc_barrier_head_only"] == float(method == "llrt")
    if method == "llrt":
        assert math.isnan(row["lmc_barrier"]) and math.isfinite(row["lmc_barrier_loss_mid"])
    else:
        assert math.isfinite(row["lmc_barrier"]) and row["lmc_barrier"] >= 0
    assert 0 <= row["test_acc"] <= 1 and 0 <= row["test_acc_last"] <= 1
    measured = json.loads(row["measurements_json"])
    if method == "cbft":
        assert all({"barrier_loss", "invariance"} <= set(m) for m in measured)
    if method == "lpft":
        assert [m["probe"] for m in measured] == [1.0, 0.0, 0.0]


def test_naive_finetune_trial_equals_full_transfer(trials):
    full, naive = trials["full_transfer"], trials["naive_finetune"]
    for key in ("val_acc", "test_acc", "best_epoch", "lmc_barrier", "measurements_json"):
        assert naive[key] == full[key], key


def test_a_cbft_trial_on_a_task_without_a_cue_fails_at_build(tmp_path):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep
    from orchestrator.trial import TrialSpec, run_trial

    raw = _cued_raw(tmp_path, methods=["cbft"])
    del raw["task"]["cue"]
    with pytest.raises(ValueError, match="task 'shapes' provides only: train"):
        run_trial(load_sweep(raw), TrialSpec(method="cbft", data_fraction=1.0, seed=0), ArtifactStore(tmp_path / "s"))


def test_cbft_warm_up_is_a_share_of_the_run_however_many_epochs_min_steps_makes(source):
    # 24 rows in one batch: one iteration (barrier step, clean step) per epoch; min_steps 10 (iterations)
    # makes it 10 epochs, and a warm-up of 0.2 is their first 2 (4 of 20 optimiser steps), not one epoch.
    _, result = _run("cbft", _ctx(source, CBFTConfig(warmup=0.2), epochs=1, batch_size=64, min_steps=10))
    rows = result.measurements
    assert result.steps == 20 and result.epochs_run == 10
    assert [set(r) for r in rows] == [{"barrier_loss", "barrier_ce", "t", "ce", "invariance"}] * 10
    assert [r["invariance"] == 0 for r in rows] == [True, True] + [False] * 8


def test_cbft_clean_step_keeps_batch_norm_statistics_clean(source):
    ctx = _ctx(source, CBFTConfig(warmup=0, barrier=1.0, invariance=1.0))
    model = get_method("cbft").build(ctx)
    objective = get_method("cbft").objective(ctx, model)
    data = ctx.data
    batch = {"train": data.train.take(torch.arange(8)), "cued": data.streams["cued"].take(torch.arange(8, 16))}
    model.train()
    probe = copy.deepcopy(model)
    objective.loss(batch, 1)  # the clean step, with the invariance term (cued forward included)
    probe(batch["train"].x)  # what a clean-only forward does to the running statistics
    for (name, b), (_, expected) in zip(model.named_buffers(), probe.named_buffers(), strict=True):
        assert torch.equal(b, expected), name


# --- the paper's protocol: the last epoch, the probe's own optimiser ------------------------------


def test_select_last_keeps_the_last_epoch_whatever_validation_says(source):
    kept = {}
    for select in ("val_acc", "last"):
        ctx = _ctx(source, epochs=6, lr=0.5, select=select, keep_initial=True)
        model, result = _run("naive_finetune", ctx)
        kept[select] = (result, _state(model))
    (best, _), (last, weights) = kept["val_acc"], kept["last"]
    assert best.best_epoch < 6 and best.last_state is not None, "validation picks an earlier epoch"
    # Selection does not change the trajectory: `last` keeps exactly the weights of the last epoch.
    assert last.epochs_run == 6 and last.best_epoch == 6 and last.last_state is None
    assert last.best_val_acc == last.history[-1] and last.history == best.history
    assert _changed(weights, best.last_state) == set()
    # Patience never stops it (no epoch is worse than the kept one).
    _, patient = _run("naive_finetune", _ctx(source, epochs=6, lr=0.5, select="last", patience=1))
    assert patient.epochs_run == 6


def test_lpft_probe_phase_takes_its_own_training_fields(source, monkeypatch):
    configs = []
    real_fit = finetune_module.fit

    def recording_fit(objective, data, cfg, *args, **kwargs):
        configs.append(cfg)
        return real_fit(objective, data, cfg, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "fit", recording_fit)
    probe = {"optimizer": "sgd", "lr": 3.0, "momentum": 0.9, "weight_decay": 0.0, "lr_schedule": "cosine"}
    ctx = _ctx(source, LPFTConfig(probe_epochs=2, probe_training=probe), epochs=3)
    _run("lpft", ctx)
    first, second = configs
    assert (first.optimizer, first.lr, first.momentum, first.weight_decay, first.lr_schedule, first.epochs) == (
        "sgd", 3.0, 0.9, 0.0, "cosine", 2)  # fmt: skip
    assert second == ctx.training, "the fine-tuning phase runs on the training block as it is"


# --- lmc_barrier: statistics from enough data; a head-only model is no evidence -------------------


def test_barrier_statistics_come_from_the_sources_training_data(tmp_path):
    from methods.analyses.lmc_barrier import LMCConfig, _norm_data
    from tasks import TASKS

    Task = TASKS.get("shapes")
    task = Task(Task.Config(**{**_cued_raw(tmp_path)["task"], "n_base": 40}))
    ctx = type("Ctx", (), {"task": task, "seed": 0, "data": task.downstream_data(0, 0.5)})()
    model = task.build_model(MODELS.get("resnet18").Config(width=4))
    got = _norm_data(ctx, model, LMCConfig(bn_images=25))
    assert torch.equal(got.x, task.base_data(0).train.x[:25])
    assert len(_norm_data(ctx, model, LMCConfig())) == 40, "all of them when there are fewer"
    assert torch.equal(_norm_data(ctx, model, LMCConfig(bn_data="train")).x, ctx.data.train.x)
    assert _norm_data(ctx, _cnn("a"), LMCConfig()) is not None  # plain_cnn has batch norm
    assert _norm_data(ctx, nn.Linear(3, 3), LMCConfig()) is None


def test_only_head_differs_tells_a_retrained_head_from_a_moved_trunk(source):
    from methods.analyses.lmc_barrier import only_head_differs
    from methods.masking import effective_state_dict

    x = _data().train.x[:1]
    head = copy.deepcopy(source)
    with torch.no_grad():
        head.fc.weight.add_(1.0)
    trunk = copy.deepcopy(head)
    with torch.no_grad():
        next(trunk.parameters()).add_(1.0)
    src = effective_state_dict(source)
    assert only_head_differs(head, effective_state_dict(head), src, x)
    assert not only_head_differs(trunk, effective_state_dict(trunk), src, x)
    assert not only_head_differs(source, src, src, x), "nothing moved: not a head-only model"


# --- the report: the paper's Table 1 -------------------------------------------------------------


def test_table_1_shows_each_evaluation_per_series_and_budget():
    import pandas as pd

    from methods.cbft import table_1

    rows = []
    for label, ri in (("cbft", 0.1), ("naive_finetune", 0.7)):
        row = {"task": "shapes", "label": label, "n_train": 50, "seeds": 10}
        for column, mean in (("splits_test_acc", 0.6), ("splits_cue_acc", 0.9), ("splits_randomised_cue_acc", 0.5),
                             ("splits_randomised_image_acc", ri)):  # fmt: skip
            row.update({f"{column}_mean": mean, f"{column}_ci_lo": mean - 0.05, f"{column}_ci_hi": mean + 0.05})
        rows.append(row)
    frame, shown = table_1(pd.DataFrame(rows))
    assert list(shown["label"]) == ["cbft", "naive_finetune"]
    assert list(shown.columns[-4:]) == ["clean (NC)", "cue (C)", "randomised cue (RC)",
                                        "randomised image (RI, lower is better)"]  # fmt: skip
    assert shown.iloc[0]["randomised image (RI, lower is better)"] == "0.100 [0.050, 0.150]"
    assert frame.iloc[1]["splits_randomised_image_acc_mean"] == 0.7
    assert table_1(pd.DataFrame([{"label": "x", "test_acc_mean": 0.5}])) is None, "no cue evaluations, no table"
