"""Report statistics on synthetic result tables whose answers are known."""

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import stable_hash
from orchestrator import results
from orchestrator.artifacts import ArtifactStore
from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.report import (
    artifact_roots,
    budget_to_reach,
    curve_area,
    headline,
    load_masks,
    mask_overlap,
    mean_over,
    mean_over_differences,
    paired_differences,
    summarise,
    write_report,
)


def _table(curves: dict[str, dict[int, list[float]]], sparsity=None) -> pd.DataFrame:
    rows = []
    for method, by_n in curves.items():
        for n, accs in by_n.items():
            for seed, acc in enumerate(accs):
                rows.append(
                    {
                        "trial": f"{method}-{n}-{seed}",
                        "task": "t",
                        "model": "m",
                        "method": method,
                        "sparsity": None if method == "scratch" else sparsity,
                        "data_fraction": n / 1000,
                        "n_train": n,
                        "seed": seed,
                        "status": "done",
                        "test_acc": acc,
                        "val_acc": acc,
                        "subtask_acc": 0.99 if method != "scratch" else None,
                    }
                )
    return results.frame(rows)


def test_summary_intervals_are_student_t_and_absent_for_one_seed():
    table = _table({"subtask_induction": {10: [0.5, 0.7, 0.6], 100: [0.9]}}, 0.75)
    summary = summarise(table).set_index("n_train")
    lo, hi = summary.loc[10, ["test_acc_ci_lo", "test_acc_ci_hi"]]
    assert (lo, hi) == pytest.approx((0.6 - 4.302653 * 0.1 / np.sqrt(3), 0.6 + 4.302653 * 0.1 / np.sqrt(3)))
    assert np.isnan(summary.loc[100, "test_acc_ci_lo"]) and np.isnan(summary.loc[100, "test_acc_ci_hi"])


def test_budget_to_reach_interpolates_on_the_log_budget_axis():
    n = np.array([0, 9, 99, 999])
    acc = np.array([0.1, 0.5, 0.8, 1.0])
    # 0.9 lies halfway between n = 99 and n = 999 on x = log10(1 + n): x = 2.5, n = 10**2.5 - 1
    assert budget_to_reach(n, acc, 0.9) == pytest.approx(10**2.5 - 1)
    assert budget_to_reach(n, acc, 0.8) == pytest.approx(99)
    assert budget_to_reach(n, acc, 0.05) == 0
    assert budget_to_reach(n, acc, 1.01) == float("inf")
    # the first crossing counts, even if the curve dips afterwards
    assert budget_to_reach(np.array([0, 9, 99]), np.array([0.0, 1.0, 0.5]), 0.5) == pytest.approx(10**0.5 - 1)


