"""The compiled serial engine (methods/training.py: `Serial(compile=...)`, `compiling`, `compiles`):
it follows the eager engine step by step, is deterministic, resumes from checkpoints, reuses its
compiled graphs across runs in a process, and falls back to eager with a warning where compiling
fails. Compiled validation (`compiled_eval`, `eval_policy`) gives the eager accuracies; `auto`
reads only the run (never the worker's history); a trial's row says whether it trained compiled.
Compiling takes seconds, so every test that compiles is marked slow (about two minutes in all on one loaded
core with a cold Inductor cache); the fast ones stand torch.compile in with a function that fails
or with the function itself."""

import dataclasses
import warnings

import pytest
import torch

from methods import training
from methods.packing import Vmapped
from methods.training import (
    AUTO_MIN_STEPS,
    Interrupted,
    ParamGroup,
    Serial,
    Supervision,
    TrainConfig,
    compiles,
    cross_entropy,
    fit_many,
    supervised,
)
from tasks.base import Split, StageData
from tasks.models.gpt import GPT, GPTConfig
from tasks.models.plain_cnn import PlainCNN, PlainCNNConfig
from tests.orchestrator.test_checkpoints import MemoryCheckpointer

# The quickstart's model (configs/quickstart.yaml) on sequences of its length (3 tokens).
QUICKSTART_GPT = GPTConfig(n_layers=2, d_model=64, n_heads=4, dropout=0.1)
# 230 rows at batch 50: four full batches and a last one of 30 every epoch; 20 epochs, 100 steps.
CFG = TrainConfig(lr=1e-3, batch_size=50, epochs=20, keep_initial=False, select="last")


def _gpt_data(seed: int = 0, n: int = 230) -> StageData:
    gen = torch.Generator().manual_seed(seed)

    def split(rows):
        x = torch.randint(0, 40, (rows, 3), generator=gen)
        return Split(x, {"y": (x[:, 0] * 3 + x[:, 1]) % 7})

    return StageData(train=split(n), val=split(40))


def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(QUICKSTART_GPT, vocab_size=40, n_positions=3, n_classes=7)


def _cnn_data(seed: int = 0, n: int = 230) -> StageData:
    gen = torch.Generator().manual_seed(seed)

    def split(rows):
        x = torch.randn(rows, 3, 8, 8, generator=gen)
        return Split(x, {"y": (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()})

    return StageData(train=split(n), val=split(40))


def _cnn(seed: int = 0) -> PlainCNN:
    torch.manual_seed(seed)
    return PlainCNN(PlainCNNConfig(n_blocks=2, width=8), n_classes=3, image_size=8)


class Recording(Serial):
    """The serial engine, keeping every step's loss."""

    def __init__(self, compile):
        super().__init__(compile)
        self.losses: list[torch.Tensor] = []

    def step(self, idx, step):
        loss, measurements = super().step(idx, step)
        self.losses.append(loss)
        return loss, measurements


LAST: dict[str, object] = {}  # the engine of the last `_run` / `_run_pack`


def _run(model, data, compile, cfg=CFG, seed=0):
    engine = LAST["engine"] = Recording(compile)
    (result,) = fit_many([cross_entropy(model, data)], [data], cfg, [torch.Generator().manual_seed(seed)], engine)
    return result, torch.cat(engine.losses), model


class RecordingPack(Vmapped):
    """The vmapped engine, keeping every step's losses (K,)."""

    def __init__(self, compile):
        super().__init__(compile)
        self.losses: list[torch.Tensor] = []

    def step(self, idx, step):
        loss, measurements = super().step(idx, step)
        self.losses.append(loss)
        return loss, measurements


def _run_pack(compile, k=3, cfg=CFG, n=230):
    models, datas = [_gpt(seed) for seed in range(k)], [_gpt_data(seed, n) for seed in range(k)]
    engine = LAST["engine"] = RecordingPack(compile)
    gens = [torch.Generator().manual_seed(seed) for seed in range(k)]
    results = fit_many([cross_entropy(m, d) for m, d in zip(models, datas, strict=True)], datas, cfg, gens, engine)
    return results, torch.stack(engine.losses), models


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _failing_compile(monkeypatch):
    """torch.compile standing for a machine without a compiler: the compiled call raises."""

    def compile(fn, **kwargs):
        def broken(*args, **kw):
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")

        return broken

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(training, "_BROKEN", [])
    monkeypatch.setattr(training, "_WHOLE_BROKEN", {})
    monkeypatch.setattr(training, "_FORWARD", [])


def _counting_compile(monkeypatch) -> dict:
    """torch.compile standing for one that works (the function itself), counting the calls of each
    function it was given by name."""
    calls: dict[str, int] = {}

    def compile(fn, **kwargs):
        def counted(*args, **kw):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*args, **kw)

        return counted

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(training, "_BROKEN", [])
    monkeypatch.setattr(training, "_WHOLE_BROKEN", {})
    monkeypatch.setattr(training, "_FORWARD", [])
    return calls


