"""calibration: NLL and 15-bin ECE of the predicted probabilities on test, read through
`predict_proba` where a model has one; the reliability diagram pools the bins over seeds."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from methods.analyses.calibration import BINS, bins, calibration, expected_calibration_error, pooled
from methods.analysis import ANALYSES, AnalysisContext
from methods.reports import REPORTS, ReportContext
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tasks.base import Split, StageData
from tests.conftest import tiny_raw


class Fixed(nn.Module):
    """Returns the logits stored for each input index (x holds indices)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x):
        return self.table[x.long().view(-1)]


class WithProba(Fixed):
    def __init__(self, logits, probs):
        super().__init__(logits)
        self.register_buffer("probs", probs)

    def predict_proba(self, x):
        return self.probs[x.long().view(-1)]


def _ctx(y, name="test"):
    x = torch.arange(len(y)).float().view(-1, 1)
    data = StageData(train=Split(x[:1], {"y": y[:1]}), val=Split(x[:1], {"y": y[:1]}), evals={name: Split(x, {"y": y})})
    task = type("T", (), {"name": "t"})()
    return AnalysisContext(task=task, data=data, artifacts={}, fresh_model=None, generator=torch.Generator(),
                           device=torch.device("cpu"), eval_batch_size=7, method="m")  # fmt: skip


def _reference(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """NLL and ECE written out independently (numpy, bins by searchsorted on the edges)."""
    nll = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12))))
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, BINS + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, BINS - 1)
    ece = 0.0
    for b in range(BINS):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return nll, ece


def test_nll_and_ece_match_a_reference():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(5, (200,), generator=gen)
    out = calibration(_ctx(y), Fixed(logits), None)
    nll, ece = _reference(torch.softmax(logits, 1).numpy(), y.numpy())
    assert out["calibration_nll"] == pytest.approx(nll, abs=1e-12)
    assert out["calibration_ece"] == pytest.approx(ece, abs=1e-12)
    table = json.loads(out["calibration_bins"])
    assert len(table) == BINS and sum(c for c, _, _ in table) == 200
    ANALYSES.get("calibration").check(out)  # every column declared


def test_predict_proba_is_read_where_the_model_has_it():
    y = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    probs = torch.full((4, 2), 0.5, dtype=torch.float64)
    out = calibration(_ctx(y), WithProba(logits, probs), None)
    assert out["calibration_nll"] == pytest.approx(math.log(2))
    assert out["calibration_ece"] == pytest.approx(0.0)  # half right at confidence 0.5
    assert calibration(_ctx(y), Fixed(logits), None)["calibration_nll"] > 2  # the logits' own softmax


def test_bin_edges_and_perfect_calibration():
    conf = torch.tensor([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0], dtype=torch.float64)
    table = bins(conf, torch.tensor([True, False, True, True]))
    assert [c for c, _, _ in table][:2] == [2, 1] and table[-1][0] == 1  # (b/15, (b+1)/15], 0 in the first
    assert expected_calibration_error([[10, 0.7, 0.7], [0, math.nan, math.nan], [30, 0.9, 0.9]]) == 0.0
    assert expected_calibration_error([[10, 0.5, 1.0], [30, 0.9, 0.9]]) == pytest.approx(0.125)


def test_a_task_without_a_test_split_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a task with a test split"):
        calibration(_ctx(torch.tensor([0, 1]), name="other"), Fixed(torch.zeros(2, 2)), None)


def test_every_trial_of_a_classification_task_runs_it(tmp_path):
    sweep = load_sweep(tiny_raw(methods=["scratch"]))
    assert "calibration" in [name for name, _ in sweep.analysis_list()]
    row = run_trial(sweep, TrialSpec(method="scratch", data_fraction=0.5, seed=0), ArtifactStore(tmp_path))
    assert row["status"] == "done" and row["calibration_nll"] > 0 and 0 <= row["calibration_ece"] <= 1


def test_the_reliability_diagram_pools_seeds_at_the_largest_budget():
    def row(method, n, seed, table):
        return {"method": method, "n_train": n, "seed": seed, "status": "done", "calibration_bins": json.dumps(table)}

    empty = [[0, math.nan, math.nan]] * BINS
    a = [[0, math.nan, math.nan]] * (BINS - 1) + [[10, 0.98, 1.0]]
    b = [[0, math.nan, math.nan]] * (BINS - 1) + [[30, 0.96, 0.9]]
    small = [[5, 0.01, 1.0]] + [[0, math.nan, math.nan]] * (BINS - 1)
    table = pd.DataFrame([row("gp", 300, 0, a), row("gp", 300, 1, b), row("gp", 20, 0, small), row("s", 20, 0, empty)])
    panels = {p["method"]: p for p in pooled(table)}
    gp = panels["gp"]
    assert (gp["n"], gp["seeds"]) == (300, 2)
    count, conf, acc = gp["bins"][-1]
    assert count == 40 and conf == pytest.approx((10 * 0.98 + 30 * 0.96) / 40) and acc == pytest.approx(0.925)
    assert gp["bins"][0][0] == 0  # the n = 20 row is not pooled
    assert math.isnan(panels["s"]["ece"])
    ctx = ReportContext(summary=pd.DataFrame(), table=table, artifacts=lambda kind: [], differences=lambda c: [])
    (figure,) = REPORTS.get("calibration_reliability")(ctx)
    assert figure.name == "calibration_reliability" and figure.figure is not None
    assert REPORTS.get("calibration_reliability")(ReportContext(pd.DataFrame(), pd.DataFrame(), None, None)) == []
