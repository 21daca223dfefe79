"""The paper-faithful settings (issue 11, docs/PAPER-SETTINGS.md): each does what it says, the
defaults leave a trial's row as it was, and configs/arithmetic-paper.yaml, which uses them all, runs."""

import dataclasses
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from common.seeding import seeded_init
from methods.discovery import DiscoveryConfig, discover
from methods.masking import MaskedModel, MaskSelection, ScoreMask, maskable_names, parameter_roles, topk_mask
from methods.training import (
    Interrupted,
    Supervision,
    TrainConfig,
    cross_entropy,
    evaluate,
    fit,
    mean_loss,
    supervised,
    training_loss,
)
from methods.transfer import TransferConfig
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import ConfigError, load_sweep, load_sweep_file
from orchestrator.trial import TrialSpec, fresh_model, run_trial
from tasks.base import Split, StageData
from tasks.models.gpt import GPT, GPTConfig, TiedHead
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[2]
VOLATILE = ("_s", "started_at", "finished_at", "_computed", "device", "worker")


def _gpt(head="classes", init="torch", sequence_loss=False, d_model=16, n_layers=1, vocab=31, seed=0):
    cfg = GPTConfig(n_layers=n_layers, d_model=d_model, n_heads=2, dropout=0.0, head=head, init=init)
    with seeded_init(seed, "test"):
        return GPT(cfg, vocab_size=vocab, n_positions=4, n_classes=7, sequence_loss=sequence_loss)


def _tokens(n=8, vocab=31, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, vocab - 1, (n, 2), generator=gen)
    ab[0, 1] = ab[0, 0]  # one ambiguous sample a == b
    x = torch.cat([ab, torch.full((n, 1), vocab - 1)], dim=1)  # [a, b, =]
    return x, torch.randint(0, 7, (n,), generator=gen)


# --- model.head: tied_lm --------------------------------------------------------------------------


def test_the_tied_head_is_the_token_embedding_and_its_logits_cover_the_vocabulary():
    model = _gpt(head="tied_lm").eval()
    x, _ = _tokens()
    logits, features = model(x, intermediates=True)
    assert isinstance(model.head, TiedHead) and logits.shape == (len(x), 31), "logits over the whole vocabulary"
    assert not list(model.head.parameters()), "the head holds no weight of its own"
    assert not [k for k in model.state_dict() if k.startswith("head")], "the tied matrix has one name"
    assert model.head._tied[0].weight is model.tok_emb.weight, "the same storage, not a copy"
    assert torch.allclose(logits, features["final"] @ model.tok_emb.weight.T, atol=1e-6)
    with torch.no_grad():  # a change to the embedding is a change to the head
        model.tok_emb.weight[5] += 10.0 * features["final"][0]
    assert int(model(x[:1]).argmax()) == 5


def test_a_tied_head_is_scored_by_argmax_over_the_vocabulary_against_the_label_as_token(tiny):
    sweep = tiny(model={"head": "tied_lm"})
    task = sweep.build_task()
    model = fresh_model(sweep, task, 0, "init").eval()
    val = task.downstream_data(0, 0.5).val
    with torch.no_grad():
        pred = model(val.x).argmax(-1)
    assert evaluate(model, val)["y"] == pytest.approx(float((pred == val.y).float().mean()))
    # Only token y is right: an answer the head puts on any other token (here `=`) is wrong.
    with torch.no_grad():
        model.tok_emb.weight[task.config.operand_range] += 100.0 * model(val.x, intermediates=True)[1]["final"].mean(0)
    assert (model(val.x).argmax(-1) == task.config.operand_range).all()
    assert evaluate(model, val)["y"] == 0.0


def test_a_tied_head_is_masked_only_as_the_token_embedding():
    tied, classes = _gpt(head="tied_lm"), _gpt(head="classes")
    roles = parameter_roles(tied)
    assert roles["tok_emb.weight"] == "embedding" and "head" not in roles.values()
    paper = maskable_names(tied, MaskSelection())
    assert paper == maskable_names(classes, MaskSelection()), "the paper's selection: the same weights either way"
    assert "tok_emb.weight" not in paper
    assert maskable_names(tied, MaskSelection(head=True)) == paper, "the head has no weight of its own"
    with_embeddings = maskable_names(tied, MaskSelection(embeddings=True))
    assert "tok_emb.weight" in with_embeddings
    # Masking the tied matrix masks both of its uses: all-zero there, every logit is 0.
    fns = {n: ScoreMask(dict(tied.named_parameters())[n].shape, 0.0) for n in with_embeddings}
    for fn in fns.values():
        fn.hard = torch.ones_like(fn.scores, dtype=torch.bool)
    fns["tok_emb.weight"].hard = torch.zeros_like(fns["tok_emb.weight"].scores, dtype=torch.bool)
    masked = MaskedModel(tied, fns).eval()
    x, _ = _tokens()
    assert torch.equal(masked(x), torch.zeros(len(x), 31))