# --- fast: no real compiling ---------------------------------------------------------------------


def test_auto_compiles_long_runs_only_and_never_after_a_failure(monkeypatch):
    monkeypatch.setattr(training, "_BROKEN", [])
    monkeypatch.setattr(training, "_WHOLE_BROKEN", {})
    cpu = torch.device("cpu")
    assert compiles(True, cpu, 1) and not compiles(False, cpu, 10**9)
    assert compiles("auto", cpu, AUTO_MIN_STEPS)
    assert not compiles("auto", cpu, AUTO_MIN_STEPS - 1)
    training._BROKEN.append("RuntimeError: no compiler")
    assert not compiles("auto", cpu, 10**9) and not compiles(True, cpu, 1)


def test_auto_does_not_depend_on_what_the_worker_ran_before(monkeypatch):
    """A trial's numbers never depend on which trials its worker ran first: a short run trains
    eagerly (and validates eagerly) under `auto` even right after a compiled run of the same model
    at the same batch shapes, whose graphs are in the process."""
    calls = _counting_compile(monkeypatch)
    cfg = CFG.model_copy(update={"epochs": 3, "keep_initial": True, "select": "val_acc"})
    with training.compiling(True):
        _run(_gpt(), _gpt_data(), None, cfg)
    compiled_steps, compiled_passes = calls["whole_step"], calls.get("_logits", 0)
    assert compiled_steps > 0 and compiled_passes > 0
    with training.compiling("auto"):
        first = _run(_gpt(1), _gpt_data(1), None, cfg)
    assert (calls["whole_step"], calls.get("_logits", 0)) == (compiled_steps, compiled_passes), "auto reused the graphs"
    with training.compiling(False):
        eager = _run(_gpt(1), _gpt_data(1), None, cfg)
    assert first[0] == eager[0] and torch.equal(first[1], eager[1])


def test_auto_compiles_a_compiled_runs_validation_where_it_pays(monkeypatch):
    calls = _counting_compile(monkeypatch)
    monkeypatch.setattr(training, "AUTO_MIN_STEPS", 10)  # every run below compiles its step
    cfg = CFG.model_copy(update={"epochs": 3, "keep_initial": True, "select": "val_acc"})
    with training.compiling("auto"):
        _run(_gpt(), _gpt_data(), None, cfg)  # 4 passes: too few to pay, eager
        assert calls.get("_logits", 0) == 0 and calls["whole_step"] == 15
        monkeypatch.setattr(training, "AUTO_MIN_EVAL_PASSES", 4)
        _run(_gpt(), _gpt_data(), None, cfg)  # 4 passes pay: compiled
        assert calls["_logits"] == 4
        monkeypatch.setattr(training, "AUTO_MIN_EVAL_PASSES", 5)
        _run(_gpt(1), _gpt_data(1), None, cfg)  # too few to pay, though the graph is there: eager
        assert calls["_logits"] == 4


