"""Representational guidance: alpha = 0 (or guidance_steps = 0) is scratch bit for bit, a strong
alignment term raises the target's CKA to the guide, the guide stays frozen, a guide of another
architecture runs end to end, a bad guide model field is reported by its path, and CKA on a batch
of its own (`cka_examples`) sees that many training rows, is deterministic and resumes."""

import pytest
import torch
import yaml

from common.seeding import seeded_init, torch_generator
from methods import guidance as _guidance  # noqa: F401  (registers the guide kind and the method)
from methods.cka import layer_map
from methods.guidance import GuidanceConfig, GuideConfig, alignment_loss, preactivation_count, preactivations
from methods.registry import MethodContext, get_method
from methods.training import Interrupted, Supervision, fit, supervised
from tests.conftest import tiny_raw
from tests.orchestrator.test_checkpoints import MemoryCheckpointer


@pytest.fixture(scope="module")
def setup():
    from orchestrator.config import load_sweep

    sweep = load_sweep(tiny_raw(training={"epochs": 3, "lr": 3e-3, "batch_size": 10}))
    task = sweep.build_task()

    def fresh(stage: str) -> torch.nn.Module:
        with seeded_init(0, stage):
            return task.build_model(sweep.model)

    guide = fresh("guide_init").eval()  # an untrained guide of the same architecture
    for p in guide.parameters():
        p.requires_grad_(False)
    return sweep, task, fresh, guide


def _ctx(setup, config, guide=None, method_seed=0):
    sweep, task, fresh, default_guide = setup
    return MethodContext(
        task=task,
        data=task.downstream_data(0, 0.5),
        config=config,
        training=sweep.training,
        artifacts={"guide": default_guide if guide is None else guide},
        generator=torch_generator(method_seed, "method"),
        device=torch.device("cpu"),
        fresh_model=fresh,
    )


def _run(setup, name: str, config, guide=None, method_seed=0):
    ctx = _ctx(setup, config, guide, method_seed)
    method = get_method(name)
    model = method.build(ctx)
    result = fit(method.objective(ctx, model), ctx.data, ctx.training, torch_generator(0, "downstream_train"))
    return model, result


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_alpha_zero_and_zero_guidance_steps_are_scratch_bit_for_bit(setup):
    scratch, r0 = _run(setup, "scratch", None)
    unguided, r1 = _run(setup, "guidance", GuidanceConfig(alpha=0.0))
    no_steps, r2 = _run(setup, "guidance", GuidanceConfig(alpha=5.0, guidance_steps=0))
    assert _same(scratch, unguided) and _same(scratch, no_steps)
    assert r0.history == r1.history == r2.history
    assert all(m["cka_loss"] == 0 and m["guided"] == 0 for m in r2.measurements)


def test_strong_alignment_lowers_the_cka_loss_and_the_guide_stays_frozen(setup):
    guide = setup[3]
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    model, result = _run(setup, "guidance", GuidanceConfig(alpha=10.0))
    losses = [m["cka_loss"] for m in result.measurements]
    assert all(m["guided"] == 1 for m in result.measurements)
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(before[k], v) for k, v in guide.state_dict().items()), "the guide moved"
    assert not guide.training and not any(p.requires_grad for p in guide.parameters())
    # The restored (best) target is closer to the guide than a fresh init is.
    x = setup[1].downstream_data(0, 0.5).train.x[:50]
    fresh = setup[2]("init").eval()
    pairs = layer_map(preactivation_count(model, x), preactivation_count(guide, x))
    with torch.no_grad(), preactivations(guide) as g, preactivations(model.eval()) as t:
        with preactivations(fresh) as f:
            guide(x), model(x), fresh(x)
    assert alignment_loss(t, g, pairs) < alignment_loss(f, g, pairs)


def test_guidance_steps_stop_the_alignment(setup):
    _, result = _run(setup, "guidance", GuidanceConfig(alpha=1.0, guidance_steps=2))
    assert result.steps > 2
    assert 0 < result.measurements[0]["guided"] < 1 and result.measurements[-1]["guided"] == 0


