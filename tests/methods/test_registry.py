"""A method's own config block: validated under its name, part of its trials' identity, tunable and
sweepable by path; l2sp is the worked example of a method with its own objective."""

import json

import pytest
import yaml

from orchestrator.artifacts import ArtifactStore
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_sweep
from orchestrator.trial import TrialSpec, expand, identity, run_trial, trial_hash
from orchestrator.tuning import method_space
from tests.conftest import tiny_raw


def test_l2sp_with_alpha_zero_is_full_transfer_exactly(tiny, tmp_path):
    sweep = tiny(methods=["full_transfer", "l2sp"], l2sp={"alpha": 0.0}, analyses=["subnetwork_ablation"])
    store = ArtifactStore(tmp_path)
    rows = {m: run_trial(sweep, TrialSpec(method=m, data_fraction=0.5, seed=0), store) for m in sweep.methods}
    for col in ("test_acc", "val_acc", "best_epoch", "splits_test_acc_2a2"):
        assert rows["l2sp"][col] == rows["full_transfer"][col], col
    ce = [e["ce"] for e in json.loads(rows["l2sp"]["measurements_json"])]
    assert ce == [e["ce"] for e in json.loads(rows["full_transfer"]["measurements_json"])]
    assert all(e["l2sp"] >= 0 for e in json.loads(rows["l2sp"]["measurements_json"]))


def test_a_method_block_is_validated_under_its_name(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(methods=["l2sp"], l2sp={"alpha": -1})))
    assert main(["validate", str(path)]) == 2
    assert "l2sp.alpha: Input should be greater than or equal to 0" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(tiny_raw(methods=["scratch"], scratch={"alpha": 1})))
    assert main(["validate", str(path)]) == 2
    assert "has no settings of its own" in capsys.readouterr().err


def test_the_block_enters_only_its_methods_identity(tiny):
    a = tiny(methods=["l2sp", "full_transfer"], l2sp={"alpha": 0.01})
    b = tiny(methods=["l2sp", "full_transfer"], l2sp={"alpha": 0.1})
    changed = [s.method for s in expand(a) if trial_hash(a, s) != trial_hash(b, s)]
    assert changed == ["l2sp"]
    assert identity(a, TrialSpec(method="l2sp", data_fraction=0.5, seed=0))["l2sp"] == {"alpha": 0.01}
    assert load_sweep(a.canonical()) == a, "the block round-trips at the top level"


def test_method_settings_are_sweepable_and_tunable_by_path(tiny):
    sweep = tiny(methods=["l2sp", "scratch"], axes={"l2sp.alpha": [0.0, 0.1]})
    specs = expand(sweep)
    assert sorted(s.axes.get("l2sp.alpha", -1) for s in specs) == [-1, 0.0, 0.1]  # scratch runs once
    tuned = tiny(
        methods=["l2sp", "scratch"], tuning={"space": {"l2sp.alpha": [1e-4, 1.0], "training.lr": [1e-4, 1e-2]}}
    )
    assert "l2sp.alpha" in method_space(tuned, "l2sp") and "l2sp.alpha" not in method_space(tuned, "scratch")
    over = tiny(methods=["l2sp", "scratch"], method_overrides={"l2sp": {"l2sp.alpha": 0.5}})
    assert over.effective("l2sp").blocks["l2sp"].alpha == 0.5
    with pytest.raises(ConfigError, match="another method's setting"):
        load_sweep(tiny_raw(methods=["l2sp", "scratch"], method_overrides={"scratch": {"l2sp.alpha": 0.5}}))


def test_a_method_blocks_training_reaches_only_its_trials(tiny):
    training = {"optimizer": "sgd", "momentum": 0.9, "lr": 30, "groups": [{"match": "head", "lr_scale": 0.1}]}
    methods = ["full_transfer", "scratch", "l2sp"]
    sweep = tiny(methods=methods, full_transfer={"training": training}, l2sp={"alpha": 0.1})
    ft, scratch = sweep.effective("full_transfer").training, sweep.effective("scratch").training
    assert (ft.optimizer, ft.momentum, ft.lr, ft.epochs) == ("sgd", 0.9, 30, sweep.training.epochs)
    assert ft.groups[0].match == "head" and ft.groups[0].lr_scale == 0.1  # a list of mappings, validated
    assert scratch == sweep.training
    plain = tiny(methods=methods, l2sp={"alpha": 0.1})
    assert [s.method for s in expand(sweep) if trial_hash(sweep, s) != trial_hash(plain, s)] == ["full_transfer"]
    assert load_sweep(sweep.canonical()) == sweep, "the block round-trips at the top level"
    both = tiny(methods=["l2sp", "scratch"], l2sp={"alpha": 0.5, "training": {"epochs": 7}})
    assert both.effective("l2sp").training.epochs == 7 and both.effective("l2sp").blocks["l2sp"].alpha == 0.5
    tuned = tiny(methods=["l2sp"], l2sp={"training": {"lr": 0.1}}, method_overrides={"l2sp": {"training.lr": 0.2}})
    assert tuned.effective("l2sp").training.lr == 0.2, "--tuned values win over the block"


@pytest.mark.parametrize(
    "block, extra, fragments",
    [
        ({"lrr": 30}, {}, ["scratch.training.lrr", "unknown config path", "did you mean training.lr", "groups"]),
        ({"lr": -1}, {}, ["scratch: training.lr", "greater than 0"]),
        ({"groups": [{"match": "(", "lr_scale": 2}]}, {}, ["scratch: training.groups", "not a regular expression"]),
        ({"lr": 0.1}, {"axes": {"training.lr": [0.1, 0.2]}}, ["scratch.training.lr", "also an axis"]),
        ({"lr": 0.1}, {"methods": ["subtask_induction"]}, ["scratch.training.lr", "'scratch' is not in methods"]),
        (5, {}, ["scratch.training: expected a mapping"]),
    ],
)
def test_a_bad_method_training_block_names_the_method_and_the_field(block, extra, fragments):
    with pytest.raises(ConfigError) as err:
        load_sweep(tiny_raw(scratch={"training": block}, **extra))
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
