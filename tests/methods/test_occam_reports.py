"""OccamNets' exits analysis and report table (methods/occam_reports.py)."""

import math

import pandas as pd
import pytest
import torch

from methods.occam_reports import exit_shares, exits_table
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tasks import MODELS
from tasks.base import Split
from tests.tasks.models.test_occam import set_gates
from tests.tasks.test_shapes import vision_raw


def _occam():
    spec = MODELS.get("occam_resnet18")
    torch.manual_seed(0)
    return spec.build(spec.Config(name="occam_resnet18", width=4), n_classes=5, image_size=16)


@pytest.mark.parametrize("gates, taken", [((9.0, 9.0, 9.0, 9.0), 1), ((9.0, -9.0, 9.0, 9.0), 2), ((0, -9, -9, -9), 3)])
def test_exit_shares_count_the_exit_inference_takes(gates, taken):
    model = _occam()
    set_gates(model, gates)
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = model.eval()(x).argmax(-1)
    y[:3] = (y[:3] + 1) % 5  # three wrong answers
    shares = exit_shares(model, Split(x, {"y": y}), batch_size=5)
    assert shares[f"exit{taken}"] == 1.0 and sum(shares[f"exit{i}"] for i in (1, 2, 3)) == 1.0
    assert shares[f"exit{taken}_acc"] == pytest.approx(0.75)
    assert all(math.isnan(shares[f"exit{i}_acc"]) for i in (1, 2, 3) if i != taken)


def test_trials_report_exit_shares_for_occam_and_none_for_a_plain_resnet(tmp_path):
    raw = vision_raw(tmp_path, {"name": "occam_resnet18", "width": 4}, methods=["scratch"],
                     analyses=["occam_exits"], axes={"model.name": ["occam_resnet18", "resnet18"]})  # fmt: skip
    raw["task"] = {**raw["task"], "image_size": 16, "bias": {"feature": "both", "p": 0.9}}
    sweep = load_sweep(raw)
    store = ArtifactStore(tmp_path / "store")
    occam = run_trial(sweep, TrialSpec(method="scratch", axes={"model.name": "occam_resnet18"}, data_fraction=0.5,
                                       seed=0), store)  # fmt: skip
    for split in ("test", "bias_aligned"):
        shares = [occam[f"occam_exits_{split}_exit{i}"] for i in (1, 2, 3)]
        assert all(0 <= s <= 1 for s in shares) and sum(shares) == pytest.approx(1.0)
    plain = run_trial(sweep, TrialSpec(method="scratch", axes={"model.name": "resnet18"}, data_fraction=0.5,
                                       seed=0), store)  # fmt: skip
    assert plain["status"] == "done"
    assert plain.get("occam_exits_test_exit1") is None


def test_the_table_shows_each_series_with_exits_and_skips_the_rest():
    summary = pd.DataFrame(
        {
            "task": ["shapes", "shapes"],
            "label": ["scratch [model.name=occam_resnet18]", "scratch [model.name=resnet18]"],
            "n_train": [100, 100],
            **{f"occam_exits_test_exit{i}_mean": [m, float("nan")] for i, m in ((1, 0.5), (2, 0.25), (3, 0.25))},
            **{f"occam_exits_test_exit{i}_ci_lo": [0.1, float("nan")] for i in (1, 2, 3)},
            **{f"occam_exits_test_exit{i}_ci_hi": [0.9, float("nan")] for i in (1, 2, 3)},
        }
    )
    frame, shown = exits_table(summary)
    assert len(frame) == 1 and list(shown["label"]) == ["scratch [model.name=occam_resnet18]"]
    assert shown["test: exit1"].iloc[0] == "0.50 [0.10, 0.90]"
    assert exits_table(summary.drop(columns=[c for c in summary if c.startswith("occam")])) is None
