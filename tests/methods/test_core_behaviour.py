"""The core does what it claims: discovery finds the subtask, the training loop keeps its promises.

These tests use a toy lookup task whose structure is known in advance, so that they can tell a
working core from a broken one (e.g. `discover` replaced by the top-k of random scores, which keeps
a mask of the right density but no better than chance at the subtask; see
`test_discovery_keeps_the_subtask_and_prefers_its_weights`).

The toy task: a token t in [0, V) is shown as a noisy one-hot vector; its label is a fixed random
table L[t]. The base task is every token; the subtask is the first SUB tokens only. A small MLP
learns the base task (and with it the subtask); its first layer has one column per token, so the
weights the subtask needs are known: the columns of the subtask's tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from methods.discovery import DiscoveryConfig, discover, hard_accuracy
from methods.masking import density, sample_like
from methods.training import TrainConfig, evaluate, train
from tasks.base import Split, StageData

V, K, H, SUB = 64, 8, 16, 16  # tokens, classes, hidden width, subtask tokens
NOISE = 0.05


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split(tokens: torch.Tensor, per_token: int, seed: int, table: torch.Tensor) -> Split:
    t = tokens.repeat_interleave(per_token)
    x = F.one_hot(t, V).float() + NOISE * torch.randn(len(t), V, generator=_gen(seed))
    return Split(x, {"y": table[t]})


TABLE = torch.randint(0, K, (V,), generator=_gen(0))


def base_data() -> StageData:
    tokens = torch.arange(V)
    return StageData(_split(tokens, 20, 1, TABLE), _split(tokens, 5, 2, TABLE))


def subtask_data() -> StageData:
    tokens = torch.arange(SUB)
    return StageData(_split(tokens, 30, 3, TABLE), _split(tokens, 10, 4, TABLE))


class MLP(nn.Module):
    """Masked by default: body.0.weight (V columns, one per token) and body.2.weight; the head is not."""

    def __init__(self, width: int = H, classes: int = K):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(V, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


def fresh_mlp(seed: int = 0, **kwargs) -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(**kwargs)


_SOURCE: dict[str, MLP] = {}


def trained_source() -> MLP:
    """The toy source model, trained on the base task to (near) perfect validation accuracy."""
    if "mlp" not in _SOURCE:
        model = fresh_mlp()
        result = train(model, base_data(), TrainConfig(lr=3e-3, epochs=40, batch_size=50, target_val_acc=0.99), _gen(0))
        _SOURCE["mlp"] = model
        _SOURCE["val_acc"] = result.best_val_acc
    return copy.deepcopy(_SOURCE["mlp"])


def _ones(mask) -> int:
    return sum(int(m.sum()) for m in mask.values())


def _numel(mask) -> int:
    return sum(m.numel() for m in mask.values())


def _assert_exact_density(mask, sparsity):
    assert abs(_ones(mask) - (1 - sparsity) * _numel(mask)) <= 1, "the requested sparsity, to within one weight"
    assert abs(density(mask) - (1 - sparsity)) <= 1 / _numel(mask)
    assert all(m.dtype == torch.bool for m in mask.values())


# --- discovery ---------------------------------------------------------------------------


def test_source_learns_the_base_task():
    trained_source()
    assert _SOURCE["val_acc"] >= 0.95


def test_discovery_keeps_the_subtask_and_prefers_its_weights():
    """Continuous sparsification at sparsity 0.5 keeps the subtask far better than a random mask of
    the same density, and keeps the weights the subtask reads (the subtask tokens' input columns).

    Checked by hand: with `discover` replaced by the top-k of random scores (e.g.
    `topk_mask({n: torch.rand(p.shape) ...}, sparsity)`), the subtask accuracy is that of a random
    mask (about 0.45 here, against 1.0) and the subtask columns keep half their weights like the
    others, so both the accuracy gap and the column preference below fail. Magnitude pruning keeps
    the accuracy but not the column preference: it does not look at the subtask.
    """
    source = trained_source()
    data = subtask_data()
    cfg = DiscoveryConfig(epochs=20, batch_size=50, lr=1e-2)
    found = discover(copy.deepcopy(source), data, cfg, 0.5, _gen(1))

    _assert_exact_density(found.mask, 0.5)
    assert math.isclose(found.density, density(found.mask))
    assert set(found.mask) == {"body.0.weight", "body.2.weight"}, "weight matrices only, not the head"
    for name, param in source.named_parameters():
        if name in found.mask:
            assert found.mask[name].shape == param.shape

    # The reported accuracy is the returned mask's, on the subtask's validation split.
    assert found.subtask_acc == pytest.approx(hard_accuracy(source, found.mask, data), abs=1e-6)
    # The kept epoch is the first best one, and its accuracy is the best in the history.
    assert len(found.history) == cfg.epochs
    assert found.subtask_acc == max(found.history)
    assert found.best_epoch == found.history.index(max(found.history)) + 1

    counts = torch.bincount(data.val.y, minlength=K).float()
    majority = float(counts.max() / counts.sum())
    random_masks = [hard_accuracy(source, sample_like(found.mask, _gen(100 + i)), data) for i in range(5)]
    random_acc = sum(random_masks) / len(random_masks)
    assert found.subtask_acc >= 0.9
    assert found.subtask_acc > majority + 0.3, "well above chance"
    assert found.subtask_acc >= random_acc + 0.2, (found.subtask_acc, random_masks)

    # It keeps the weights that read the subtask's tokens more than those reading other tokens.
    first = found.mask["body.0.weight"].float()  # (H, V): column t reads token t
    kept_subtask, kept_other = first[:, :SUB].mean().item(), first[:, SUB:].mean().item()
    assert kept_subtask >= kept_other + 0.3, (kept_subtask, kept_other)

    # The source model itself is not changed by discovery.
    for (name, a), b in zip(source.state_dict().items(), trained_source().state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_magnitude_discovery_hits_the_exact_density(sparsity):
    source = trained_source()
    data = subtask_data()
    found = discover(copy.deepcopy(source), data, DiscoveryConfig(method="magnitude"), sparsity, _gen(1))
    _assert_exact_density(found.mask, sparsity)
    assert found.subtask_acc == pytest.approx(hard_accuracy(source, found.mask, data), abs=1e-6)
    # magnitude: the kept weights are the largest in absolute value
    params = dict(source.named_parameters())
    kept = torch.cat([params[n].detach().abs()[m] for n, m in found.mask.items()])
    dropped = torch.cat([params[n].detach().abs()[~m] for n, m in found.mask.items()])
    assert kept.min() >= dropped.max()


@pytest.mark.parametrize("sparsity", [0.25, 0.9])
def test_continuous_sparsification_hits_the_exact_density(sparsity):
    cfg = DiscoveryConfig(epochs=3, batch_size=50, lr=1e-2)
    found = discover(trained_source(), subtask_data(), cfg, sparsity, _gen(2))
    _assert_exact_density(found.mask, sparsity)


# --- the shared loop equals the old discovery code ---------------------------------------


def _compare_with_reference(source, data, cfg, sparsity, seed):
    from tests.reference import discovery_before

    new = discover(copy.deepcopy(source), data, cfg, sparsity, _gen(seed))
    old = discovery_before.discover(copy.deepcopy(source), data, cfg, sparsity, _gen(seed))
    assert len(set(old.history)) > 1, "the test needs a non-trivial discovery (its history varies)"
    assert 0 < old.density < 1
    assert new.history == old.history
    assert new.best_epoch == old.best_epoch
    assert new.subtask_acc == old.subtask_acc
    assert new.density == old.density and new.natural_density == old.natural_density
    assert sorted(new.mask) == sorted(old.mask)
    for name in old.mask:
        assert torch.equal(new.mask[name], old.mask[name]), name
    return new


def test_continuous_sparsification_equals_the_old_code_on_an_mlp():
    cfg = DiscoveryConfig(epochs=12, batch_size=50, lr=3e-3, l0_lambda=1e-4)
    found = _compare_with_reference(trained_source(), subtask_data(), cfg, 0.5, seed=3)
    assert found.best_epoch > 1


def test_continuous_sparsification_equals_the_old_code_on_the_tiny_gpt(tiny):
    sweep = tiny()
    task = sweep.build_task()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        source = task.build_model(sweep.model)
    train(source, task.base_data(0), TrainConfig(lr=1e-2, epochs=30), _gen(0))  # val acc about 0.5
    cfg = DiscoveryConfig(epochs=8, batch_size=50, lr=1e-2)
    found = _compare_with_reference(source, task.subtask_data(0), cfg, 0.5, seed=5)
    assert {"blocks.0.attn.proj.weight"} <= set(found.mask), "attention projections are masked too"


# --- the training loop -------------------------------------------------------------------
#
# A toy with a known shape of validation curve: tokens of group A are frequent in training and
# labelled alike in validation; tokens of group B are rare in training and labelled the *other* way
# in validation. The model learns A first (validation accuracy rises), then B (it falls): the best
# epoch lies strictly inside the run.


def _peaked_data() -> StageData:
    table = torch.randint(0, 2, (V,), generator=_gen(7))
    a, b = torch.arange(0, V // 2), torch.arange(V // 2, V)
    train_split = _split(torch.cat([a.repeat_interleave(8), b]), 1, 8, table)
    val_a, val_b = _split(a, 2, 9, table), _split(b, 2, 10, 1 - table)
    val = Split(torch.cat([val_a.x, val_b.x]), {"y": torch.cat([val_a.y, val_b.y])})
    return StageData(train_split, val)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal_states(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_restores_the_best_epoch():
    data = _peaked_data()
    model = fresh_mlp(classes=2)
    states = {}
    result = train(
        model,
        data,
        TrainConfig(lr=3e-3, epochs=30, batch_size=32),
        _gen(11),
        on_epoch=lambda epoch, score: states.__setitem__(epoch, _state(model)),
    )
    assert result.epochs_run == 30 and len(result.history) == 30 and sorted(states) == list(range(1, 31))
    assert 1 < result.best_epoch < result.epochs_run, "the toy must peak inside the run"
    assert result.history[-1] < max(result.history), "the toy must end below its peak"
    assert result.best_epoch == result.history.index(max(result.history)) + 1, "the first best epoch"
    assert result.best_val_acc == max(result.history)
    assert _equal_states(_state(model), states[result.best_epoch]), "the best epoch's weights are restored"
    assert not _equal_states(_state(model), states[result.epochs_run])
    assert evaluate(model, data.val)["y"] == result.best_val_acc
    assert result.steps == 30 * math.ceil(len(data.train) / 32)


def test_training_stops_at_the_target_accuracy():
    data = base_data()
    full = train(fresh_mlp(), data, TrainConfig(lr=3e-3, epochs=15, batch_size=50), _gen(12))
    target = 0.9
    reached = [i + 1 for i, score in enumerate(full.history) if score >= target]
    assert reached and reached[0] < 15, "the toy must reach the target before the last epoch"
    stopped = train(fresh_mlp(), data, TrainConfig(lr=3e-3, epochs=15, batch_size=50, target_val_acc=target), _gen(12))
    assert stopped.epochs_run == reached[0]
    assert stopped.history == full.history[: reached[0]], "stopping early does not change the epochs run"


def _patience_stop(history: list[float], patience: int, initial: float) -> int:
    best, stale = initial, 0  # the initial model (epoch 0) is the first candidate
    for epoch, score in enumerate(history, 1):
        if score > best:
            best, stale = score, 0
        else:
            stale += 1
        if stale >= patience:
            return epoch
    return len(history)


def test_training_stops_after_patience_epochs_without_gain():
    data = base_data()
    # An lr too small to change any prediction: no epoch gains on the initial model (epoch 0).
    flat = train(fresh_mlp(), data, TrainConfig(lr=1e-12, weight_decay=0.0, epochs=20, patience=3), _gen(13))
    assert len(set(flat.history)) == 1 and flat.initial_score == flat.history[0]
    assert flat.epochs_run == 3 and flat.best_epoch == 0

    # A curve that rises then plateaus: the stop is `patience` epochs after the last gain.
    data = _peaked_data()
    full = train(fresh_mlp(classes=2), data, TrainConfig(lr=3e-3, epochs=30, batch_size=32), _gen(11))
    expected = _patience_stop(full.history, 4, full.initial_score)
    assert expected < 30, "the toy must trigger patience"
    stopped = train(fresh_mlp(classes=2), data, TrainConfig(lr=3e-3, epochs=30, batch_size=32, patience=4), _gen(11))
    assert stopped.epochs_run == expected
    assert stopped.history == full.history[:expected]
    assert stopped.best_epoch == full.history.index(max(full.history[:expected])) + 1


def test_mixed_precision_is_bit_identical_on_cpu():
    data = base_data()
    cfg = TrainConfig(lr=3e-3, epochs=3, batch_size=50)
    runs = []
    for mixed in (False, True):
        model = fresh_mlp()
        result = train(model, data, cfg, _gen(14), mixed_precision=mixed)
        runs.append((_state(model), result))
    (a, ra), (b, rb) = runs
    assert _equal_states(a, b)
    assert ra.history == rb.history and ra.best_epoch == rb.best_epoch and ra.steps == rb.steps
    assert ra.measurements == rb.measurements


def _stored_tensors(root) -> dict[str, dict[str, torch.Tensor]]:
    """{kind folder: tensors} of the store's artifacts (one per kind here)."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(root.rglob("*.safetensors")):
        kind = str(path.parent.relative_to(root))
        assert kind not in out, "one artifact per kind expected"
        out[kind] = load_file(str(path))
    return out


# Timings, and the columns that identify the trial's settings (which name mixed precision, or may).
VOLATILE_SUFFIXES = ("_s", "started_at", "finished_at", "worker", "config_json", "config_hash", "trial_hash", "series")


def test_mixed_precision_trial_row_equals_full_precision_on_cpu(tiny, tmp_path):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import expand, run_trial

    rows = []
    for mixed in (False, True):
        sweep = tiny(resources={"mixed_precision": mixed})
        spec = next(s for s in expand(sweep) if s.method == "subtask_induction")
        rows.append(run_trial(sweep, spec, ArtifactStore(tmp_path / str(mixed))))  # each computes its own
    full, mixed = rows
    # The stored source model and mask are bit-identical too (the row's accuracies alone are coarse).
    stored = [_stored_tensors(tmp_path / str(mixed)) for mixed in (False, True)]
    assert stored[0].keys() == stored[1].keys() and len(stored[0]) >= 2
    for kind in stored[0]:
        assert _equal_states(stored[0][kind], stored[1][kind]), kind
    assert full["status"] == mixed["status"] == "done"
    assert full.keys() == mixed.keys()
    compared = [k for k in full if not k.endswith(VOLATILE_SUFFIXES)]
    assert {"val_acc", "test_acc"} <= set(compared)
    assert len(compared) > 10
    for key in compared:
        a, b = full[key], mixed[key]
        if isinstance(a, float) and math.isnan(a):
            assert isinstance(b, float) and math.isnan(b), key
        else:
            assert a == b, (key, a, b)


def test_several_optimiser_steps_per_batch_see_the_same_batch():
    from methods.training import cross_entropy, fit

    data = _peaked_data()
    model = fresh_mlp(classes=2)
    base = cross_entropy(model, data)
    seen: list[tuple[int, torch.Tensor]] = []

    def loss(batch, step):
        seen.append((step, batch["train"].x))
        value, _ = base.loss(batch, step)
        return value, {"ce": value} if step % 2 else {}  # a measurement from every second step only

    objective = dataclasses.replace(base, loss=loss, steps_per_batch=2)
    result = fit(objective, data, TrainConfig(lr=1e-3, epochs=2, batch_size=32), _gen(3))
    n_batches = math.ceil(len(data.train) / 32)
    assert result.steps == 2 * 2 * n_batches and [s for s, _ in seen] == list(range(result.steps))
    for (_, first), (_, second) in zip(seen[0::2], seen[1::2], strict=True):
        assert torch.equal(first, second)  # both steps of an iteration on one batch
    assert not torch.equal(seen[0][1], seen[2][1])
    assert set(result.measurements[0]) == {"ce"}  # averaged over the steps that report it
    with pytest.raises(ValueError, match="steps_per_batch"):
        dataclasses.replace(base, steps_per_batch=0)