def test_invalid_combinations_are_config_errors_naming_the_fields():
    with pytest.raises(ConfigError, match=r"task\.loss: all_positions.*model\.head: tied_lm"):
        load_sweep(tiny_raw(task={"loss": "all_positions"}))
    with pytest.raises(ConfigError, match=r"task\.loss: all_positions.*model\.head: tied_lm"):
        load_sweep({**tiny_raw(task={"loss": "all_positions"}), "model": {"name": "mlp", "n_layers": 1, "width": 16}})
    with pytest.raises(ConfigError, match=r"task\.modulus \(40\) exceeds task\.operand_range \(30\)"):
        load_sweep(tiny_raw(task={"modulus": 40}, model={"head": "tied_lm"}))
    with pytest.raises(ConfigError, match=r"model\.head"):
        load_sweep(tiny_raw(model={"head": "lm"}))


# --- task.loss: all_positions ---------------------------------------------------------------------


def test_the_all_positions_loss_is_the_mean_next_token_cross_entropy_by_hand():
    model = _gpt(head="tied_lm", sequence_loss=True).eval()
    x, y = _tokens(n=5)
    with torch.no_grad():
        loss, measured = model(x, targets=y)
        _, features = model(x, intermediates=True)
        hidden = model.ln_f(features["block0"])  # (B, 3, C): every position
        sequence = torch.cat([x, y[:, None]], dim=1)  # [a, b, =, y]
        terms = []
        for i in range(len(x)):
            for t in range(3):
                logits = hidden[i, t] @ model.tok_emb.weight.T
                terms.append(torch.logsumexp(logits, 0) - logits[sequence[i, t + 1]])
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    answer = torch.stack(terms[2::3]).mean()
    assert float(measured["ce"]) == pytest.approx(float(answer), rel=1e-5)
    assert sequence[0, 1] == sequence[0, 0], "the ambiguous sample's first term teaches b = a"
    # The default objective trains on it, and its validation loss is the same loss.
    data = StageData(Split(x, {"y": y}), Split(x, {"y": y}))
    objective = cross_entropy(model, data)
    assert torch.equal(objective.loss({"train": data.train}, 0)[0].detach(), loss)
    assert objective.val_loss() == pytest.approx(float(loss), rel=1e-6)
    assert training_loss(_gpt(), data.val) == mean_loss(_gpt(), data.val), "without an own loss: cross-entropy"


def test_continuous_sparsification_trains_the_masks_on_the_models_own_loss(tiny):
    sweep = tiny(task={"loss": "all_positions"}, model={"head": "tied_lm"})
    task = sweep.build_task()
    model = fresh_model(sweep, task, 0, "source_init")
    calls = []
    original = GPT._sequence_loss

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    GPT._sequence_loss = spy
    try:
        discover(model, task.subtask_data(0), DiscoveryConfig(epochs=1, batch_size=100), 0.5, torch.Generator())
    finally:
        GPT._sequence_loss = original
    assert len(calls) == 2, "one own-loss call per batch (200 subtask samples, batch 100)"


# --- model.init: gpt2 -----------------------------------------------------------------------------