def test_a_packed_models_validation_policy_does_not_depend_on_the_pack_size(monkeypatch):
    """`auto` counts one model's planned validation passes: a model validates the same way (here
    eagerly) in a pack of 2 and in a pack of 3, whose passes together would repay a compile."""
    calls = _counting_compile(monkeypatch)
    monkeypatch.setattr(training, "AUTO_MIN_STEPS", 1)  # every pack compiles its step
    cfg = CFG.model_copy(update={"epochs": 3})  # 4 passes per model (epoch 0 included)
    monkeypatch.setattr(training, "AUTO_MIN_EVAL_PASSES", 9)  # more than one model's, fewer than 3 models'
    with training.compiling("auto"):
        _run_pack(None, k=2, cfg=cfg, n=100)
        _run_pack(None, k=3, cfg=cfg, n=100)
    assert calls.get("_logits", 0) == 0 and calls["_whole"] > 0


def test_a_step_turns_eager_with_its_engine_when_validation_broke_compiling(monkeypatch):
    """A compile failure elsewhere in the process (validation's forward) stops the training step's
    compiled calls too, and through the engine's fallback: its fused optimiser is put back."""
    _counting_compile(monkeypatch)
    fallbacks = []
    step = training.Compiled(lambda x: x + 1, lambda: fallbacks.append(1))
    assert step(torch.ones(1)).item() == 2 and fallbacks == []
    training._BROKEN.append("RuntimeError: validation's compile failed")
    assert step(torch.ones(1)).item() == 2 and step(torch.ones(1)).item() == 2
    assert fallbacks == [1] and step.compiled is None


def test_a_failing_compile_trains_eagerly_after_one_warning(monkeypatch):
    cfg = CFG.model_copy(update={"epochs": 2})
    eager, eager_losses, eager_model = _run(_gpt(), _gpt_data(), False, cfg)
    _failing_compile(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: InductorError: no C\+\+ compiler"):
        result, losses, model = _run(_gpt(), _gpt_data(), True, cfg)
    # The same numbers as eager, bit for bit: the failed call drew nothing from the random state.
    assert torch.equal(losses, eager_losses) and result == eager
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), eager_model.state_dict().values(), strict=True)
    )
    # The process does not try again: later runs are eager from their first step, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = Serial(True)
        fit_many([cross_entropy(_gpt(), _gpt_data())], [_gpt_data()], cfg, [torch.Generator()], engine)
    assert not engine.compiled


def test_a_pack_whose_compile_fails_trains_as_the_eager_pack(monkeypatch):
    cfg = CFG.model_copy(update={"epochs": 2})
    eager, eager_losses, eager_models = _run_pack(False, cfg=cfg)
    _failing_compile(monkeypatch)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        results, losses, models = _run_pack(True, cfg=cfg)
    assert torch.equal(losses, eager_losses) and results == eager
    for model, eager_model in zip(models, eager_models, strict=True):
        assert all(
            torch.equal(a, b)
            for a, b in zip(model.state_dict().values(), eager_model.state_dict().values(), strict=True)
        )


def test_a_trial_compiles_as_its_resources_say(tmp_path, monkeypatch):
    """The trial's `resources.compile` reaches its training runs (seen through the fallback's warning)."""
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep
    from orchestrator.trial import TrialSpec, run_trial
    from tests.conftest import tiny_raw

    _failing_compile(monkeypatch)
    sweep = load_sweep(tiny_raw(methods=["scratch"], resources={"compile": False}))
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        off = run_trial(sweep, spec, ArtifactStore(tmp_path / "a"))
    on = load_sweep(tiny_raw(methods=["scratch"], resources={"compile": True}))
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        row = run_trial(on, spec, ArtifactStore(tmp_path / "b"))
    assert row["val_acc"] == off["val_acc"] and row["trial_hash"] == off["trial_hash"]
    assert sweep.resources.model_copy(update={"compile": "auto"}) == load_sweep(tiny_raw()).resources