def test_curve_area_is_mean_accuracy_over_log_budget():
    n = np.array([0, 9, 99])
    assert curve_area(n, np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert curve_area(n, np.array([0.0, 1.0, 1.0])) == pytest.approx(0.75)  # trapezoids on x = 0, 1, 2


def test_summary_has_seeds_mean_std_ci_for_every_metric():
    table = _table({"subtask_induction": {10: [0.5, 0.7], 100: [0.9, 0.9]}, "scratch": {10: [0.2, 0.4]}}, 0.75)
    summary = summarise(table).set_index(["method", "n_train"])
    row = summary.loc[("subtask_induction", 10)]
    assert row["seeds"] == 2
    assert row["test_acc_mean"] == pytest.approx(0.6)
    assert row["test_acc_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert row["test_acc_ci_lo"] < 0.5 and row["test_acc_ci_hi"] > 0.7  # t(1) = 12.7: two seeds say little
    for metric in ("val_acc", "subtask_acc"):
        assert f"{metric}_mean" in summary.columns
    assert np.isnan(summary.loc[("scratch", 10), "sparsity"])


def test_headline_threshold_area_and_ratio():
    table = _table(
        {
            "subtask_induction": {0: [0.2, 0.2], 9: [0.8, 0.8], 99: [1.0, 1.0]},
            "scratch": {0: [0.1, 0.1], 9: [0.5, 0.5], 99: [0.8, 0.8], 999: [1.0, 1.0]},
        },
        sparsity=0.75,
    )
    head = headline(table, target=0.9).set_index("method")
    si, scratch = head.loc["subtask_induction"], head.loc["scratch"]
    assert si["n_to_target"] == pytest.approx(10**1.5 - 1)
    assert si["n_to_target_ci_lo"] == pytest.approx(si["n_to_target"])  # identical seeds: no spread
    assert scratch["n_to_target"] == pytest.approx(10**2.5 - 1)
    assert si["ratio_vs_reference"] == pytest.approx((10**2.5 - 1) / (10**1.5 - 1))
    assert not si["ratio_is_lower_bound"]
    assert si["area"] == pytest.approx(np.trapezoid([0.2, 0.8, 1.0], np.log10([1, 10, 100])) / 2)


def test_ratio_is_a_lower_bound_when_scratch_never_reaches_the_target():
    table = _table({"subtask_induction": {0: [0.5], 99: [0.95]}, "scratch": {0: [0.1], 99: [0.3]}}, 0.9)
    head = headline(table, target=0.9).set_index("method")
    assert head.loc["scratch", "n_to_target"] == float("inf")
    assert head.loc["subtask_induction", "ratio_is_lower_bound"]
    assert head.loc["subtask_induction", "ratio_vs_reference"] == pytest.approx(
        99 / head.loc["subtask_induction", "n_to_target"]
    )


def _write_results(dir_, table):
    dir_.mkdir(parents=True)
    results.write(table, dir_ / "results.parquet")


def test_report_merges_directories_and_writes_every_file(tmp_path):
    a = _table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.75)
    b = _table({"scratch": {0: [0.2, 0.25], 99: [0.4, 0.5]}})
    _write_results(tmp_path / "a", a)
    _write_results(tmp_path / "b", b)
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    for name in (
        "summary.parquet",
        "headline.parquet",
        "summary.md",
        "index.html",
        "data_efficiency.png",
        "data_efficiency.svg",
        "sparsity_vs_subtask.png",
    ):
        assert (report / name).exists(), name
    assert set(pd.read_parquet(report / "summary.parquet")["method"]) == {"subtask_induction", "scratch"}
    assert "subtask_induction @0.75" in (report / "summary.md").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_index_html_renders_in_a_real_browser_with_every_figure(tmp_path):
    from PIL import Image

    table = _table(
        {"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}, "scratch": {0: [0.2, 0.25], 99: [0.4, 0.5]}}, 0.75
    )
    _write_results(tmp_path / "run", table)
    report = write_report([tmp_path / "run"])
    url = (report / "index.html").as_uri()
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-figures="2"' in dom and 'data-figures-loaded="2"' in dom, dom[-500:]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp_path / 'p2'}",
            "--window-size=1200,1400",
            f"--screenshot={shot}",
            url,
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.01, "too little ink: text and figures did not render"


def test_legacy_transfer_variants_are_reported_as_separate_series():
    # Result files from before `series`: no series column, and the transfer settings in columns.
    keep = _table({"subtask_induction": {99: [0.9, 0.9]}}, 0.75)
    reinit = _table({"subtask_induction": {99: [0.3, 0.3]}}, 0.75)
    keep["unmasked"], reinit["unmasked"] = "keep", "reinit"
    keep["trainable_subnetwork"] = reinit["trainable_subnetwork"] = False
    summary = summarise(pd.concat([keep, reinit], ignore_index=True)).set_index("label")
    assert summary.loc["subtask_induction @0.75 [transfer.unmasked=keep]", "test_acc_mean"] == pytest.approx(0.9)
    assert summary.loc["subtask_induction @0.75 [transfer.unmasked=reinit]", "test_acc_mean"] == pytest.approx(0.3)


# --- series: one effective config minus the seed ------------------------------------------


def _config(method, sparsity, seed, fraction, task="t", **model) -> dict:
    """A trial's effective config as the rows carry it in `config_json`."""
    config = {
        "method": method,
        "sparsity": sparsity,
        "data_fraction": fraction,
        "seed": seed,
        "task": {"name": task},
        "model": {"name": "mlp", "n_layers": 2, **model},
        "training": {"lr": 2e-4, "epochs": 10},
    }
    if sparsity is not None:
        config["discovery"] = {"l0_lambda": 1e-3}
        config["transfer"] = {"unmasked": "keep"}
    return config


def _rows(method, sparsity, curve: dict[int, list[float]], task="t", with_series=True, **model) -> pd.DataFrame:
    """Rows of one series, in the schema with `config_json`, `series` and dotted axis columns."""
    rows = []
    for n, accs in curve.items():
        for seed, acc in enumerate(accs):
            config = _config(method, sparsity, seed, n / 1000, task, **model)
            row = {
                "trial": f"{method}-{n}-{seed}",
                "task": task,
                "model": "mlp",
                "method": method,
                "sparsity": sparsity,
                "data_fraction": n / 1000,
                "n_train": n,
                "seed": seed,
                "status": "done",
                "test_acc": acc,
                "val_acc": acc,
                "config_json": json.dumps(config, sort_keys=True),
                "model.n_layers": config["model"]["n_layers"],
            }
            if with_series:
                row["series"] = stable_hash({k: v for k, v in config.items() if k not in ("seed", "data_fraction")})
            rows.append(row)
    return results.frame(rows)


def test_two_depths_of_one_method_are_two_series_with_distinct_labels(tmp_path):
    shallow = _rows("subtask_induction", 0.75, {9: [0.5, 0.6, 0.55], 99: [0.9, 0.92, 0.91]}, n_layers=2)
    deep = _rows("subtask_induction", 0.75, {9: [0.2, 0.3, 0.25], 99: [0.5, 0.52, 0.51]}, n_layers=4)
    table = pd.concat([shallow, deep], ignore_index=True)
    summary = summarise(table)
    assert summary["series"].nunique() == 2
    by_label = summary.set_index(["label", "n_train"])
    assert by_label.loc[("subtask_induction @0.75 [model.n_layers=2]", 99), "test_acc_mean"] == pytest.approx(0.91)
    assert by_label.loc[("subtask_induction @0.75 [model.n_layers=4]", 99), "test_acc_mean"] == pytest.approx(0.51)
    assert set(summary["model.n_layers"]) == {2, 4}  # the axis is a column
    head = headline(table)
    assert len(head) == 2 and {"series", "task", "method", "sparsity", "label", "model.n_layers"} <= set(head)
    _write_results(tmp_path / "run", table)
    md = (write_report([tmp_path / "run"]) / "summary.md").read_text()
    assert "subtask_induction @0.75 [model.n_layers=4]" in md


def test_rows_without_series_load_and_group_like_rows_with_it():
    curve = {9: [0.5, 0.6], 99: [0.9, 0.95]}
    new = summarise(_rows("scratch", None, curve, n_layers=3))
    old = summarise(_rows("scratch", None, curve, with_series=False, n_layers=3))
    assert list(old["series"]) == list(new["series"])  # the same hash of config_json, seed and fraction removed
    pd.testing.assert_frame_equal(old, new)


def test_duplicate_trials_are_an_error_not_an_average():
    run = _rows("subtask_induction", 0.75, {99: [0.9, 0.8]})
    with pytest.raises(ConfigError, match=r"subtask_induction @0.75.*seed 0, n_train 99.*report one of them"):
        summarise(pd.concat([run, run], ignore_index=True))


def test_labels_name_at_most_three_differing_fields():
    runs = [
        _rows("scratch", None, {99: [0.5, 0.6]}, n_layers=n, width=w, act=a, norm=b)
        for n, w, a, b in [(2, 64, "relu", "ln"), (4, 128, "gelu", "bn")]
    ]
    labels = set(summarise(pd.concat(runs, ignore_index=True))["label"])
    assert labels == {
        "scratch [model.n_layers=2, model.act=relu, model.norm=ln, +1]",  # the axis first, then by name
        "scratch [model.n_layers=4, model.act=gelu, model.norm=bn, +1]",
    }


def test_ratio_is_against_the_scratch_series_with_the_same_settings_and_task():
    table = pd.concat(
        [
            _rows("subtask_induction", 0.75, {0: [0.5, 0.5], 99: [1.0, 1.0]}, n_layers=2),
            _rows("subtask_induction", 0.75, {0: [0.5, 0.5], 99: [1.0, 1.0]}, n_layers=4),
            _rows("scratch", None, {0: [0.1, 0.1], 9: [0.9, 0.9], 99: [1.0, 1.0]}, n_layers=2),
            _rows("scratch", None, {0: [0.1, 0.1], 99: [0.95, 0.95], 999: [1.0, 1.0]}, n_layers=4),
            _rows("scratch", None, {0: [0.9, 0.9], 99: [1.0, 1.0]}, task="other", n_layers=4),
        ],
        ignore_index=True,
    )
    head = headline(table, target=0.9).set_index("label")
    si2, si4 = (
        head.loc["subtask_induction @0.75 [model.n_layers=2]"],
        head.loc["subtask_induction @0.75 [model.n_layers=4]"],
    )
    assert si2["reference_label"] == "scratch [model.n_layers=2]"
    assert si4["reference_label"] == "scratch [model.n_layers=4]"
    assert si2["ratio_vs_reference"] == pytest.approx(9 / si2["n_to_target"])
    assert si4["ratio_vs_reference"] > si2["ratio_vs_reference"]
    assert (head.loc[head["task"] == "t", "reference_label"] != "scratch").all()  # never the other task's


# --- mask overlap ----------------------------------------------------------------------------


N_WEIGHTS = 1000  # a mask over a 600-vector and a 20 x 20 matrix, flattened together


def _mask_key(seed: int, sparsity: float, l0: float = 1e-3) -> dict:
    source = {"task": {"name": "t"}, "model": {"name": "mlp"}, "training": {"lr": 5e-4}, "seed": seed}
    return {"source": source, "subtask": {"name": "t"}, "discovery": {"l0_lambda": l0}, "sparsity": sparsity}


def _store_mask(store: ArtifactStore, key: dict, ones: slice) -> None:
    flat = torch.zeros(N_WEIGHTS, dtype=torch.bool)
    flat[ones] = True
    tensors = {"a.weight": flat[:600].clone(), "b.weight": flat[600:].reshape(20, 20).clone()}
    store.get_or_compute("mask", key, lambda: (tensors, {"density": flat.float().mean().item()}))


def test_artifact_store_lists_its_entries(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    assert store.entries("mask") == []
    _store_mask(store, _mask_key(0, 0.5), slice(0, 500))
    [(key, meta, path)] = store.entries("mask")
    assert key == _mask_key(0, 0.5) and meta["density"] == 0.5 and path == store.path("mask", key)


def test_mask_overlap_across_seeds_and_sparsities_against_random_masks(tmp_path):
    out = tmp_path / "run"
    _write_results(out, _table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.5))
    store_root = tmp_path / "elsewhere"  # sweep.json points the store away from OUT/artifacts
    (out / "sweep.json").write_text(json.dumps({"config": {"storage": {"artifacts": str(store_root)}}}))
    store = ArtifactStore(store_root)
    _store_mask(store, _mask_key(0, 0.5), slice(0, 500))
    _store_mask(store, _mask_key(1, 0.5), slice(100, 600))  # |A∩B| = 400, |A∪B| = 600
    _store_mask(store, _mask_key(0, 0.75), slice(0, 250))  # inside seed 0's 0.5 mask: 250 / 500
    report = write_report([out])
    overlap = pd.read_parquet(report / "mask_overlap.parquet")
    seeds = overlap[overlap["pair"] == "across seeds"].iloc[0]
    assert (seeds["seed_a"], seeds["seed_b"], seeds["sparsity_a"]) == (0, 1, 0.5)
    assert seeds["jaccard"] == pytest.approx(400 / 600)
    assert seeds["jaccard_random"] == pytest.approx(0.25 / 0.75)
    sparsities = overlap[overlap["pair"] == "across sparsities"].iloc[0]
    assert (sparsities["sparsity_a"], sparsities["sparsity_b"], sparsities["seed_a"]) == (0.5, 0.75, 0)
    assert sparsities["jaccard"] == pytest.approx(0.5)
    assert sparsities["jaccard_random"] == pytest.approx(0.5 * 0.25 / (0.5 + 0.25 - 0.5 * 0.25))
    assert len(overlap) == 2  # seed 1 @0.5 and seed 0 @0.75 differ in both: not a pair
    assert (report / "mask_overlap.png").exists() and (report / "mask_overlap.svg").exists()
    assert "mask_overlap.svg" in (report / "index.html").read_text()
    assert "Mask overlap" in (report / "summary.md").read_text()


def test_masks_of_other_discovery_settings_are_not_paired(tmp_path):
    store = ArtifactStore(tmp_path / "run" / "artifacts")
    _store_mask(store, _mask_key(0, 0.5, l0=1e-3), slice(0, 500))
    _store_mask(store, _mask_key(1, 0.5, l0=1e-2), slice(0, 500))
    assert mask_overlap(load_masks(artifact_roots([tmp_path / "run"]))).empty


def test_no_mask_overlap_figure_with_fewer_than_two_masks(tmp_path):
    out = tmp_path / "run"
    _write_results(out, _table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.5))
    _store_mask(ArtifactStore(out / "artifacts"), _mask_key(0, 0.5), slice(0, 500))
    report = write_report([out])
    assert not (report / "mask_overlap.png").exists() and not (report / "mask_overlap.parquet").exists()
    assert "mask_overlap.svg" not in (report / "index.html").read_text()


def test_the_summarised_columns_are_the_ones_results_names(monkeypatch):
    monkeypatch.setattr(results, "summarised_columns", lambda table: ["val_acc", "no_such_column"])
    summary = summarise(_table({"scratch": {10: [0.2, 0.4]}}))
    assert "val_acc_mean" in summary and "test_acc_mean" not in summary


def test_summary_md_says_when_a_series_has_no_interval(tmp_path):
    _write_results(tmp_path / "run", _table({"scratch": {0: [0.2], 99: [0.95]}}))
    md = (write_report([tmp_path / "run"]) / "summary.md").read_text()
    assert "Student t" in md and "One seed only, so no interval (NaN bounds)" in md
    assert "[no CI: one seed]" in md


# --- profiles (an analysis's column family against depth) --------------------------------------


def test_representation_r2_profile_is_drawn_against_depth_at_the_largest_budget(tmp_path):
    from orchestrator.report import t_interval

    layers = ["embed", "block0", "final"]  # the model's order: not alphabetical
    table = _table({"scratch": {10: [0.2, 0.3, 0.25], 99: [0.5, 0.6, 0.55]}})
    config = json.dumps({"analyses": [{"name": "representation_r2"}]})
    table["config_json"] = config
    table["representation_r2_layers"] = ",".join(layers)
    values = {}
    for depth, layer in enumerate(layers):
        for feature in ("a", "ab_mod_p"):
            col = f"representation_r2_{layer}_{feature}"
            # known answer: R² of feature a falls with depth, of ab mod p rises; the small budget differs
            base = (0.9 - 0.3 * depth) if feature == "a" else (0.1 + 0.3 * depth)
            table[col] = [
                base + 0.01 * seed + (0.5 if n == 10 else 0)
                for n, seed in zip(table["n_train"], table["seed"], strict=True)
            ]
            values[(layer, feature)] = [base + 0.01 * s for s in range(3)]
    _write_results(tmp_path / "run", table)
    report = write_report([tmp_path / "run"])
    long = pd.read_parquet(report / "representation_r2_profile.parquet")
    assert set(long["n_train"]) == {99} and len(long) == 6
    assert list(long[long["line"] == "a"].sort_values("depth")["position"]) == layers
    for (layer, feature), vals in values.items():
        row = long[(long["position"] == layer) & (long["line"] == feature)].iloc[0]
        assert row["mean"] == pytest.approx(np.mean(vals))
        lo, hi = t_interval(np.array(vals))
        assert (row["ci_lo"], row["ci_hi"]) == pytest.approx((lo, hi))
        assert row["depth"] == layers.index(layer)
    md = (report / "summary.md").read_text()
    assert "## representation_r2 by depth" in md
    section = md.split("## representation_r2 by depth")[1]
    assert section.index("embed") < section.index("block0") < section.index("final")  # columns in depth order
    assert (report / "representation_r2_profile.svg").exists()
    assert "representation_r2_profile.svg" in (report / "index.html").read_text()


def test_no_profile_without_the_analysis(tmp_path):
    _write_results(tmp_path / "run", _table({"scratch": {10: [0.2, 0.3], 99: [0.5, 0.6]}}))
    report = write_report([tmp_path / "run"])
    assert not (report / "representation_r2_profile.parquet").exists()


def test_an_architecture_axis_labels_series_by_name_not_by_its_own_fields():
    from orchestrator.report import differing_fields

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


# --- paired differences against one method -----------------------------------------------


def test_paired_differences_pair_seeds_with_the_closest_series_of_the_method(tmp_path):
    si2 = _rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, n_layers=2)
    ft2 = _rows("full_transfer", None, {99: [0.4, 0.45, 0.65]}, n_layers=2)
    si4 = _rows("subtask_induction", 0.75, {99: [0.2, 0.3, 0.4]}, n_layers=4)
    ft4 = _rows("full_transfer", None, {99: [0.9, 0.9, 0.9]}, n_layers=4)
    ft4 = ft4[ft4["seed"] != 2]  # a seed only one side has is left out: differences are paired
    diffs = paired_differences(pd.concat([si2, ft2, si4, ft4], ignore_index=True), "full_transfer")
    by = diffs.set_index("label")
    shallow = by.loc["subtask_induction @0.75 [model.n_layers=2]"]
    deep = by.loc["subtask_induction @0.75 [model.n_layers=4]"]
    assert shallow["versus"] == "full_transfer [model.n_layers=2]"
    assert deep["versus"] == "full_transfer [model.n_layers=4]"
    half = 4.302653 * 0.05 / np.sqrt(3)  # differences 0.1, 0.15, 0.05: mean 0.1, sd 0.05, t(2)
    assert (shallow["pairs"], shallow["diff_mean"]) == (3, pytest.approx(0.1))
    assert (shallow["diff_ci_lo"], shallow["diff_ci_hi"]) == pytest.approx((0.1 - half, 0.1 + half))
    assert (deep["pairs"], deep["diff_mean"]) == (2, pytest.approx(-0.65))
    assert set(diffs["method"]) == {"subtask_induction"}  # the method itself is not compared with itself