def _check_gpt2_init(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            w = module.weight.detach()
            n = w.numel()
            # The sample std of n draws from N(0, s) has a standard error of about s / sqrt(2n).
            assert abs(float(w.std()) - 0.02) < 5 * 0.02 / math.sqrt(2 * n) + 1e-4, name
            assert abs(float(w.mean())) < 5 * 0.02 / math.sqrt(n), name
            if getattr(module, "bias", None) is not None:
                assert not module.bias.any(), f"{name}.bias is zero"
        elif isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and not module.bias.any(), name


def test_gpt2_init_draws_n_0_002_weights_and_zero_biases():
    model = _gpt(init="gpt2", d_model=64, n_layers=2, vocab=1001)
    _check_gpt2_init(model)
    assert torch.equal(model.tok_emb.weight, _gpt(init="gpt2", d_model=64, n_layers=2, vocab=1001).tok_emb.weight)
    torch_init = _gpt(init="torch", d_model=64, n_layers=2, vocab=1001)
    assert float(torch_init.tok_emb.weight.detach().std()) > 0.9, "the default init is PyTorch's (embeddings N(0, 1))"


def test_the_fresh_weights_at_transfer_get_the_gpt2_init(tiny):
    from methods import MethodContext, get_method

    sweep = tiny(model={"head": "tied_lm", "init": "gpt2", "d_model": 32})
    task = sweep.build_task()
    source = fresh_model(sweep, task, 0, "source_init")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # nothing of the source looks like a fresh init
    names = maskable_names(source, MaskSelection())
    mask = topk_mask({n: torch.rand(dict(source.named_parameters())[n].shape) for n in names}, 0.9)
    ctx = MethodContext(
        task=task,
        data=task.downstream_data(0, 0.5),
        config=None,
        training=sweep.training,
        settings=SimpleNamespace(block={"transfer": TransferConfig(unmasked="reinit")}.__getitem__),
        artifacts={"source": source, "mask": mask},
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        fresh_model=lambda stage: fresh_model(sweep, task, 0, stage),
    )
    model = get_method("subtask_induction").build(ctx)
    _check_gpt2_init(model.base)  # the trainable (fresh) weights under the mask's zeros, and the rest
    for name, weight in model.effective_weights().items():
        fresh = weight.detach()[~mask[name]]
        assert abs(float(fresh.std()) - 0.02) < 5 * 0.02 / math.sqrt(2 * fresh.numel()) + 1e-4, name


# --- the loop: lr_schedule, select, ties ------------------------------------------------------------


def _regression(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    return StageData(Split(x, {"y": (x[:, 0] > 0).long()}), Split(x[:10], {"y": (x[:10, 0] > 0).long()}))


def _scripted(scores, losses=None):
    """An objective on a small linear model whose epoch scores (and validation losses) are scripted;
    `states[e]` is the model's state at the end of epoch e (1-based)."""
    with seeded_init(0, "scripted"):
        model = nn.Linear(5, 2)
    data = _regression()
    base = cross_entropy(model, data)
    epoch = {"n": 0}
    states = {}

    def score():
        epoch["n"] += 1
        states[epoch["n"]] = {k: v.clone() for k, v in model.state_dict().items()}
        return scores[epoch["n"] - 1]

    val_loss = (lambda: losses[epoch["n"] - 1]) if losses is not None else None
    # Scripted from epoch 1: the initial model is not scored (tests/methods/test_training.py covers epoch 0).
    objective = dataclasses.replace(base, score=score, val_loss=val_loss, initial_candidate=False)
    return objective, data, model, states


def test_select_val_loss_keeps_the_lowest_loss_epoch_and_patience_counts_loss_epochs():
    scores = [0.5, 0.9, 0.6, 0.7, 1.0, 1.0, 1.0, 1.0]
    losses = [1.0, 0.8, 0.5, 0.6, 0.55, 0.7, 0.4, 0.3]
    objective, data, model, states = _scripted(scores, losses)
    cfg = TrainConfig(epochs=8, batch_size=10, select="val_loss", patience=3)
    result = fit(objective, data, cfg, torch.Generator().manual_seed(0))
    assert result.best_epoch == 3 and result.best_val_acc == 0.6, "the lowest loss, not the best accuracy"
    assert result.epochs_run == 6, "three epochs without a lower loss (0.6, 0.55, 0.7) end it"
    assert [m["val_loss"] for m in result.measurements] == losses[:6]
    assert all(torch.equal(v, states[3][k]) for k, v in model.state_dict().items()), "epoch 3 is restored"

    objective, data, model, _ = _scripted(scores, losses)
    by_acc = fit(objective, data, cfg.model_copy(update={"select": "val_acc"}), torch.Generator().manual_seed(0))
    assert by_acc.best_epoch == 5 and by_acc.epochs_run == 8 and "val_loss" not in by_acc.measurements[0]


def test_select_val_loss_needs_an_objective_with_a_validation_loss():
    objective, data, _, _ = _scripted([0.5])
    with pytest.raises(ValueError, match="select: val_loss.*use select: val_acc"):
        fit(objective, data, TrainConfig(epochs=1, select="val_loss"), torch.Generator())


@pytest.mark.parametrize(("ties", "kept"), [("first", 2), ("last", 4)])
def test_ties_keep_the_first_or_the_last_of_equal_scores(ties, kept):
    objective, data, _, _ = _scripted([0.5, 0.7, 0.6, 0.7, 0.7 - 1e-9])
    result = fit(objective, data, TrainConfig(epochs=5, batch_size=10, ties=ties), torch.Generator().manual_seed(0))
    assert result.best_epoch == kept and result.best_val_acc == 0.7


class _RecordingAdamW(torch.optim.AdamW):
    made: list = []

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.lrs = []
        _RecordingAdamW.made.append(self)

    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


@pytest.fixture
def recording_adamw(monkeypatch):
    _RecordingAdamW.made = []
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    return _RecordingAdamW.made


def test_the_linear_schedule_decays_to_zero_over_the_maximum_steps(recording_adamw):
    objective, data, _, _ = _scripted([0.5] * 3)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.1, lr_schedule="linear")  # 40 rows: 3 steps an epoch
    result = fit(objective, data, cfg, torch.Generator().manual_seed(0))
    (opt,) = recording_adamw
    total = 9
    assert opt.lrs == pytest.approx([0.1 * (1 - t / total) for t in range(total)]), "step t runs at lr (1 - t / T)"
    assert opt.param_groups[0]["lr"] == 0.0, "and the schedule reaches 0 after the last step"
    assert [m["lr"] for m in result.measurements] == pytest.approx([0.1 * 2 / 3, 0.1 / 3, 0.0])
    # Early stopping does not shorten the schedule: it runs over the maximum epochs' steps.
    objective, data, _, _ = _scripted([0.5] * 3)
    fit(objective, data, cfg.model_copy(update={"patience": 1}), torch.Generator().manual_seed(0))
    assert recording_adamw[1].lrs == pytest.approx([0.1 * (1 - t / total) for t in range(6)])


def test_the_constant_default_never_touches_the_learning_rate(recording_adamw):
    objective, data, _, _ = _scripted([0.5] * 2)
    result = fit(objective, data, TrainConfig(epochs=2, batch_size=16, lr=0.1), torch.Generator().manual_seed(0))
    assert recording_adamw[0].lrs == [0.1] * 6 and "lr" not in result.measurements[0]


class _Memory:
    def __init__(self):
        self.slots = {}

    def due(self):
        return True

    def save(self, slot, state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.slots[slot] = buffer.getvalue()

    def load(self, slot):
        blob = self.slots.get(slot)
        return None if blob is None else torch.load(io.BytesIO(blob), weights_only=True)


def _noisy(n: int, gen: torch.Generator) -> Split:
    x = torch.randn(n, 5, generator=gen)
    return Split(x, {"y": (x[:, 0] + 0.8 * torch.randn(n, generator=gen) > 0).long()})


def _paper_loop_run(checkpointer=None, stop_after=None):
    gen = torch.Generator().manual_seed(0)
    data = StageData(_noisy(60, gen), _noisy(30, gen))  # noisy labels: the validation loss turns up
    with seeded_init(0, "resume"):
        model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 2))
    cfg = TrainConfig(
        epochs=8, batch_size=16, lr=0.05, weight_decay=0.0, lr_schedule="linear", select="val_loss", ties="last",
        patience=4,
    )  # fmt: skip
    epochs = []
    stop = (lambda: len(epochs) == stop_after) if stop_after else None
    supervision = Supervision(checkpointer=checkpointer, should_stop=stop, on_epoch=lambda *a: epochs.append(a[1]))
    with supervised(supervision):
        result = fit(cross_entropy(model, data), data, cfg, torch.Generator().manual_seed(1))
    return result, model