def test_a_compiled_run_validates_through_the_compiled_forward_and_an_eager_one_does_not(monkeypatch):
    calls = _counting_compile(monkeypatch)
    cfg = CFG.model_copy(update={"epochs": 3, "keep_initial": True, "select": "val_acc"})
    _run(_gpt(), _gpt_data(), False, cfg)
    assert calls == {}
    with training.compiling(True) as record:
        _run(_gpt(), _gpt_data(), None, cfg)  # the engine takes the block's setting
    # every epoch's validation pass and the one before the first step; 5 steps an epoch
    assert calls == {"_logits": 4, "whole_step": 15} and (record.runs, record.compiled) == (1, 1)
    # outside a training run evaluation stays eager, whatever ran before
    training.evaluate(_gpt(), _gpt_data().val)
    assert calls["_logits"] == 4


def test_the_compiled_engine_takes_the_whole_step_where_the_objective_allows_it(monkeypatch):
    """Forward, backward and AdamW as one graph (`whole_step`) for a loss that reads its tensors
    through its module; the compiled loss and the fused optimiser for the others, said why."""
    calls = _counting_compile(monkeypatch)
    cfg = CFG.model_copy(update={"epochs": 1})
    _run(_gpt(), _gpt_data(), True, cfg)
    assert calls.get("whole_step") == 5 and "loss" not in calls
    calls.clear()
    _run(_cnn(), _cnn_data(), True, cfg)  # batch norm in training mode: running statistics updated in place
    assert calls.get("loss") == 5 and "whole_step" not in calls
    model, opt = _gpt(), None
    objective = cross_entropy(model, _gpt_data())
    opt = training.optimizer(list(model.named_parameters()), cfg)
    assert training.whole_step_refuses(objective, opt, []) is None
    own = dataclasses.replace(objective, loss=lambda batch, step: objective.loss(batch, step))
    assert "does not say" in training.whole_step_refuses(own, opt, [])
    sgd = training.optimizer(list(model.named_parameters()), cfg.model_copy(update={"optimizer": "sgd"}))
    assert "not plain AdamW" in training.whole_step_refuses(objective, sgd, [])
    assert "outside its module" in training.whole_step_refuses(objective, opt, [torch.nn.Parameter(torch.zeros(1))])
    cnn = _cnn()
    assert "batch norm" in training.whole_step_refuses(cross_entropy(cnn, _cnn_data()), opt, [])
    frozen = dataclasses.replace(cross_entropy(cnn, _cnn_data()), train_mode=False)
    assert training.whole_step_refuses(frozen, opt, []) is None  # running statistics read, not updated


def test_a_whole_step_that_fails_after_running_raises_instead_of_stepping_again(monkeypatch):
    """A whole step updates weights in place: once one has run, a failure of a later call (say, out
    of memory inside its kernels) is the run's error, not a retry from half-updated weights."""
    _counting_compile(monkeypatch)
    counted = torch.compile

    def compile(fn, **kwargs):
        if fn.__name__ != "whole_step":
            return counted(fn, **kwargs)
        calls = []

        def flaky(*args):
            calls.append(None)
            if len(calls) == 3:
                raise RuntimeError("out of memory inside a kernel")
            return fn(*args)

        return flaky

    monkeypatch.setattr(torch, "compile", compile)
    try:
        results = fit_many(
            [cross_entropy(_gpt(), _gpt_data())], [_gpt_data()], CFG, [torch.Generator().manual_seed(0)], Serial(True)
        )
    except RuntimeError as error:
        results = [error]
    assert isinstance(results[0], RuntimeError) and "out of memory" in str(results[0])
    assert not any(training._WHOLE_BROKEN.values())  # not taken for a failure to compile


