"""Report statistics on synthetic result tables whose answers are known."""

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from orchestrator import results
from orchestrator.report import bootstrap_ci, budget_to_reach, curve_area, headline, summarise, write_report


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


def test_bootstrap_ci_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(0)
    covered = 0
    reps = 300
    for i in range(reps):
        lo, hi = bootstrap_ci(rng.normal(0.7, 0.1, size=20), n_boot=1000, seed=i)
        covered += lo <= 0.7 <= hi
    assert 0.88 <= covered / reps <= 0.99  # percentile bootstrap, n = 20: close to its nominal 95%


def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([]) != bootstrap_ci([])  # nan
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)


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
    assert row["test_acc_ci_lo"] >= 0.5 and row["test_acc_ci_hi"] <= 0.7
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
    assert si["ratio_vs_scratch"] == pytest.approx((10**2.5 - 1) / (10**1.5 - 1))
    assert not si["ratio_is_lower_bound"]
    assert si["area"] == pytest.approx(np.trapezoid([0.2, 0.8, 1.0], np.log10([1, 10, 100])) / 2)


def test_ratio_is_a_lower_bound_when_scratch_never_reaches_the_target():
    table = _table({"subtask_induction": {0: [0.5], 99: [0.95]}, "scratch": {0: [0.1], 99: [0.3]}}, 0.9)
    head = headline(table, target=0.9).set_index("method")
    assert head.loc["scratch", "n_to_target"] == float("inf")
    assert head.loc["subtask_induction", "ratio_is_lower_bound"]
    assert head.loc["subtask_induction", "ratio_vs_scratch"] == pytest.approx(
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


def test_transfer_variants_are_reported_as_separate_series():
    keep = _table({"subtask_induction": {99: [0.9, 0.9]}}, 0.75)
    reinit = _table({"subtask_induction": {99: [0.3, 0.3]}}, 0.75)
    keep["unmasked"], reinit["unmasked"] = "keep", "reinit"
    keep["trainable_subnetwork"] = reinit["trainable_subnetwork"] = False
    summary = summarise(pd.concat([keep, reinit], ignore_index=True)).set_index("method")
    assert summary.loc["subtask_induction", "test_acc_mean"] == pytest.approx(0.9)
    assert summary.loc["subtask_induction [reinit]", "test_acc_mean"] == pytest.approx(0.3)
