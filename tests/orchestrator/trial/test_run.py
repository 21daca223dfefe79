import json
import math

import pytest
import torch

from methods import NonFiniteLoss
from methods.training import Interrupted
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.ordering import order_trials
from orchestrator.trial import (
    KEPT_MODELS,
    TrialSpec,
    analyse_trial,
    artifact_key,
    expand,
    kept_key,
    run_trial,
    upstream_keys,
)
from tests.conftest import tiny_raw


def test_expand_runs_mask_free_methods_once_per_budget_and_seed(tiny):
    sweep = tiny(
        methods=["subtask_induction", "sampled_subnetwork", "scratch", "full_transfer"],
        sparsities=[0.5, 0.9],
        data_fractions=[0.0, 0.5, 1.0],
        seeds=[0, 1],
    )
    specs = expand(sweep)
    by_method = {m: [s for s in specs if s.method == m] for m in sweep.methods}
    assert len(by_method["subtask_induction"]) == 2 * 3 * 2
    assert len(by_method["scratch"]) == 3 * 2
    assert all(s.axes == {} for s in by_method["full_transfer"])
    assert len({s.name for s in specs}) == len(specs)


def source_key(sweep, seed):
    return artifact_key(sweep, TrialSpec(method="full_transfer", data_fraction=0.5, seed=seed), "source")


def mask_key(sweep, seed, sparsity):
    spec = TrialSpec(method="subtask_induction", axes={"mask.sparsity": sparsity}, data_fraction=0.5, seed=seed)
    return artifact_key(sweep, spec, "mask")


def test_artifact_keys_hold_only_what_determines_them(tiny):
    sweep = tiny()
    changed_downstream = tiny(training={"epochs": 3}, task={"downstream": "a^2 + ab", "competing": ["2b^2"]})
    assert source_key(sweep, 0) == source_key(changed_downstream, 0)
    assert mask_key(sweep, 0, 0.5) == mask_key(changed_downstream, 0, 0.5)
    assert source_key(sweep, 0) != source_key(sweep, 1)
    assert source_key(sweep, 0) != source_key(tiny(task={"base": "a + b"}), 0)
    assert mask_key(sweep, 0, 0.5) != mask_key(sweep, 0, 0.6)
    assert source_key(sweep, 0) == source_key(tiny(discovery={"epochs": 5}), 0)


def test_same_config_and_seed_give_identical_metrics(tiny, tmp_path):
    sweep = tiny(methods=["subtask_induction", "sampled_subnetwork", "full_transfer", "scratch"])
    metrics = (
        "test_acc",
        "val_acc",
        "splits_test_acc_2a2",
        "splits_test_acc_2b2",
        "subtask_acc",
        "mask_density",
        "best_epoch",
    )
    for spec in expand(sweep):
        first = run_trial(sweep, spec, ArtifactStore(tmp_path / "a"))
        again = run_trial(sweep, spec, ArtifactStore(tmp_path / "b"))  # recomputes source and mask
        cached = run_trial(sweep, spec, ArtifactStore(tmp_path / "a"))  # loads them
        for m in metrics:
            if m in first:
                assert first[m] == again[m] == cached[m], (spec.name, m)


def test_trial_row_has_documented_fields_and_reports_each_stage(tiny, tmp_path):
    sweep = tiny()
    reports = []
    spec = TrialSpec(method="subtask_induction", axes={"mask.sparsity": 0.5}, data_fraction=0.5, seed=0)
    row = run_trial(sweep, spec, ArtifactStore(tmp_path), report=reports.append)
    assert [r["stage"] for r in reports if r["stage"] != "epoch"] == ["source", "mask", "build", "train", "done"]
    assert row["status"] == "done" and row["n_train"] == 50
    assert abs(row["mask_density"] - 0.5) <= 0.005
    for key in ("source_s", "mask_s", "build_s", "train_s", "eval_s", "total_s", "trial_hash", "series"):
        assert key in row
    assert 0.0 <= row["test_acc"] <= 1.0 and math.isfinite(row["subtask_acc"])


