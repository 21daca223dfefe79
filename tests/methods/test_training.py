"""The one loop's rules (methods/training.py): the initial model as a candidate (epoch 0), budgets in
steps, the optimiser and schedule a config asks for, parameter groups."""

import copy
import json
import math

import pytest
import torch
from pydantic import ValidationError

from methods.training import TrainConfig, evaluate, lr_factor, optimizer, train
from tests.methods.test_core_behaviour import base_data, fresh_mlp, trained_source


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_source_trained_on_its_own_task_at_a_destructive_lr_is_kept_as_it_came():
    source, data = trained_source(), base_data()
    before = evaluate(source, data.val)["y"]
    assert before > 0.9, "the toy source must solve its task"
    kept, lost = copy.deepcopy(source), copy.deepcopy(source)
    cfg = TrainConfig(lr=0.5, epochs=4, batch_size=64)
    result = train(kept, data, cfg, _gen())
    assert result.best_epoch == 0 and result.initial_score == result.best_val_acc == before
    assert max(result.history) < before, "the destructive lr must hurt every epoch, or nothing is tested"
    assert all(torch.equal(p, q) for p, q in zip(kept.state_dict().values(), source.state_dict().values(), strict=True))
    # Without the initial model as a candidate (the loop before): the best trained epoch, worse.
    old = train(lost, data, cfg.model_copy(update={"keep_initial": False}), _gen())
    assert old.best_epoch >= 1 and old.initial_score is None and evaluate(lost, data.val)["y"] < before
    # The last epoch goes with the result, for its test accuracy beside the kept epoch's (`test_acc_last`).
    last = copy.deepcopy(source)
    last.load_state_dict(result.last_state)
    assert result.epochs_run == 4 and evaluate(last, data.val)["y"] == pytest.approx(result.history[-1])


def test_a_target_reached_before_training_trains_nothing():
    source, data = copy.deepcopy(trained_source()), base_data()
    result = train(source, data, TrainConfig(lr=0.5, epochs=4, target_val_acc=0.5), _gen())
    assert (result.epochs_run, result.steps, result.best_epoch, result.history) == (0, 0, 0, [])
    assert result.last_state is None  # the last epoch is the kept one


def test_min_steps_trains_small_data_for_at_least_that_many_steps():
    data = base_data()  # 1280 rows: 1 step per epoch at batch 2000
    cfg = TrainConfig(lr=1e-3, epochs=3, batch_size=2000, min_steps=10, keep_initial=False)
    result = train(fresh_mlp(), data, cfg, _gen())
    assert (result.steps, result.epochs_run) == (10, 10)
    assert train(fresh_mlp(), data, cfg.model_copy(update={"min_steps": 0}), _gen()).steps == 3
    # The schedule runs over the longer budget: linear decay reaches 0 at the 10th step, not the 3rd.
    linear = train(fresh_mlp(), data, cfg.model_copy(update={"lr_schedule": "linear"}), _gen())
    assert [row["lr"] for row in linear.measurements][2] == pytest.approx(1e-3 * 0.7)


def test_schedules_warm_up_then_decay_to_zero():
    cfg = TrainConfig(lr=1.0, lr_schedule="cosine", warmup_steps=4)
    f = lr_factor(cfg, 14)
    assert [f(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0, abs=1e-12)
    linear = lr_factor(cfg.model_copy(update={"lr_schedule": "linear", "warmup_steps": 0}), 10)
    assert [linear(t) for t in (0, 5, 10)] == [1.0, 0.5, 0.0]
    constant = cfg.model_copy(update={"lr_schedule": "constant"})
    assert lr_factor(constant, 10)(2) == 0.75 and lr_factor(constant, 10)(7) == 1.0
    assert lr_factor(constant.model_copy(update={"warmup_steps": 0}), 10) is None


def test_groups_set_rates_and_decay_by_name_first_match_wins():
    model = fresh_mlp()
    cfg = TrainConfig(
        optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
        groups=({"match": r"^head\.", "lr_scale": 10.0}, {"match": "bias", "weight_decay": 0.0}),
    )  # fmt: skip
    opt = optimizer(list(model.named_parameters()), cfg)
    assert isinstance(opt, torch.optim.SGD)
    head, biases, rest = opt.param_groups
    named = {id(p): n for n, p in model.named_parameters()}
    assert sorted(named[id(p)] for p in head["params"]) == ["head.bias", "head.weight"]
    assert sorted(named[id(p)] for p in biases["params"]) == ["body.0.bias", "body.2.bias"]
    assert (head["lr"], head["weight_decay"], biases["lr"], biases["weight_decay"]) == (1.0, 0.01, 0.1, 0.0)
    assert (rest["lr"], rest["weight_decay"], rest["momentum"], rest["nesterov"]) == (0.1, 0.01, 0.9, True)
    assert isinstance(optimizer(list(model.named_parameters()), TrainConfig()), torch.optim.AdamW)


def test_sgd_trains_and_its_head_moves_at_its_own_rate():
    data = base_data()
    frozen_body = TrainConfig(
        optimizer="sgd", lr=0.5, momentum=0.9, epochs=2, batch_size=64, keep_initial=False,
        groups=({"match": r"^body\.", "lr_scale": 1e-30},),
    )  # fmt: skip
    model, start = fresh_mlp(), fresh_mlp()
    result = train(model, data, frozen_body, _gen())
    assert result.best_val_acc > 1 / 8
    moved = {n for n, p in model.named_parameters() if not torch.allclose(p, dict(start.named_parameters())[n])}
    assert moved == {"head.weight", "head.bias"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"nesterov": True}, "nesterov needs optimizer: sgd and momentum > 0"),
        ({"groups": [{"match": "("}]}, "is not a regular expression"),
        ({"optimizer": "adam"}, "adamw"),
        ({"lr_schedule": "step"}, "cosine"),
    ],
)
def test_bad_optimiser_settings_are_named(bad, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**bad)