def test_pairs_keep_every_guide_preactivation(setup):
    sweep, task, fresh, guide = setup
    target = fresh("init")  # gpt, 1 block: one GELU, so one pre-activation
    with seeded_init(0, "mlp"):
        mlp = task.build_model(GuideConfig(model={"name": "mlp", "n_layers": 4, "width": 8}).model_cfg())
    x = task.downstream_data(0, 0.5).train.x[:8]
    assert preactivation_count(target, x) == 1 and preactivation_count(mlp, x) == 4
    assert layer_map(1, 4) == [(0, 0), (0, 1), (0, 2), (0, 3)]  # every guide layer kept


def _image_model(block):
    import tasks
    from tasks.base import parse_block

    with seeded_init(0, "init"):
        return tasks.MODELS.get(block["name"]).build(
            parse_block(tasks.MODELS, dict(block), "model"), n_classes=5, image_size=16, channels=3
        )


@pytest.mark.parametrize(
    "block, count",
    [
        ({"name": "plain_cnn", "n_blocks": 5, "width": 4}, 5),
        ({"name": "plain_cnn", "n_blocks": 7, "width": 4, "norm": "none"}, 7),
        ({"name": "mlp", "n_layers": 6, "width": 8}, 6),
        ({"name": "resnet18", "width": 4}, 17),  # the stem, then two per BasicBlock
    ],
)
def test_preactivations_are_the_inputs_of_every_nonlinearity(block, count):
    model = _image_model(block).train()
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with preactivations(model) as feats:
        logits = model(x)
    assert len(feats) == count and preactivation_count(model, x) == count
    assert model.training, "counting restores the mode"
    # Before the ReLU: negative values survive (torchvision's in-place ReLU did not overwrite them).
    assert all(f.shape[0] == 6 and (f < 0).any() for f in feats)
    # Gradients reach the parameters through the recorded pre-activations alone.
    model.zero_grad()
    torch.stack([f.square().mean() for f in feats]).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert logits.shape == (6, 5)
    # The hooks are gone after the block: a later forward records nothing.
    model(x)
    assert len(feats) == count


def test_a_model_without_activation_modules_is_refused():
    with pytest.raises(ValueError, match="activation modules"):
        with preactivations(torch.nn.Linear(3, 2)):
            pass


def test_a_guide_of_another_architecture_runs_end_to_end(tiny, tmp_path):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import TrialSpec, Upstream, identity, run_trial

    mlp = {"name": "mlp", "n_layers": 2, "width": 16}
    sweep = tiny(plugins=[], methods=["guidance"], guidance={"alpha": 1.0}, guide={"trained": True, "model": mlp})
    spec = TrialSpec(method="guidance", data_fraction=0.5, seed=0)
    assert identity(sweep, spec)["guide"]["model"]["width"] == 16
    key = Upstream(sweep, spec, None, torch.device("cpu")).key("guide")
    assert key["model"]["name"] == "mlp" and key["trained"] is True
    assert sorted(key["reads"]) == ["guide", "model", "source"], "the blocks it may read are in its key"
    row = run_trial(sweep, spec, ArtifactStore(tmp_path))
    assert row["status"] == "done", row
    assert row["guide_val_acc"] is not None

    # The trained guide of the sweep's own architecture is the source model (its key holds the source's).
    own = Upstream(tiny(plugins=[], methods=["guidance"], guide={"trained": True}), spec, None, torch.device("cpu"))
    assert {k: v for k, v in own.key("guide").items() if k != "reads"} == {"source": own.key("source"), "trained": True}
    fresh = Upstream(tiny(plugins=[], methods=["guidance"], guide={"trained": False}), spec, None, torch.device("cpu"))
    assert fresh.key("guide")["trained"] is False


def test_a_bad_guide_model_field_is_reported_by_path(tmp_path, capsys):
    from orchestrator.cli import main

    bad = {"name": "mlp", "n_layers": 0}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(methods=["guidance"], guide={"model": bad})))
    assert main(["validate", str(path)]) == 2
    assert "guide.model.n_layers" in capsys.readouterr().err