def test_paired_differences_cover_their_mean_at_three_seeds():
    """Synthetic pairs with a shared per-seed effect and a known gap of 0.1: the interval covers 0.1
    in about 95% of repetitions, where unpaired t intervals of the two means would be far wider."""
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for _ in range(400):
        seed_effect = rng.normal(0, 0.2, 3)
        a = 0.5 + seed_effect + rng.normal(0, 0.02, 3)
        b = 0.4 + seed_effect + rng.normal(0, 0.02, 3)
        si, ft = _rows("subtask_induction", 0.75, {99: list(a)}), _rows("full_transfer", None, {99: list(b)})
        row = paired_differences(pd.concat([si, ft], ignore_index=True), "full_transfer").iloc[0]
        hits += row["diff_ci_lo"] <= 0.1 <= row["diff_ci_hi"]
        widths.append(row["diff_ci_hi"] - row["diff_ci_lo"])
    assert 0.92 <= hits / 400 <= 0.98
    assert np.median(widths) < 0.2  # an unpaired interval would be about 2 x 4.3 x 0.2 / sqrt(3) wide


def test_versus_a_method_without_results_names_the_methods_that_have_them(tmp_path):
    table = _rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]})
    with pytest.raises(ConfigError, match="--versus full_transfr: no finished trial ran 'full_transfr'.*subtask_ind"):
        paired_differences(table, "full_transfr")