def test_the_schedule_and_loss_selection_resume_bit_for_bit_from_a_checkpoint():
    reference, ref_model = _paper_loop_run()
    assert reference.measurements[-1]["lr"] < reference.measurements[0]["lr"]
    assert reference.best_epoch < reference.epochs_run < 8, "the lowest loss is restored and patience ends the run"
    for stop_after in range(1, reference.epochs_run):
        memory = _Memory()
        with pytest.raises(Interrupted):
            _paper_loop_run(memory, stop_after)
        state = torch.load(io.BytesIO(memory.slots[0]), weights_only=True)
        assert state["engine"]["optimizer"]["param_groups"][0]["lr"] < 0.05 and "best_key" in state["live"][0]
        result, model = _paper_loop_run(memory)
        assert result == reference
        assert all(torch.equal(v, ref_model.state_dict()[k]) for k, v in model.state_dict().items())


# --- discovery: weight decay and ties ---------------------------------------------------------------


def test_discovery_weight_decay_and_ties_reach_the_loop(tiny, recording_adamw):
    assert DiscoveryConfig().loop().weight_decay == 0.0 and DiscoveryConfig().loop().ties == "first"
    cfg = DiscoveryConfig(epochs=1, batch_size=100, weight_decay=0.01, ties="last")
    assert cfg.loop().ties == "last"
    sweep = tiny()
    task = sweep.build_task()
    model = fresh_model(sweep, task, 0, "source_init")
    discover(model, task.subtask_data(0), cfg, 0.5, torch.Generator())
    (opt,) = recording_adamw
    assert opt.param_groups[0]["weight_decay"] == 0.01
    assert all(p.shape == dict(model.named_parameters())[n].shape for n, p in zip(
        maskable_names(model, cfg.selection), opt.param_groups[0]["params"], strict=True))  # fmt: skip


