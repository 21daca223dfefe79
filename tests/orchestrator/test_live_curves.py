"""Live curves: a trial reports every epoch of every training run it does (the downstream model's,
and the source's and mask's when it computes them), not only its stages, so Tune's logs
(result.json, progress.csv, TensorBoard) hold per-epoch curves. The Ray side is checked by
tests/orchestrator/test_checkpoints.py's sweep (a trial directory's result.json and TensorBoard files)."""

import json
import math

from orchestrator.artifacts import ArtifactStore
from orchestrator.trial import TrialSpec, run_trial


def test_the_report_gets_one_result_per_epoch_of_every_training_run(tiny, tmp_path):
    sweep = tiny(training={"epochs": 3}, discovery={"epochs": 2}, source={"epochs": 2})
    spec = TrialSpec(method="subtask_induction", axes={"mask.sparsity": 0.5}, data_fraction=0.5, seed=0)
    reports: list[dict] = []
    row = run_trial(sweep, spec, ArtifactStore(tmp_path), report=reports.append)

    stages = [r["stage"] for r in reports if r["stage"] != "epoch"]
    assert stages == ["source", "mask", "build", "train", "done"], "the stage reports are kept as they were"
    sequence = [(r["stage"], r.get("fit"), r.get("epoch")) for r in reports]
    assert sequence == [
        ("epoch", "source", 1), ("epoch", "source", 2), ("source", None, None),
        ("epoch", "mask", 1), ("epoch", "mask", 2), ("mask", None, None),
        ("build", None, None),
        ("epoch", "train", 1), ("epoch", "train", 2), ("epoch", "train", 3), ("train", None, None),
        ("done", None, None),
    ]  # fmt: skip

    measured = {"source": {"ce"}, "mask": {"ce", "l0", "temperature"}, "train": {"ce"}}
    for r in (r for r in reports if r["stage"] == "epoch"):
        fit = r["fit"]
        # Keys are prefixed by the run, so TensorBoard shows one group of curves per run.
        expected = {"stage", "fit", "epoch"} | {f"{fit}/{k}" for k in {"val_score", "loss"} | measured[fit]}
        assert set(r) == expected, r
        assert all(math.isfinite(r[k]) for k in expected - {"stage", "fit", "epoch"})

    train = [r for r in reports if r.get("fit") == "train"]
    assert [{"ce": r["train/ce"]} for r in train] == json.loads(row["measurements_json"])
    assert max(r["train/val_score"] for r in train) == row["val_acc"]
    assert train[row["best_epoch"] - 1]["train/val_score"] == row["val_acc"]


def test_each_run_of_a_method_that_trains_twice_is_labelled_apart(tiny, tmp_path):
    sweep = tiny(methods=["lpft"], lpft={"probe_epochs": 2}, training={"epochs": 3})
    spec = TrialSpec(method="lpft", data_fraction=0.5, seed=0)
    store = ArtifactStore(tmp_path)
    run_trial(sweep, spec, store)  # the source, so that only the downstream runs report below
    reports: list[dict] = []
    run_trial(sweep, spec, store, report=reports.append)
    epochs = [(r["fit"], r["epoch"]) for r in reports if r["stage"] == "epoch"]
    assert epochs == [("train", 1), ("train", 2), ("train.2", 1), ("train.2", 2), ("train.2", 3)]
    assert all("train.2/val_score" in r for r in reports if r.get("fit") == "train.2")