def test_diverging_training_raises(tiny, tmp_path):
    sweep = tiny(training={"lr": 1e30}, methods=["scratch"])
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    with pytest.raises(NonFiniteLoss):
        run_trial(sweep, spec, ArtifactStore(tmp_path))


def test_sweep_config_round_trips_through_json(tiny):
    sweep = tiny()
    again = load_sweep(sweep.canonical())
    assert again == sweep and again.config_hash == sweep.config_hash


def test_ordering_keeps_trials_that_compute_the_same_artifact_apart(tiny):
    sweep = tiny(methods=["subtask_induction", "scratch"], sparsities=[0.5, 0.9], seeds=[0, 1])
    ordered = order_trials(sweep, expand(sweep), concurrency=2)
    assert sorted(s.name for s in ordered) == sorted(s.name for s in expand(sweep))
    first_two = [set(upstream_keys(sweep, s)) for s in ordered[:2]]
    assert not (first_two[0] & first_two[1])


def test_cuda_is_not_picked_without_a_gpu_request(tiny):
    from orchestrator.trial import pick_device

    assert pick_device(tiny()) == torch.device("cpu")


def test_tiny_raw_is_valid():
    load_sweep(tiny_raw())


PLUGINS = ["tests.plugins.brittle_analysis", "tests.plugins.probe_analysis"]


def test_an_analysis_that_raises_keeps_the_trials_results(tiny, tmp_path):
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    plain = run_trial(tiny(plugins=PLUGINS, analyses=["probe"]), spec, ArtifactStore(tmp_path))
    row = run_trial(tiny(plugins=PLUGINS, analyses=["brittle", "probe"]), spec, ArtifactStore(tmp_path))
    assert row["status"] == "done" and row["test_acc"] == plain["test_acc"]
    assert row["probe_norm"] == plain["probe_norm"] and row["splits_test_acc"] == plain["splits_test_acc"]
    assert json.loads(row["analysis_errors"]) == {"brittle": "RuntimeError: deliberate analysis failure"}
    assert "brittle_value" not in row and plain["analysis_errors"] is None


def test_a_stop_request_inside_an_analysis_still_stops_the_trial(tiny, tmp_path):
    sweep = tiny(plugins=PLUGINS, analyses=[{"name": "brittle", "stop": True}])
    with pytest.raises(Interrupted):
        run_trial(sweep, TrialSpec(method="scratch", data_fraction=0.5, seed=0), ArtifactStore(tmp_path))


def test_a_kept_model_gives_the_analyses_the_trial_would_have_run(tiny, tmp_path):
    """`keep: {models: true}` stores the trained model; `analyse_trial` rebuilds it and runs analyses
    the sweep did not have, with the values a sweep that had them from the start gives."""
    store = ArtifactStore(tmp_path)
    later = [("probe", None), ("lmc_barrier", None)]
    kept = tiny(plugins=PLUGINS, keep={"models": True})
    ahead = tiny(plugins=PLUGINS, analyses=["probe", "lmc_barrier"])
    assert expand(kept) == expand(tiny(plugins=PLUGINS))  # keep is not part of any identity
    for spec in expand(kept):
        row = run_trial(kept, spec, store)
        assert store.exists(KEPT_MODELS, kept_key(row["trial_hash"]))
        analysed = analyse_trial(kept, spec, store, row, later)
        expected = run_trial(ahead, spec, store)
        for column in ("probe_norm", "lmc_barrier", "lmc_barrier_acc_mid"):
            assert analysed[column] == expected[column], (spec.name, column)
        assert analysed["test_acc"] == row["test_acc"] and analysed["trial_hash"] == row["trial_hash"]
        listed = [a["name"] for a in json.loads(analysed["config_json"])["analyses"]]
        assert listed == ["splits", "calibration", "probe", "lmc_barrier"]