# --- defaults and the paper's config ----------------------------------------------------------------


def _stable(row):
    return json.dumps({k: v for k, v in row.items() if not k.endswith(VOLATILE)}, sort_keys=True, default=str)


def test_explicit_defaults_leave_a_trial_row_unchanged(tmp_path):
    defaults = {
        "task": {"loss": "answer"},
        "model": {"head": "classes", "init": "torch"},
        "source": {"lr_schedule": "constant", "select": "val_acc", "ties": "first"},
        "training": {"lr_schedule": "constant", "select": "val_acc", "ties": "first"},
        "discovery": {"weight_decay": 0.0, "ties": "first"},
    }
    spec = TrialSpec(method="subtask_induction", axes={"mask.sparsity": 0.5}, data_fraction=0.5, seed=0)
    implicit = run_trial(load_sweep(tiny_raw()), spec, ArtifactStore(tmp_path / "a"))
    explicit = run_trial(load_sweep(tiny_raw(**defaults)), spec, ArtifactStore(tmp_path / "b"))
    assert _stable(implicit) == _stable(explicit)
    assert all(set(m) == {"ce"} for m in json.loads(implicit["measurements_json"])), "no new measurement"
    config = json.loads(implicit["config_json"])
    assert config["model"]["head"] == "classes" and config["source"]["select"] == "val_acc", "recorded in the row"


def test_the_paper_config_loads_and_a_shrunk_version_runs_a_trial(tmp_path):
    sweep = load_sweep_file(ROOT / "configs" / "arithmetic-paper.yaml")
    assert (sweep.task.loss, sweep.model.head, sweep.model.init) == ("all_positions", "tied_lm", "gpt2")
    source, discovery = sweep.block("source"), sweep.block("discovery")
    assert (source.lr_schedule, source.select, source.patience) == ("linear", "val_loss", 10)
    assert source.weight_decay == 0.0 and source.target_val_acc is None
    assert (discovery.weight_decay, discovery.ties) == (0.01, "last")

    raw = yaml.safe_load((ROOT / "configs" / "arithmetic-paper.yaml").read_text())
    small = tiny_raw()
    raw["task"].update({k: v for k, v in small["task"].items() if k != "name"})
    raw["model"].update(n_layers=1, d_model=16, n_heads=2)
    for block in ("source", "discovery", "training"):
        raw[block]["epochs"] = 1
    raw["discovery"]["batch_size"] = 100
    raw.update(methods=["subtask_induction"], sparsities=[0.9], data_fractions=[0.5], seeds=[0])
    raw["resources"] = {"cpu": 1}
    spec = TrialSpec(method="subtask_induction", axes={"mask.sparsity": 0.9}, data_fraction=0.5, seed=0)
    row = run_trial(load_sweep(raw), spec, ArtifactStore(tmp_path))
    assert row["status"] == "done" and 0.0 <= row["test_acc"] <= 1.0
    (measured,) = json.loads(row["measurements_json"])
    assert set(measured) == {"lm", "ce"}, "trained on the next-token loss at every position"
    config = json.loads(row["config_json"])
    assert config["model"]["head"] == "tied_lm" and config["task"]["loss"] == "all_positions"
    assert config["discovery"]["ties"] == "last" and config["source"]["lr_schedule"] == "linear"