def test_report_versus_writes_the_paired_table(tmp_path, capsys):
    table = pd.concat([_rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}),
                       _rows("full_transfer", None, {99: [0.4, 0.45, 0.65]})], ignore_index=True)  # fmt: skip
    (tmp_path / "run").mkdir()
    table.to_parquet(tmp_path / "run" / "results.parquet")
    assert main(["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--versus", "full_transfer"]) == 0
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "minus the full_transfer series of the same settings, paired by seed" in text
    assert "subtask_induction @0.75 − full_transfer" in text and "+0.100 [" in text
    assert len(pd.read_parquet(tmp_path / "rep" / "versus.parquet")) == 1
    assert main(["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--versus", "scratch"]) == 2
    assert "no finished trial ran 'scratch'" in capsys.readouterr().err


def test_mean_over_an_axis_averages_each_seed_over_its_values_then_takes_the_t_interval():
    si2 = _rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, n_layers=2)
    si4 = _rows("subtask_induction", 0.75, {99: [0.3, 0.4, 0.9]}, n_layers=4)
    si6 = _rows("subtask_induction", 0.75, {99: [0.1, 0.2]}, n_layers=6)  # seed 2 missing: left out
    ft2 = _rows("full_transfer", None, {99: [0.9, 0.9, 0.9]}, n_layers=2)
    lone = _rows("scratch", None, {99: [0.2, 0.2, 0.2]}, n_layers=2)  # one depth only: nothing to average
    means = mean_over(pd.concat([si2, si4, si6, ft2, lone], ignore_index=True), "model.n_layers")
    assert list(means["label"]) == ["subtask_induction @0.75 [mean over model.n_layers = 2, 4, 6]"]
    row = means.iloc[0]
    per_seed = [(0.5 + 0.3 + 0.1) / 3, (0.6 + 0.4 + 0.2) / 3]  # seed 2 lacks depth 6
    assert (row["seeds"], row["test_acc_mean"]) == (2, pytest.approx(np.mean(per_seed)))
    half = 12.7062 * np.std(per_seed, ddof=1) / np.sqrt(2)  # t(1)
    assert (row["test_acc_ci_lo"], row["test_acc_ci_hi"]) == pytest.approx(
        (np.mean(per_seed) - half, np.mean(per_seed) + half), rel=1e-4
    )
    with pytest.raises(ConfigError, match="--mean-over model.depth: not a config path .* axes: model.n_layers"):
        mean_over(si2, "model.depth")
    with pytest.raises(ConfigError, match="--mean-over variant: not a config path"):
        mean_over(si2.assign(variant="a"), "variant")


