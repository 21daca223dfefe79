"""Packed training (`methods.packing.fit_packed`) against serial `fit`, model by model."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from methods import METHODS
from methods.masking import MaskSelection, maskable_names, topk_mask
from methods.packing import NotPackable, _Pack, _StandIn, fit_packed, packable
from methods.training import (
    Interrupted,
    NonFiniteLoss,
    Objective,
    Supervision,
    TrainConfig,
    cross_entropy,
    evaluate,
    fit,
    supervised,
)
from methods.transfer import TransferConfig, transfer
from orchestrator.trial import fresh_model
from tasks.models.mlp import MLPConfig
from tests.orchestrator.test_checkpoints import MemoryCheckpointer

K = 4
# 130 training rows (the tiny task at fraction 1) in batches of 26: 5 steps per epoch.
CFG = TrainConfig(lr=3e-3, batch_size=26, epochs=20)


def recording(objective: Objective) -> Objective:
    """`objective` whose measurements also hold each step's loss, as `loss@<step>` (one report per
    key, so the epoch's mean of it is that step's loss)."""
    inner = objective.loss

    def loss(batch, step):
        value, measurements = inner(batch, step)
        return value, {**measurements, f"loss@{step}": value}

    return dataclasses.replace(objective, loss=loss)


def step_losses(result) -> dict[str, float]:
    return {k: v for row in result.measurements for k, v in row.items() if k.startswith("loss@")}


class BatchNormNet(nn.Module):
    """Tokens -> embedding -> linear -> batch norm -> ReLU -> dropout -> classes: a model whose
    forward updates buffers in place (batch-norm statistics) in training mode."""

    def __init__(self, vocab: int, length: int, classes: int, dropout: float):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        # No bias before batch norm (as in a ResNet): it would get no gradient in exact arithmetic,
        # and AdamW would drive it by rounding noise alone, differently packed and serial.
        self.hidden = nn.Linear(8 * length, 32, bias=False)
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.norm(self.hidden(self.emb(x).flatten(1))))))


def build(tiny, kind: str, seeds, dropout: float = 0.0, fraction: float = 1.0):
    """(models, datas) of the tiny task, one per seed: fresh GPTs, subtask-induction MaskedModels
    (a random source and a random half mask, transplanted frozen), MLPs, or `BatchNormNet`s."""
    sweep = tiny(model={"dropout": dropout})
    task = sweep.build_task()
    models, datas = [], []
    for seed in seeds:
        if kind == "bn":
            data = task.downstream_data(seed, fraction)
            splits = [data.train, data.val]
            vocab = 1 + max(int(split.x.max()) for split in splits)
            classes = 1 + max(int(split.labels["y"].max()) for split in splits)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = BatchNormNet(vocab, data.train.x.shape[1], classes, dropout)
        elif kind == "mlp":
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = task.build_model(MLPConfig(n_layers=2, width=32, embed_dim=8, dropout=dropout))
        else:
            model = fresh_model(sweep, task, seed, "init")
        if kind == "masked":
            source = fresh_model(sweep, task, seed, "source_init")
            gen = torch.Generator().manual_seed(seed)
            params = dict(source.named_parameters())
            scores = {n: torch.rand(params[n].shape, generator=gen) for n in maskable_names(source, MaskSelection())}
            model = transfer(source, model, topk_mask(scores, 0.5), TransferConfig())
        models.append(model)
        datas.append(task.downstream_data(seed, fraction))
    return models, datas


def gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + s) for s in seeds]


def serial(models, datas, cfg, seeds, wrap=recording):
    models = [copy.deepcopy(m) for m in models]
    results = []
    for model, data, gen in zip(models, datas, gens(seeds), strict=True):
        try:
            results.append(fit(wrap(cross_entropy(model, data)), data, cfg, gen))
        except NonFiniteLoss as error:
            results.append(error)
    return models, results


def packed(models, datas, cfg, seeds, wrap=recording):
    models = [copy.deepcopy(m) for m in models]
    objectives = [wrap(cross_entropy(m, d)) for m, d in zip(models, datas, strict=True)]
    return models, fit_packed(objectives, datas, cfg, gens(seeds))


def assert_same_model(a: nn.Module, b: nn.Module, data) -> None:
    """Same function and, within float tolerance, the same weights. Exception: the attention's key
    bias has no gradient in exact arithmetic (softmax ignores a shift common to all keys), so AdamW
    drives it by rounding noise alone, differently in the two runs; it changes nothing computed."""
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if name.endswith("attn.qkv.bias"):
            d = p.shape[0] // 3
            p, q = torch.cat([p[:d], p[2 * d :]]), torch.cat([q[:d], q[2 * d :]])
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(data.val.x), b(data.val.x), rtol=1e-4, atol=1e-4)


# --- 1. equivalence ------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["gpt", "masked", "mlp", "bn"])
def test_each_packed_model_follows_its_serial_run(tiny, kind, dropout):
    # With dropout too: a packed model's masks come from a generator seeded as `fit` seeds the
    # global RNG, drawn site by site in the order and shapes `fit`'s forward draws them.
    seeds = list(range(K))
    models, datas = build(tiny, kind, seeds, dropout=dropout)
    serial_models, serial_results = serial(models, datas, CFG, seeds)
    packed_models, packed_results = packed(models, datas, CFG, seeds)
    same_epoch = []
    for k in range(K):
        ours, theirs = packed_results[k], serial_results[k]
        assert ours.steps == theirs.steps == 100
        expected, got = step_losses(theirs), step_losses(ours)
        assert got.keys() == expected.keys() and len(got) == 100
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key
        if kind == "bn":
            # Batch norm cancels any shift common to a batch, and the task has tokens common to
            # every sample: weights along those directions get no gradient in exact arithmetic, so
            # AdamW drives them by rounding noise, differently packed and serial, the running means
            # (which track them) with them, and so eval-mode accuracy and the kept epoch. The losses
            # above (training mode) and, where the same epoch was kept, the running variances
            # (shift-free) show the statistics are updated model by model.
            if ours.best_epoch == theirs.best_epoch:
                same_epoch.append(k)
                ours_b, theirs_b = (dict(m.named_buffers()) for m in (packed_models[k], serial_models[k]))
                for name in ("norm.running_var", "norm.num_batches_tracked"):
                    torch.testing.assert_close(ours_b[name], theirs_b[name], rtol=1e-4, atol=1e-6)
            continue
        assert (ours.best_epoch, ours.epochs_run) == (theirs.best_epoch, theirs.epochs_run)
        assert ours.history == pytest.approx(theirs.history, abs=1e-6)
        assert ours.best_val_acc == pytest.approx(theirs.best_val_acc, abs=1e-6)
        assert_same_model(packed_models[k], serial_models[k], datas[k])
        assert evaluate(packed_models[k], datas[k].val)["y"] == pytest.approx(ours.best_val_acc, abs=1e-6)
    assert kind != "bn" or same_epoch, "no model kept the same epoch both ways: nothing compared"
    # The models were different to begin with, and trained apart.
    assert len({round(r.history[0], 6) for r in packed_results} | {round(r.history[-1], 6) for r in packed_results}) > 1


def test_paper_settings_pack_too(tiny):
    # The paper's model and loop: a tied LM head, the all-positions loss (the model's own), GPT-2 init,
    # a linear schedule, the best epoch by validation loss, ties to the last.
    sweep = tiny(model={"dropout": 0.0, "head": "tied_lm", "init": "gpt2"}, task={"loss": "all_positions"})
    task, seeds = sweep.build_task(), [0, 1, 2]
    models = [fresh_model(sweep, task, s, "init") for s in seeds]
    datas = [task.downstream_data(s, 1.0) for s in seeds]
    assert models[0].own_loss
    cfg = TrainConfig(
        lr=3e-3, batch_size=26, epochs=6, lr_schedule="linear", select="val_loss", ties="last", patience=2
    )
    serial_models, expected = serial(models, datas, cfg, seeds)
    packed_models, got = packed(models, datas, cfg, seeds)
    for k in range(len(seeds)):
        assert (got[k].best_epoch, got[k].epochs_run) == (expected[k].best_epoch, expected[k].epochs_run)
        assert got[k].history == pytest.approx(expected[k].history, abs=1e-6)
        for ours, theirs in zip(got[k].measurements, expected[k].measurements, strict=True):
            assert ours.keys() == theirs.keys() >= {"lm", "ce", "val_loss", "lr"}
            assert ours == pytest.approx(theirs, rel=1e-5)
        assert_same_model(packed_models[k], serial_models[k], datas[k])


def test_a_method_owned_optimiser_packs_too(tiny):
    # SGD with Nesterov momentum, warm-up then cosine decay, the embeddings at their own rate without
    # decay, two optimiser steps per batch, a minimum step budget, per-epoch reports: every rule of the
    # one loop, through both engines.
    sweep = tiny(model={"dropout": 0.1})
    task, seeds = sweep.build_task(), [0, 1, 2]
    models = [fresh_model(sweep, task, s, "init") for s in seeds]
    datas = [task.downstream_data(s, 0.3) for s in seeds]
    cfg = TrainConfig(
        optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, lr_schedule="cosine", warmup_steps=3,
        groups=({"match": "emb", "lr_scale": 0.5, "weight_decay": 0.0},), batch_size=26, epochs=2, min_steps=24,
    )  # fmt: skip
    spb = lambda o: dataclasses.replace(recording(o), steps_per_batch=2)  # noqa: E731
    reports: list[list] = [[] for _ in seeds]
    observers = [lambda label, epoch, values, k=k: reports[k].append((epoch, values["lr"])) for k in range(3)]
    serial_models, expected = serial(models, datas, cfg, seeds, wrap=spb)
    packed_models = [copy.deepcopy(m) for m in models]
    got = fit_packed([spb(cross_entropy(m, d)) for m, d in zip(packed_models, datas, strict=True)], datas, cfg,
                     gens(seeds), observers=observers)  # fmt: skip
    for k in range(len(seeds)):
        assert got[k].steps == expected[k].steps >= 24 and got[k].epochs_run > cfg.epochs
        assert (got[k].best_epoch, got[k].epochs_run) == (expected[k].best_epoch, expected[k].epochs_run)
        assert got[k].history == pytest.approx(expected[k].history, abs=1e-6)
        for ours, theirs in zip(got[k].measurements, expected[k].measurements, strict=True):
            assert ours == pytest.approx(theirs, rel=1e-5)
        assert_same_model(packed_models[k], serial_models[k], datas[k])
        assert [e for e, _ in reports[k]] == list(range(1, got[k].epochs_run + 1))
        assert reports[k][-1][1] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at the last step


def test_frozen_transplant_stays_the_source(tiny):
    seeds = [0, 1]
    models, datas = build(tiny, "masked", seeds)
    trained, _ = packed(models, datas, TrainConfig(lr=3e-3, batch_size=26, epochs=2), seeds)
    for before, after in zip(models, trained, strict=True):
        for name in after.names:
            fn, fn0 = after.fns[name.replace(".", "__")], before.fns[name.replace(".", "__")]
            assert torch.equal(fn.source, fn0.source) and torch.equal(fn.mask, fn0.mask)
            effective = after.effective_weights()[name]
            assert torch.equal(effective[fn.mask], fn0.source[fn.mask])


# --- 2. determinism ------------------------------------------------------------------------------


def test_packed_run_is_bit_reproducible_with_dropout(tiny):
    seeds = list(range(K))
    models, datas = build(tiny, "gpt", seeds, dropout=0.1)
    cfg = TrainConfig(lr=3e-3, batch_size=26, epochs=4)
    a_models, a = packed(models, datas, cfg, seeds)
    b_models, b = packed(models, datas, cfg, seeds)
    assert a == b
    for m, n in zip(a_models, b_models, strict=True):
        for (name, p), q in zip(m.state_dict().items(), n.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


@pytest.mark.parametrize("kind", ["gpt", "masked", "mlp", "bn"])
def test_a_packed_model_is_the_same_whatever_else_is_packed(tiny, kind):
    # Dropout on: each model's masks come from its own stream, so its run is bitwise the same alone,
    # in any company and at any place in the pack; that is what lets a resumed or extended sweep
    # (other packs) and another pack size (another machine) give the same numbers.
    seeds = list(range(6))
    models, datas = build(tiny, kind, seeds, dropout=0.1)
    cfg = TrainConfig(lr=3e-3, batch_size=26, epochs=8, patience=1)
    full_models, full = packed(models, datas, cfg, seeds)
    assert len({r.epochs_run for r in full}) > 1, "models must leave the pack at different epochs"
    assert all(type(m) is not _StandIn for model in full_models for m in model.modules())
    for order in ([0], [2, 0], [3, 1, 0, 5, 4, 2]):
        some_models, some = packed([models[i] for i in order], [datas[i] for i in order], cfg, order)
        at = order.index(0)
        assert step_losses(some[at]) == step_losses(full[0]) and some[at].history == full[0].history
        for (name, p), q in zip(
            full_models[0].state_dict().items(), some_models[at].state_dict().values(), strict=True
        ):
            assert torch.equal(p, q), (order, name)
    # ... while dropout does act: with it off, the runs differ.
    quiet_models, quiet = packed(build(tiny, kind, seeds)[0], datas, cfg, seeds)
    assert step_losses(quiet[0]) != step_losses(full[0])


def test_packing_leaves_the_global_rng_as_it_was(tiny):
    models, datas = build(tiny, "gpt", [0, 1], dropout=0.1)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    packed(models, datas, TrainConfig(lr=3e-3, batch_size=26, epochs=1), [0, 1])
    assert torch.equal(torch.rand(3), expected)


# --- 3. early stopping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(lr=3e-3, batch_size=26, epochs=25, patience=2),
        TrainConfig(lr=3e-3, batch_size=26, epochs=25, target_val_acc=0.3),
        TrainConfig(lr=3e-3, batch_size=26, epochs=25, patience=2, ties="last", lr_schedule="linear"),
    ],
    ids=["patience", "target", "ties-last-linear-lr"],
)
def test_models_stop_at_their_own_epochs(tiny, cfg):
    seeds = list(range(K))
    models, datas = build(tiny, "gpt", seeds)
    serial_models, expected = serial(models, datas, cfg, seeds)
    packed_models, got = packed(models, datas, cfg, seeds)
    stops = lambda results: [(r.epochs_run, r.best_epoch, r.steps) for r in results]  # noqa: E731
    assert stops(got) == stops(expected)
    assert len({r.epochs_run for r in got}) > 1, "the test needs models that stop at different epochs"
    for k in range(K):
        assert got[k].history == pytest.approx(expected[k].history, abs=1e-6)
        assert_same_model(packed_models[k], serial_models[k], datas[k])


# --- 4. failure isolation ------------------------------------------------------------------------


def test_a_diverging_model_fails_alone(tiny):
    seeds = list(range(K))
    models, datas = build(tiny, "gpt", seeds)
    with torch.no_grad():
        models[1].head.bias.fill_(float("nan"))
    cfg = TrainConfig(lr=3e-3, batch_size=26, epochs=6)
    serial_models, expected = serial(models, datas, cfg, seeds)
    packed_models, got = packed(models, datas, cfg, seeds)
    assert isinstance(expected[1], NonFiniteLoss) and isinstance(got[1], NonFiniteLoss)
    assert str(got[1]) == str(expected[1]) == "training loss became nan in epoch 1"
    for k in (0, 2, 3):
        assert step_losses(got[k]) == pytest.approx(step_losses(expected[k]), rel=1e-5)
        assert (got[k].best_epoch, got[k].epochs_run) == (expected[k].best_epoch, expected[k].epochs_run)
        assert_same_model(packed_models[k], serial_models[k], datas[k])


# --- 5. what does not pack -----------------------------------------------------------------------


def _unpackable(case: str, objectives: list[Objective], models, datas):
    extra = nn.Parameter(torch.zeros(3))
    changes = {
        "steps per batch": lambda o: dataclasses.replace(o, steps_per_batch=2),
        "loose params": lambda o: dataclasses.replace(o, params=[*o.params, extra]),
        "end_epoch": lambda o: dataclasses.replace(o, end_epoch=lambda epoch: None),
        "own state": lambda o: dataclasses.replace(o, state=lambda: 0, load_state=lambda s: None),
    }
    if case in changes:
        objectives[2] = changes[case](objectives[2])
    elif case == "python state":  # a module that keeps per-example Python state (OccamNet's gate targets)
        models[2].blocks[0].python_state = True
    elif case == "shared module":
        objectives[2] = cross_entropy(models[0], datas[2])
    elif case == "another architecture":
        objectives[2] = cross_entropy(nn.Sequential(nn.Linear(3, 7)), datas[2])
    elif case == "another loss":
        objectives[2] = recording(objectives[2])
    elif case == "other randomness":  # drawn past nn.Dropout modules: no stream of its own per model
        objectives = [dataclasses.replace(o, loss=_noisy(o.loss)) for o in objectives]
    return objectives


def _noisy(loss):
    def noisy(batch, step):
        value, measurements = loss(batch, step)
        return value + 1e-3 * torch.rand(()), measurements

    return noisy


@pytest.mark.parametrize(
    "case, reason",
    [
        ("steps per batch", "steps_per_batch differs"),
        ("loose params", "beyond the module's"),
        ("end_epoch", "`end_epoch` hook"),
        ("own state", "`state` / `load_state`"),
        ("python state", "keeps Python state between steps"),
        ("shared module", "same module"),
        ("another architecture", "module is a Sequential"),
        ("another loss", "loss is another function"),
        ("another budget", "equal budgets"),
        ("generators", "3 generators"),
        ("other randomness", "draws random numbers other than through nn.Dropout"),
    ],
)
def test_what_does_not_pack_is_refused_before_training(tiny, case, reason):
    models, datas = build(tiny, "gpt", [0, 1, 2, 3])
    if case == "another budget":
        datas[2] = build(tiny, "gpt", [2], fraction=0.5)[1][0]
    objectives = _unpackable(case, [cross_entropy(m, d) for m, d in zip(models, datas, strict=True)], models, datas)
    generators = gens([0, 1, 2, 3])[: 3 if case == "generators" else 4]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    gen_states = [g.get_state() for g in generators]
    if case not in ("generators", "other randomness"):
        assert reason in packable(objectives, datas)
    with pytest.raises(NotPackable, match=reason):
        fit_packed(objectives, datas, CFG, generators)
    assert all(type(m) is not _StandIn for model in models for m in model.modules()), "dropout put back"
    for model, state in zip(models, before, strict=True):
        assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, gen_states, strict=True))


def test_a_plain_pack_is_packable(tiny):
    models, datas = build(tiny, "masked", [0, 1])
    assert packable([cross_entropy(m, d) for m, d in zip(models, datas, strict=True)], datas) is None
    assert issubclass(NotPackable, ValueError)


def test_methods_with_the_default_objective_are_marked_packable():
    marked = {name for name in METHODS.names() if METHODS.get(name).packable}
    assert {
        "scratch",
        "full_transfer",
        "subtask_induction",
        "sampled_subnetwork",
        "complement_subnetwork",
        "paper_sampled_subnetwork",
    } <= marked
    assert not marked & {"l2sp", "cbft", "guidance", "linearized_gp", "lpft"}


# --- 6. the optimiser ----------------------------------------------------------------------------


def _objective(module: nn.Module) -> Objective:
    return Objective(loss=lambda batch, step: None, module=module, params=list(module.parameters()), score=lambda: 0.0)


def test_one_adamw_over_stacked_parameters_is_k_adamws_also_after_a_drop():
    torch.manual_seed(0)
    modules = [nn.Linear(5, 3) for _ in range(3)]
    alone = [copy.deepcopy(m) for m in modules]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in alone]
    pack = _Pack([_objective(m) for m in modules], TrainConfig(lr=1e-2, weight_decay=0.1))
    live = [0, 1, 2]
    for step in range(20):
        if step == 10:  # model 1 finishes: it leaves the pack, its optimiser state with it
            live = [0, 2]
            pack.keep(torch.tensor([0, 2]))
        grads = {k: [torch.randn_like(p) for p in alone[k].parameters()] for k in live}
        for k in live:
            for p, g in zip(alone[k].parameters(), grads[k], strict=True):
                p.grad = g
            opts[k].step()
        for i, (name, _) in enumerate(modules[0].named_parameters()):
            pack.tensors[name].grad = torch.stack([grads[k][i] for k in live])
        pack.opt.step()
    for row, k in enumerate(live):
        for name, p in alone[k].named_parameters():
            assert torch.equal(pack.tensors[name][row], p), name


# --- calibration of the pack size --------------------------------------------------------


class FakeTime:
    """A clock that moves only when a (fake) pack step runs: `seconds(k)` per step of K models, so a
    test chooses how throughput grows with K."""

    def __init__(self, seconds):
        self.seconds, self.now = seconds, 0.0

    def __call__(self) -> float:
        return self.now

    def stepper(self, lead, mixed_precision, feed):
        fake = self

        class Step:
            def sites(self, pack, x, y, step):
                return []

            def __call__(self, pack, x, y, step, masks):
                k = next(iter(pack.tensors.values())).shape[0]
                fake.now += fake.seconds(k)
                return torch.zeros(k), {}

        return Step()


@pytest.mark.parametrize(
    "seconds, k, stopped",
    [
        (lambda k: 0.1 * k, 1, "K = 2 gained less than 1.1x over K = 1"),  # time grows with K: no gain
        (lambda k: 0.1 + 0.01 * k, 8, "reached k_max = 8"),  # near-free models: pack to the limit
        (lambda k: {1: 0.1, 2: 0.1, 4: 0.3}[k], 2, "K = 4 gained less than 1.1x over K = 2"),
    ],
)
def test_calibration_doubles_k_while_throughput_grows(tiny, monkeypatch, seconds, k, stopped):
    from methods import packing

    fake = FakeTime(seconds)
    monkeypatch.setattr(packing, "_stepper", fake.stepper)
    models, datas = build(tiny, "gpt", [0], dropout=0.1)
    found = packing.calibrate(cross_entropy(models[0], datas[0]), datas[0], CFG, 8, clock=fake)
    assert (found.k, found.stopped) == (k, stopped)
    assert found.rates[1] == pytest.approx(1 / seconds(1))  # model-steps per second
    assert found.k == min(kk for kk, r in found.rates.items() if r >= max(found.rates.values()) / 1.02)


def test_calibration_leaves_the_model_the_generators_and_the_global_rng_alone(tiny):
    from methods.packing import calibrate

    models, datas = build(tiny, "masked", [0], dropout=0.1)
    before = copy.deepcopy(models[0].state_dict())
    rng = torch.get_rng_state()
    found = calibrate(cross_entropy(models[0], datas[0]), datas[0], CFG, 4, min_steps=1, min_seconds=0.0)
    assert set(found.rates) <= {1, 2, 4} and found.k in found.rates and found.bytes_per_model is None
    assert torch.equal(torch.get_rng_state(), rng)
    after = models[0].state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_attention_through_its_dropout_module_is_the_fused_attention():
    # Inside dropout_through_modules() the GPT's attention applies its dropout through `attn_drop`;
    # with that module idle, the explicit path must compute what the fused kernel does.
    from tasks.models.dropout import dropout_through_modules
    from tasks.models.gpt import CausalSelfAttention, GPTConfig

    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(d_model=32, n_heads=4, dropout=0.1))
    x = torch.randn(3, 5, 32)
    attn.eval()
    fused = attn(x)
    attn.train()
    attn.attn_drop.eval()
    attn.resid_drop.eval()
    with dropout_through_modules():
        explicit = attn(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
    attn.attn_drop.train()
    with dropout_through_modules():
        assert not torch.allclose(attn(x), fused), "attention dropout goes through attn_drop"


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["first epoch", "as the first model leaves"])
def test_a_stopped_pack_resumes_bit_for_bit(tiny, when):
    # Stopped at an epoch end (models already gone from the pack at the later stops), then run again
    # on freshly built models, as the next run of the sweep would: the same results and weights as
    # a pack never stopped.
    seeds = list(range(K))
    models, datas = build(tiny, "gpt", seeds, dropout=0.1)
    cfg = TrainConfig(lr=3e-3, batch_size=26, epochs=8, patience=2)
    whole_models, whole = packed(models, datas, cfg, seeds)
    assert len({r.epochs_run for r in whole}) > 1, "models must leave the pack at different epochs"
    # Asked at every epoch end while models remain: at the first one, or where the first model left.
    stop_at = 1 if when == "first epoch" else min(r.epochs_run for r in whole)
    checkpointer, asked = MemoryCheckpointer(), []

    def stop() -> bool:
        asked.append(True)
        return len(asked) == stop_at

    with supervised(Supervision(name="train", checkpointer=checkpointer, should_stop=stop, on_epoch=None)):
        with pytest.raises(Interrupted):
            packed(models, datas, cfg, seeds)
    assert 0 in checkpointer.slots
    with supervised(Supervision(name="train", checkpointer=checkpointer, should_stop=stop, on_epoch=None)):
        resumed_models, resumed = packed(models, datas, cfg, seeds)
    # Asked once per epoch end with models left, over both runs together: the second run went on
    # from the checkpoint rather than from the start.
    assert len(asked) == max(r.epochs_run for r in whole) - 1
    assert resumed == whole
    for a, b in zip(resumed_models, whole_models, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