def test_the_whole_step_follows_the_eager_engines_with_parameter_groups_and_early_stops(monkeypatch):
    """The whole step (run by the function itself here: what it computes, not how it compiles) in
    the optimiser's order of tensors, which parameter groups reorder, and a pack whose models stop
    at their own epochs (each stop gives the pack a new optimiser)."""
    head = ParamGroup(match="^head\\.", lr_scale=10.0, weight_decay=0.0)
    groups = [head, ParamGroup(match="bias|ln", weight_decay=0.0)]
    cfg = CFG.model_copy(update={"groups": groups})
    _, eager_losses, eager_model = _run(_gpt(), _gpt_data(), False, cfg)
    calls = _counting_compile(monkeypatch)
    _, losses, model = _run(_gpt(), _gpt_data(), True, cfg)
    assert calls.get("whole_step") == 100
    _close(losses, eager_losses)
    for a, b in zip(model.parameters(), eager_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=2e-3)  # AdamW scales the rounding of near-zero gradients (see below)
    stopping = cfg.model_copy(update={"epochs": 30, "patience": 2, "select": "val_acc", "batch_size": 26})
    eager_results = _pack_results(False, stopping)
    calls = _counting_compile(monkeypatch)
    results = _pack_results(True, stopping)
    assert calls.get("_whole", 0) > 0
    stops = lambda rs: [(r.epochs_run, r.best_epoch, r.steps) for r in rs]  # noqa: E731
    assert stops(results) == stops(eager_results)
    assert len({r.epochs_run for r in results}) > 1, "the test needs models that stop at different epochs"
    for got, want in zip(results, eager_results, strict=True):
        assert got.history == pytest.approx(want.history, rel=1e-4, abs=1e-6)


def _pack_results(compile, cfg, k=3):
    models, datas = [_gpt(seed) for seed in range(k)], [_gpt_data(seed) for seed in range(k)]
    gens = [torch.Generator().manual_seed(seed) for seed in range(k)]
    objectives = [cross_entropy(m, d) for m, d in zip(models, datas, strict=True)]
    return fit_many(objectives, datas, cfg, gens, Vmapped(compile))