def test_variants_label_series_by_name_and_still_pair_by_settings():
    # variant `wide` changes two model fields; full transfer ran once, under the first variant's name
    base = _rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, width=32, n_heads=4).assign(variant="paper")
    wide = _rows("subtask_induction", 0.75, {99: [0.4, 0.5, 0.6]}, width=64, n_heads=8).assign(variant="wide")
    ft = _rows("full_transfer", None, {99: [0.45, 0.55, 0.65]}, width=32, n_heads=4).assign(variant="paper")
    ft_wide = _rows("full_transfer", None, {99: [0.3, 0.3, 0.3]}, width=64, n_heads=8).assign(variant="wide")
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


def test_mean_over_differences_average_each_seeds_gaps_over_the_axis():
    si2 = _rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, n_layers=2)
    ft2 = _rows("full_transfer", None, {99: [0.4, 0.4, 0.4]}, n_layers=2)
    si4 = _rows("subtask_induction", 0.75, {99: [0.3, 0.5, 0.9]}, n_layers=4)
    ft4 = _rows("full_transfer", None, {99: [0.5, 0.5, 0.6]}, n_layers=4)
    rm2 = _rows("sampled_subnetwork", 0.75, {99: [0.1, 0.1, 0.1]}, n_layers=2)
    rm4 = _rows("sampled_subnetwork", 0.75, {99: [0.1, 0.1, 0.1]}, n_layers=4)
    table = pd.concat([si2, ft2, si4, ft4, rm2, rm4[rm4["seed"] != 1]], ignore_index=True)
    gaps = mean_over_differences(table, "model.n_layers", "full_transfer").set_index("label")
    row = gaps.loc["subtask_induction @0.75 [mean over model.n_layers = 2, 4]"]
    per_seed = [(0.1 - 0.2) / 2, (0.2 + 0.0) / 2, (0.3 + 0.3) / 2]  # each seed's gaps at depths 2 and 4
    half = 4.302653 * np.std(per_seed, ddof=1) / np.sqrt(3)
    assert (row["pairs"], row["diff_mean"]) == (3, pytest.approx(np.mean(per_seed)))
    assert (row["diff_ci_lo"], row["diff_ci_hi"]) == pytest.approx((np.mean(per_seed) - half, np.mean(per_seed) + half))
    assert gaps.loc["sampled_subnetwork @0.75 [mean over model.n_layers = 2, 4]", "pairs"] == 2  # seed 1 lacks depth 4
    assert "full_transfer" not in set(gaps["method"])
    # a depth without a partner leaves the whole group out: its mean would be over other depths
    alone = mean_over_differences(pd.concat([si2, ft2, si4], ignore_index=True), "model.n_layers", "full_transfer")
    assert alone.empty


