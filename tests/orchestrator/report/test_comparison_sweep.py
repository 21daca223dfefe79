"""Every system of the seeds side by side in ONE sweep through Ray, then one report: the comparison
platform end to end on a tiny cued shapes task, with the architecture as an axis."""

import json

import pandas as pd
import pytest

from orchestrator import results
from orchestrator.config import load_sweep
from orchestrator.report import write_report
from orchestrator.sweep import run_sweep
from tests.tasks.test_shapes import vision_raw

pytestmark = pytest.mark.slow

SYSTEMS = ["subtask_induction", "sampled_subnetwork", "full_transfer", "l2sp", "guidance", "naive_finetune",
           "llrt", "lpft", "cbft", "linearized_gp", "scratch"]  # fmt: skip


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    import ray

    from orchestrator.sweep import start_ray

    tmp = tmp_path_factory.mktemp("comparison")
    raw = vision_raw(
        tmp,
        {"name": "resnet18", "width": 4},
        name="comparison",
        methods=SYSTEMS,
        axes={"model.name": ["resnet18", "occam_resnet18"]},
        analyses=["lmc_barrier", {"name": "representation_r2", "n": 20}],
        lpft={"probe_epochs": 1},
        seeds=[0, 1],
    )
    raw["task"] = {**raw["task"], "image_size": 16, "cue": {"kind": "box", "fraction": 0.6}}
    sweep = load_sweep(raw)
    start_ray(num_cpus=2)
    try:
        outcome = run_sweep(sweep, tmp / "out")
    finally:
        ray.shutdown()
    return tmp / "out", outcome


def test_every_system_runs_in_one_sweep_on_both_architectures(comparison):
    out, outcome = comparison
    assert outcome.failed == 0 and outcome.ran == len(SYSTEMS) * 2 * 2
    table = results.read(out / "results.parquet")
    assert (table["status"] == "done").all()
    pairs = {(m, json.loads(c)["model"]["name"]) for m, c in zip(table["method"], table["config_json"], strict=True)}
    assert pairs == {(m, a) for m in SYSTEMS for a in ("resnet18", "occam_resnet18")}
    for column in ("splits_cue_acc", "splits_randomised_cue_acc", "splits_randomised_image_acc", "shape_bias",
                   "representation_r2_layers"):  # fmt: skip
        assert table[column].notna().all(), column
    gp = table["method"] == "linearized_gp"
    # No barrier for the GP (no weight-space point) nor where only the head moved (0 by construction):
    # LLRT always, LPFT when it keeps its probed model.
    none = gp | (table["lmc_barrier_head_only"] == 1)
    assert table.loc[none, "lmc_barrier"].isna().all() and table.loc[~none, "lmc_barrier"].notna().all()
    assert (table.loc[table["method"] == "llrt", "lmc_barrier_head_only"] == 1).all()
    assert (table.loc[gp, "epochs_run"] == 0).all()  # no gradient training
    occam = table["config_json"].str.contains('"occam_resnet18"')
    logged = table.loc[occam & (table["method"] == "scratch"), "measurements_json"]
    assert logged.str.contains("exit1_gate").all()  # the Occam objective trained it


def test_one_report_holds_every_system(comparison):
    out, _ = comparison
    report = write_report([out])
    summary = pd.read_parquet(report / "summary.parquet")
    assert {m for m in SYSTEMS} <= set(summary["method"])
    assert summary["label"].nunique() == len(SYSTEMS) * 2  # one series per system and architecture
    assert (report / "representation_r2_profile.svg").exists()
    assert (report / "lmc_barrier.svg").exists()