def test_max_epochs_reaches_min_steps():
    cfg = TrainConfig(epochs=15, min_steps=200)
    assert cfg.max_epochs(1) == 200 and cfg.max_epochs(20) == 15 and cfg.max_epochs(7) == math.ceil(200 / 7)


def test_a_method_block_trains_with_sgd_cosine_and_a_head_rate_alone_and_packed(tiny, tmp_path):
    # The sweep file's `full_transfer: {training: ...}` reaches that method's trials only, and its
    # trials give the same rows trained alone and packed.
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import expand, run_pack, run_trial

    own = {
        "optimizer": "sgd", "momentum": 0.9, "nesterov": True, "lr": 0.05, "lr_schedule": "cosine",
        "warmup_steps": 2, "groups": [{"match": r"^head\.", "lr_scale": 10.0}], "keep_initial": False,
    }  # fmt: skip
    sweep = tiny(methods=["full_transfer", "scratch"], seeds=[0, 1], full_transfer={"training": own})
    assert sweep.effective("full_transfer").training.optimizer == "sgd"
    assert sweep.effective("scratch").training.optimizer == "adamw"
    specs = expand(sweep)
    store = ArtifactStore(tmp_path)
    alone = [run_trial(sweep, s, store) for s in specs]
    epochs: dict[str, list] = {}

    def report(spec, metrics):
        if metrics["stage"] == "epoch":
            epochs.setdefault(spec.name, []).append((metrics["epoch"], "train/val_score" in metrics))

    packed = run_pack(sweep, specs, store, limit=4, report=report)
    for a, p in zip(alone, packed, strict=True):
        assert isinstance(p, dict), p
        assert p["packed"] is True and p["pack"] == 2
        # A packed trial's live curve: each epoch, reported to its own trial.
        assert epochs[p["trial"]] == [(e, True) for e in range(1, p["epochs_run"] + 1)]
        for column in ("val_acc", "test_acc", "test_acc_last", "best_epoch", "epochs_run"):
            assert p[column] == pytest.approx(a[column], abs=1e-6), (a["trial"], column)
    # The block is part of those trials' identity, and of theirs only.
    plain = {r["trial"]: r for r in (run_trial(tiny(methods=["full_transfer", "scratch"], seeds=[0, 1]), s, store)
                                      for s in specs)}  # fmt: skip
    for row in alone:
        if row["best_epoch"] == row["epochs_run"]:
            assert row["test_acc_last"] == row["test_acc"]
        same = plain[row["trial"]]["trial_hash"] == row["trial_hash"]
        assert same is (row["method"] == "scratch"), row["trial"]
        trained = json.loads(row["config_json"])["training"]
        assert trained["optimizer"] == ("sgd" if row["method"] == "full_transfer" else "adamw")
        if row["method"] == "full_transfer":  # the cosine schedule, over its run's steps, at the block's lr
            assert [m["lr"] for m in json.loads(row["measurements_json"])] == pytest.approx([0.05, 0.0])
            assert row["best_epoch"] >= 1, "keep_initial: false"


def test_select_on_a_validation_split_keeps_the_epoch_that_split_scores_best():
    """`select: {split, label}`: the kept epoch is the best on that validation split (epoch 0 included),
    not on `val`. Here the split's labels are shifted, so the source that solves `val` scores about 0 on
    it at epoch 0 and a destructive learning rate, which only hurts `val`, is what the split prefers."""
    from methods.training import SelectOn
    from tasks.base import Split, StageData

    source, data = trained_source(), base_data()
    shifted = Split(data.val.x, {"y": (data.val.y + 1) % (int(data.val.y.max()) + 1)})
    data = StageData(data.train, data.val, evals={"shifted_val": shifted, "test": data.val})
    initial = evaluate(source, shifted)["y"]
    cfg = TrainConfig(lr=0.5, epochs=5, batch_size=64, select=SelectOn(split="shifted_val"))
    kept = copy.deepcopy(source)
    result = train(kept, data, cfg, _gen())
    values = [initial] + [row["select_shifted_val_y"] for row in result.measurements]
    assert max(values) > initial, "training must move the split's accuracy, or nothing is tested"
    assert result.best_epoch == values.index(max(values)) >= 1
    assert evaluate(kept, shifted)["y"] == pytest.approx(max(values))
    by_val = train(copy.deepcopy(source), data, cfg.model_copy(update={"select": "val_acc"}), _gen())
    assert by_val.best_epoch == 0  # the same run selected on `val` keeps the source: the choice is the split's


def test_select_refuses_test_splits_and_names_what_the_task_has():
    from methods.training import SelectOn

    with pytest.raises(ValidationError, match="'test' is not a validation split"):
        TrainConfig(select={"split": "test"})
    with pytest.raises(ValidationError, match=r"write \{split: randomised_image_val, label: LABEL\}"):
        TrainConfig(select="randomised_image_val")
    chosen = TrainConfig(select={"split": "cue_conflict_val", "label": "shape"}).select
    assert chosen.describe() == "cue_conflict_val:shape"
    cfg = TrainConfig(lr=1e-3, epochs=1, select=SelectOn(split="cue_conflict_val"))
    with pytest.raises(ValueError, match="no validation split 'cue_conflict_val'; it has: val"):
        train(fresh_mlp(), base_data(), cfg, _gen())
    with pytest.raises(ValueError, match="split 'val' has no label 'shape'; it has: y"):
        train(fresh_mlp(), base_data(), cfg.model_copy(update={"select": SelectOn(split="val", label="shape")}), _gen())
