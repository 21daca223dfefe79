"""Series: one effective config minus the seed, never pooled with another, labelled by what tells it apart."""

import pandas as pd
import pytest

from orchestrator.config import ConfigError
from orchestrator.report import differing_fields, headline, paired_differences, summarise, write_report
from tests.orchestrator.report.synthetic import curves_table, series_rows, write_results


def test_legacy_rows_are_separated_by_their_axes_and_never_pooled_otherwise():
    # Result files from before `series` and per-trial configs: the grid point in columns only.
    low = curves_table({"subtask_induction": {99: [0.9, 0.9]}}, 0.5)
    high = curves_table({"subtask_induction": {99: [0.3, 0.3]}}, 0.75)
    summary = summarise(pd.concat([low, high], ignore_index=True)).set_index("label")
    assert summary.loc["subtask_induction @0.5", "test_acc_mean"] == pytest.approx(0.9)
    assert summary.loc["subtask_induction @0.75", "test_acc_mean"] == pytest.approx(0.3)
    # Settings in other columns (an old file's `unmasked`) are not read: such trials are refused, not averaged.
    keep, reinit = high.assign(unmasked="keep"), high.assign(unmasked="reinit")
    with pytest.raises(ConfigError, match="subtask_induction @0.75"):
        summarise(pd.concat([keep, reinit], ignore_index=True))


def test_two_depths_of_one_method_are_two_series_with_distinct_labels(tmp_path):
    shallow = series_rows("subtask_induction", 0.75, {9: [0.5, 0.6, 0.55], 99: [0.9, 0.92, 0.91]}, n_layers=2)
    deep = series_rows("subtask_induction", 0.75, {9: [0.2, 0.3, 0.25], 99: [0.5, 0.52, 0.51]}, n_layers=4)
    table = pd.concat([shallow, deep], ignore_index=True)
    summary = summarise(table)
    assert summary["series"].nunique() == 2
    by_label = summary.set_index(["label", "n_train"])
    assert by_label.loc[("subtask_induction @0.75 [model.n_layers=2]", 99), "test_acc_mean"] == pytest.approx(0.91)
    assert by_label.loc[("subtask_induction @0.75 [model.n_layers=4]", 99), "test_acc_mean"] == pytest.approx(0.51)
    assert set(summary["model.n_layers"]) == {2, 4}  # the axis is a column
    head = headline(table)
    assert len(head) == 2 and {"series", "task", "method", "mask.sparsity", "label", "model.n_layers"} <= set(head)
    write_results(tmp_path / "run", table)
    md = (write_report([tmp_path / "run"]) / "summary.md").read_text()
    assert "subtask_induction @0.75 [model.n_layers=4]" in md


def test_rows_without_series_load_and_group_like_rows_with_it():
    curve = {9: [0.5, 0.6], 99: [0.9, 0.95]}
    new = summarise(series_rows("scratch", None, curve, n_layers=3))
    old = summarise(series_rows("scratch", None, curve, with_series=False, n_layers=3))
    assert list(old["series"]) == list(new["series"])  # the same hash of config_json, seed and fraction removed
    pd.testing.assert_frame_equal(old, new)


def test_duplicate_trials_are_an_error_not_an_average():
    run = series_rows("subtask_induction", 0.75, {99: [0.9, 0.8]})
    with pytest.raises(ConfigError, match=r"subtask_induction @0.75.*seed 0, n_train 99.*report one of them"):
        summarise(pd.concat([run, run], ignore_index=True))


def test_labels_name_at_most_three_differing_fields():
    runs = [
        series_rows("scratch", None, {99: [0.5, 0.6]}, n_layers=n, width=w, act=a, norm=b)
        for n, w, a, b in [(2, 64, "relu", "ln"), (4, 128, "gelu", "bn")]
    ]
    labels = set(summarise(pd.concat(runs, ignore_index=True))["label"])
    assert labels == {
        "scratch [model.n_layers=2, model.act=relu, model.norm=ln, +1]",  # the axis first, then by name
        "scratch [model.n_layers=4, model.act=gelu, model.norm=bn, +1]",
    }


def test_an_architecture_axis_labels_series_by_name_not_by_its_own_fields():

    resnet = {"model.name": "resnet18", "model.width": 8, "task.bias.feature": "colour"}
    occam = {"model.name": "occam_resnet18", "model.width": 8, "model.gamma0": 3.0, "model.gate_loss": 1.0,
             "task.bias.feature": "colour"}  # fmt: skip
    wider = {**occam, "model.width": 16}
    assert differing_fields([resnet, occam, wider], first=["model.name"]) == [
        ["model.name=resnet18", "model.width=8"],
        ["model.name=occam_resnet18", "model.width=8"],
        ["model.name=occam_resnet18", "model.width=16"],
    ]
    # without a differing name, a field only some configs have still tells them apart
    assert differing_fields([{"a.x": 1}, {"a.x": 1, "a.y": 2}]) == [["a.y=-"], ["a.y=2"]]


def test_variants_label_series_by_name_and_still_pair_by_settings():
    # variant `wide` changes two model fields; full transfer ran once, under the first variant's name
    base = series_rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, width=32, n_heads=4).assign(variant="paper")
    wide = series_rows("subtask_induction", 0.75, {99: [0.4, 0.5, 0.6]}, width=64, n_heads=8).assign(variant="wide")
    ft = series_rows("full_transfer", None, {99: [0.45, 0.55, 0.65]}, width=32, n_heads=4).assign(variant="paper")
    ft_wide = series_rows("full_transfer", None, {99: [0.3, 0.3, 0.3]}, width=64, n_heads=8).assign(variant="wide")
    table = pd.concat([base, wide, ft, ft_wide], ignore_index=True)
    labels = set(summarise(table)["label"])
    assert labels == {"subtask_induction @0.75 [variant=paper]", "subtask_induction @0.75 [variant=wide]",
                      "full_transfer [variant=paper]", "full_transfer [variant=wide]"}  # fmt: skip
    diffs = paired_differences(table, "full_transfer").set_index("label")
    assert diffs.loc["subtask_induction @0.75 [variant=wide]", "versus"] == "full_transfer [variant=wide]"
    assert diffs.loc["subtask_induction @0.75 [variant=wide]", "diff_mean"] == pytest.approx(0.2)
    # one name on two configs (e.g. a merged older run) tells nothing apart: the fields do
    clash = pd.concat([base, wide.assign(variant="paper")], ignore_index=True)
    assert set(summarise(clash)["label"]) == {"subtask_induction @0.75 [model.n_heads=4, model.width=32]",
                                              "subtask_induction @0.75 [model.n_heads=8, model.width=64]"}  # fmt: skip