def test_a_guide_that_does_not_read_the_source_neither_needs_nor_is_gated_by_it(tiny, tmp_path):
    """`Guide.uses`: only the source itself as the guide reads the source. An untrained guide, or
    one of another architecture, leaves it out of the trial's needs, so a source that never learnt
    (here: trained for no step at all) neither costs time nor gates the guided trial's findings."""
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import TrialSpec, Upstream, run_trial, trial_needs

    spec = TrialSpec(method="guidance", data_fraction=0.5, seed=0)
    own = tiny(plugins=[], methods=["guidance"], guide={"trained": True})
    assert trial_needs(own, spec) == ["source", "guide"]
    mlp = {"name": "mlp", "n_layers": 2, "width": 16}
    for guide in ({"trained": False}, {"trained": True, "model": mlp}, {"trained": False, "model": mlp}):
        sweep = tiny(plugins=[], methods=["guidance"], guide=guide)
        assert trial_needs(sweep, spec) == ["guide"], guide
        up = Upstream(sweep, spec, None, torch.device("cpu"))
        up.key("guide")
        assert list(up.keys) == ["guide"], "no key is made for a need the config leaves unread"
    store = ArtifactStore(tmp_path)
    unlearnt = {"source": {"epochs": 1, "lr": 1e-12}}
    row = run_trial(tiny(plugins=[], methods=["guidance"], guide={"trained": False}, **unlearnt), spec, store)
    assert row["status"] == "done", row
    assert "source.learnt" not in row["gates_failed"] and "source_computed" not in row
    assert store.entries("source") == []
    scratch = run_trial(tiny(plugins=[], methods=["guidance"], guide={"trained": True}, **unlearnt), spec, store)
    assert "source.learnt" in scratch["gates_failed"], "the source as guide is still checked"


# --- CKA on a batch of its own (`cka_examples`) ---------------------------------------------------


def _recording(monkeypatch, setup):
    """Record the rows of every Gram matrix, every input of the guide and of the target."""
    seen = {"gram": [], "guide": [], "target": []}
    real = _guidance.gram

    def gram(x, estimator="biased"):
        seen["gram"].append(x.shape[0])
        return real(x, estimator)

    monkeypatch.setattr(_guidance, "gram", gram)
    guide = setup[3]
    handle = guide.register_forward_pre_hook(lambda _m, args: seen["guide"].append(args[0].clone()))
    return seen, handle


def test_cka_examples_is_the_number_of_rows_of_every_cka_estimate(setup, monkeypatch):
    train = setup[1].downstream_data(0, 0.5).train  # 80 rows, batches of 10
    assert len(train) == 80 and setup[0].training.batch_size == 10
    rows = {tuple(r.tolist()) for r in train.x}
    for examples, expected in ((None, 10), (32, 32), (500, 80)):  # 500 > n_train: all 80 rows
        seen, handle = _recording(monkeypatch, setup)
        model = setup[2]("init")
        hook = model.register_forward_pre_hook(  # training forwards only (evaluation runs without gradient)
            lambda _m, args, seen=seen: seen["target"].append(args[0].shape[0]) if torch.is_grad_enabled() else None
        )
        ctx = _ctx(setup, GuidanceConfig(alpha=1.0, cka_examples=examples))
        objective = get_method("guidance").objective(ctx, model)
        fit(objective, ctx.data, ctx.training, torch_generator(0, "downstream_train"))
        handle.remove(), hook.remove()
        steps = 3 * 8
        assert len(seen["guide"]) == steps and set(seen["gram"]) == {expected}, (examples, set(seen["gram"]))
        assert all(len(g) == expected for g in seen["guide"])
        # One forward of the target a training step: the loop's 10 rows, then the CKA batch's.
        assert seen["target"] == [10 if examples is None else 10 + expected] * steps
        if examples == 32:  # training rows, drawn afresh every step
            assert all({tuple(r.tolist()) for r in g} <= rows for g in seen["guide"])
            assert len({tuple(g.flatten().tolist()) for g in seen["guide"]}) == steps
        if examples == 500:
            assert all(torch.equal(g, train.x) for g in seen["guide"])