def test_report_versus_and_mean_over_write_the_mean_gap(tmp_path):
    table = pd.concat([_rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, n_layers=2),
                       _rows("full_transfer", None, {99: [0.4, 0.5, 0.6]}, n_layers=2),
                       _rows("subtask_induction", 0.75, {99: [0.3, 0.4, 0.5]}, n_layers=4),
                       _rows("full_transfer", None, {99: [0.3, 0.4, 0.5]}, n_layers=4)], ignore_index=True)  # fmt: skip
    (tmp_path / "run").mkdir()
    table.to_parquet(tmp_path / "run" / "results.parquet")
    argv = ["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--versus", "full_transfer"]
    assert main([*argv, "--mean-over", "model.n_layers"]) == 0
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "minus its full_transfer partner, mean over model.n_layers" in text and "+0.050 [" in text
    assert len(pd.read_parquet(tmp_path / "rep" / "versus_mean_over.parquet")) == 1


def test_report_mean_over_writes_its_table(tmp_path):
    shallow = _rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, n_layers=2)
    deep = _rows("subtask_induction", 0.75, {99: [0.3, 0.4, 0.5]}, n_layers=4)
    table = pd.concat([shallow, deep], ignore_index=True)
    (tmp_path / "run").mkdir()
    table.to_parquet(tmp_path / "run" / "results.parquet")
    assert main(["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--mean-over", "model.n_layers"]) == 0
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "mean over model.n_layers (per seed, then mean [95% CI] over seeds)" in text
    assert "0.500 [" in text  # (0.4 + 0.5 + 0.6) / 3
    assert len(pd.read_parquet(tmp_path / "rep" / "mean_over.parquet")) == 1


def test_versus_pairs_only_series_of_the_same_settings_and_sparsity():
    si = _rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, n_layers=2)
    si_sparse = _rows("subtask_induction", 0.9, {99: [0.4, 0.5, 0.6]}, n_layers=2)
    rm = _rows("sampled_subnetwork", 0.75, {99: [0.3, 0.3, 0.3]}, n_layers=2)
    rm_sparse = _rows("sampled_subnetwork", 0.9, {99: [0.2, 0.2, 0.2]}, n_layers=2)
    deep = _rows("sampled_subnetwork", 0.75, {99: [0.1, 0.1, 0.1]}, n_layers=4)  # no subtask_induction at depth 4
    diffs = paired_differences(pd.concat([si, si_sparse, rm, rm_sparse, deep], ignore_index=True), "subtask_induction")
    by = diffs.set_index("label")["diff_mean"]
    assert by["sampled_subnetwork @0.75 [model.n_layers=2]"] == pytest.approx(0.3 - 0.6)
    assert by["sampled_subnetwork @0.9"] == pytest.approx(0.2 - 0.5)
    assert len(by) == 2  # depth 4 has no partner: left out, not paired with depth 2