def test_a_whole_step_that_fails_to_compile_falls_back_to_the_compiled_loss(monkeypatch):
    """Only the whole step stops: the run, and later runs, compile their loss, after one warning."""
    calls = _counting_compile(monkeypatch)
    counted = torch.compile

    def compile(fn, **kwargs):
        if fn.__name__ == "whole_step":
            return lambda *args: (_ for _ in ()).throw(RuntimeError("unsupported in-place op\nmore"))
        return counted(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", compile)
    cfg = CFG.model_copy(update={"epochs": 1})
    eager, eager_losses, _ = _run(_gpt(), _gpt_data(), False, cfg)
    with pytest.warns(RuntimeWarning, match="unsupported in-place op.*compiled loss and the fused optimiser"):
        result, losses, _ = _run(_gpt(), _gpt_data(), True, cfg)
    assert calls.get("loss") == 5 and any(training._WHOLE_BROKEN.values()) and not training._BROKEN
    _close(losses, eager_losses)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(_gpt(), _gpt_data(), True, cfg)
    assert calls.get("loss") == 10


def test_the_record_counts_compiled_runs_and_a_failed_compile_as_eager(monkeypatch):
    cfg = CFG.model_copy(update={"epochs": 1})
    with training.compiling(False) as record:
        _run(_gpt(), _gpt_data(), None, cfg)
        _run_pack(None, cfg=cfg)
    assert (record.runs, record.compiled) == (2, 0)
    _counting_compile(monkeypatch)
    with training.compiling(True) as record:
        _run(_gpt(), _gpt_data(), None, cfg)
        _run_pack(None, cfg=cfg)
    assert (record.runs, record.compiled) == (2, 2)
    _failing_compile(monkeypatch)
    with training.compiling(True) as record, pytest.warns(RuntimeWarning, match="torch.compile failed"):
        _run(_gpt(), _gpt_data(), None, cfg)
    assert (record.runs, record.compiled) == (1, 0)


def test_a_trials_row_says_whether_its_training_ran_compiled(tmp_path, monkeypatch):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep
    from orchestrator.trial import TrialSpec, run_trial
    from tests.conftest import tiny_raw

    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    _counting_compile(monkeypatch)
    rows = {
        setting: run_trial(
            load_sweep(tiny_raw(methods=["scratch"], resources={"compile": setting})),
            spec,
            ArtifactStore(tmp_path / str(setting)),
        )
        for setting in (False, True)
    }
    assert rows[False]["compiled"] is False and rows[True]["compiled"] is True
    assert rows[False]["compiled_whole"] is False and rows[True]["compiled_whole"] is True  # scratch: cross-entropy


def test_a_masked_model_lists_its_masked_names_in_one_order_whatever_its_masks_order():
    from methods.masking import MaskedModel, ScoreMask

    names = [n for n, p in _gpt().named_parameters() if p.ndim == 2][:4]
    fns = {n: ScoreMask(dict(_gpt().named_parameters())[n].shape, 0.0) for n in names}
    # A compiled forward guards on this list: one order lets every trial's model reuse one graph.
    assert MaskedModel(_gpt(), fns).names == MaskedModel(_gpt(), dict(reversed(fns.items()))).names


def test_evaluate_with_loss_is_evaluate_and_mean_loss_in_one_pass():
    model, data = _gpt(), _gpt_data(n=50)
    accs, loss = training.evaluate_with_loss(model, data.train, batch_size=16)
    assert accs == training.evaluate(model, data.train, 16)
    assert loss == training.mean_loss(model, data.train, 16)


# --- slow: compiled ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("build", ["gpt", "cnn"])
def test_compiled_evaluation_gives_the_eager_accuracies_and_reuses_its_graph(build):
    make, data_of = (_gpt, _gpt_data) if build == "gpt" else (_cnn, _cnn_data)
    cfg = CFG.model_copy(update={"epochs": 3})
    models = [_run(make(seed), data_of(seed), False, cfg)[2] for seed in range(3)]  # trained a little, eagerly
    before = None
    for model, seed in zip(models, range(3), strict=True):
        split = data_of(seed, n=300).train
        eager_acc, eager_loss = training.evaluate_with_loss(model, split, 128)
        with training.compiled_eval(True):
            acc, loss = training.evaluate_with_loss(model, split, 128)
            assert training.evaluate(model, split, 128) == acc
        assert acc == eager_acc, f"compiled accuracy {acc} against eager {eager_acc}"
        assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
        if before is None:
            before = _graphs()  # the first model compiled its graphs: batches of 128 and the last of 44
        assert _graphs() == before  # the others, trained apart, reuse them


def _warm_validation(model, data) -> None:
    """The compiled validation graph of `model`'s kind on `data`, compiled now: the graphs counted
    after it are the training step's."""
    with training.compiled_eval(True):
        training.evaluate(model, data.val)


def _close(compiled: torch.Tensor, eager: torch.Tensor, rtol: float = 1e-5) -> float:
    worst = float(((compiled - eager).abs() / eager.abs()).max())
    assert worst <= rtol, f"a compiled step's loss is {worst:.2e} relative from the eager one's"
    return worst


@pytest.mark.slow
def test_the_compiled_gpt_follows_eager_is_deterministic_and_compiles_once_per_shape():
    data = _gpt_data()
    eager, eager_losses, eager_model = _run(_gpt(), data, False)
    _warm_validation(_gpt(), data)
    before = _graphs()
    compiled, losses, model = _run(_gpt(), data, True)
    assert len(losses) == 100 and LAST["engine"].whole is not None  # the whole step, not the compiled loss
    # Dropout on: the compiled step draws the eager step's masks. (The weights are not compared
    # element by element: AdamW scales the rounding noise of near-zero gradients up to steps of lr.)
    _close(losses, eager_losses)
    # A full and a last, smaller batch: two graphs for 20 epochs, not one per epoch.
    assert 1 <= _graphs() - before <= 2
    # Another model of the same structure (the next trial in this worker): no new graph, the same numbers.
    again, losses_again, model_again = _run(_gpt(), data, True)
    assert _graphs() - before <= 2
    assert torch.equal(losses_again, losses) and again == compiled
    assert all(
        torch.equal(a, b) for a, b in zip(model_again.state_dict().values(), model.state_dict().values(), strict=True)
    )


@pytest.mark.slow
def test_the_compiled_pack_follows_the_eager_pack_and_is_deterministic():
    # 250 rows: five full batches an epoch, one graph (the serial test covers the last, smaller batch).
    _, eager_losses, _ = _run_pack(False, n=250)
    _warm_validation(_gpt(), _gpt_data(n=250))
    before = _graphs()
    results, losses, _ = _run_pack(True, n=250)
    assert LAST["engine"].step_fn.whole is not None  # the pack's whole step
    # The step's graph, and the validation graph of the pack's lead model (its dropouts stood in for
    # while the pack trains: another module structure than a model's alone).
    assert losses.shape == (100, 3) and _graphs() - before == 2
    _close(losses, eager_losses)  # each model's dropout masks from its own stream, as eagerly
    again, losses_again, _ = _run_pack(True, n=250)  # a later pack of these models in the process: no new graph
    assert _graphs() - before == 2 and torch.equal(losses_again, losses) and again == results


@pytest.mark.slow
def test_the_compiled_cnn_follows_eager():
    data, cfg = _cnn_data(n=200), CFG.model_copy(update={"epochs": 25})  # 4 full batches an epoch: one graph
    _, eager_losses, _ = _run(_cnn(), data, False, cfg)
    _warm_validation(_cnn(), data)
    before = _graphs()
    _, losses, _ = _run(_cnn(), data, True, cfg)
    assert len(losses) == 100 and _graphs() - before == 1
    _close(losses, eager_losses)  # batch norm in training mode: batch statistics, running ones updated


@pytest.mark.slow
def test_a_compiled_run_stopped_and_resumed_equals_one_never_stopped():
    data, cfg = _gpt_data(), CFG.model_copy(update={"epochs": 6})
    whole, whole_losses, whole_model = _run(_gpt(), data, True, cfg)
    checkpointer, epochs = MemoryCheckpointer(), []

    def stop():
        epochs.append(None)
        return len(epochs) == 3

    with supervised(Supervision(checkpointer=checkpointer, should_stop=stop)), pytest.raises(Interrupted):
        _run(_gpt(), data, True, cfg)
    # A fresh model (a new process would build one): the run resumes after epoch 3.
    with supervised(Supervision(checkpointer=checkpointer, should_stop=lambda: False)):
        resumed, losses, model = _run(_gpt(), data, True, cfg)
    assert LAST["engine"].whole is not None
    assert len(losses) == 3 * 5 and torch.equal(losses, whole_losses[-15:])
    assert resumed == whole
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), whole_model.state_dict().values(), strict=True)
    )


@pytest.mark.slow
def test_a_transplanted_masked_model_takes_the_whole_step_and_follows_eager():
    """Subtask Induction's model (a `MaskedModel` whose masked weights are `where(mask, source, own)`)
    through the compiled whole step: no fallback, losses within 1e-5 of the eager engine's."""
    from methods.masking import MaskedModel, Transplant

    def build():
        source, fresh = _gpt(1), _gpt(2)
        generator, weights = torch.Generator().manual_seed(0), dict(source.named_parameters())
        fns = {
            n: Transplant(weights[n].detach(), torch.rand(p.shape, generator=generator) < 0.3, False)
            for n, p in fresh.named_parameters()
            if p.ndim == 2 and "emb" not in n
        }
        return MaskedModel(fresh, fns)

    data = _gpt_data()
    _, eager_losses, _ = _run(build(), data, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed whole step would warn
        engine = Recording(True)
        model = build()
        fit_many([cross_entropy(model, data)], [data], CFG, [torch.Generator().manual_seed(0)], engine)
    assert engine.whole is not None and not any(training._WHOLE_BROKEN.values())
    _close(torch.cat(engine.losses), eager_losses)