def test_cka_examples_keeps_cross_entropy_on_the_loops_batch(setup):
    """The logits of the loop's rows alone enter the CE; the CKA rows only the alignment term."""
    from methods.cka import linear_cka

    model = setup[2]("init").eval()  # no dropout: the same forward twice
    ctx = _ctx(setup, GuidanceConfig(alpha=1.0, cka_examples=32))
    objective = get_method("guidance").objective(ctx, model)
    batch = ctx.data.train.take(torch.arange(10))
    state = objective.state()
    loss, measured = objective.loss({"train": batch}, 0)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(batch.x), batch.y)
    torch.testing.assert_close(measured["ce"], ce)
    # The alignment term is that of the rows the objective's generator drew.
    aligned = _guidance.CkaRows(ctx, 32)
    aligned.load_state(state)
    x = aligned.draw()
    assert x.shape[0] == 32
    with torch.no_grad(), preactivations(model) as t, preactivations(setup[3]) as g:
        model(x), setup[3](x)
    expected = sum(1 - linear_cka(t[i], g[j], "unbiased") for i, j in layer_map(len(t), len(g)))
    torch.testing.assert_close(measured["cka_loss"], expected)
    torch.testing.assert_close(loss.detach(), ce + expected)
    # Gradients flow through the CKA rows: the alignment term alone moves the parameters.
    objective.load_state(state)
    model.zero_grad()
    loss, measured = objective.loss({"train": batch}, 0)
    (loss - measured["ce"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_cka_examples_are_deterministic_and_seeded_by_the_method_stream(setup):
    config = GuidanceConfig(alpha=1.0, cka_examples=32)
    a, ra = _run(setup, "guidance", config)
    b, rb = _run(setup, "guidance", config)
    assert ra == rb and _same(a, b)
    _, rc = _run(setup, "guidance", config, method_seed=1)  # other CKA rows, the same CE batches
    assert rc.measurements != ra.measurements


def test_strong_alignment_on_cka_batches_lowers_the_cka_loss(setup):
    _, result = _run(setup, "guidance", GuidanceConfig(alpha=10.0, cka_examples=32))
    losses = [m["cka_loss"] for m in result.measurements]
    assert all(m["guided"] == 1 for m in result.measurements) and losses[-1] < losses[0], losses


def test_a_run_with_cka_batches_stopped_and_resumed_equals_one_never_stopped(setup):
    config = GuidanceConfig(alpha=1.0, cka_examples=32)
    whole, whole_result = _run(setup, "guidance", config)
    checkpointer, epochs = MemoryCheckpointer(), []

    def stop():
        epochs.append(None)
        return len(epochs) == 1

    with supervised(Supervision(checkpointer=checkpointer, should_stop=stop)), pytest.raises(Interrupted):
        _run(setup, "guidance", config)
    with supervised(Supervision(checkpointer=checkpointer, should_stop=lambda: False)):
        resumed, result = _run(setup, "guidance", config)
    assert result == whole_result and _same(resumed, whole)


def test_cka_batches_are_refused_by_the_vmapped_engine(setup):
    from methods.packing import packable

    ctx = _ctx(setup, GuidanceConfig(alpha=1.0, cka_examples=32))
    reason = packable([get_method("guidance").objective(ctx, setup[2]("init"))])
    assert reason is not None and "own state" in reason
    assert not get_method("guidance").packable


def test_cka_examples_below_four_is_refused():
    with pytest.raises(ValueError, match="cka_examples"):
        GuidanceConfig(cka_examples=3)


@pytest.mark.slow
def test_a_compiled_run_draws_its_cka_rows_every_step_as_the_eager_one(setup):
    """The draw runs outside the compiled graph: the compiled run's generator ends where the eager
    run's does, and its measurements follow the eager run's within float rounding."""
    import warnings

    from methods.training import Serial, fit_many

    runs = []
    for compile in (False, True):
        ctx = _ctx(setup, GuidanceConfig(alpha=1.0, cka_examples=32))
        model = setup[2]("init")
        objective = get_method("guidance").objective(ctx, model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fall back to eager
            (result,) = fit_many(
                [objective], [ctx.data], ctx.training, [torch_generator(0, "downstream_train")], Serial(compile)
            )
        runs.append((result, objective.state()["generator"]))
    (eager, eager_gen), (compiled, compiled_gen) = runs
    assert torch.equal(eager_gen, compiled_gen)
    for a, b in zip(eager.measurements, compiled.measurements, strict=True):
        assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5) for k in a)
