"""SIGKILL the driver mid-sweep, resume, and get exactly the rows of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from orchestrator import results
from tests.conftest import tiny_raw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("_s", "started_at", "finished_at", "_computed", "device", "worker")


def _run(sweep_path, out, wait=True):
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(sweep_path), "--out", str(out), "--num-cpus", "2"]
    cmd.append("--no-report")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    return proc


def _stable(table: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in table.columns if not c.endswith(VOLATILE)]
    return table[keep].sort_values("trial").reset_index(drop=True)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    raw = tiny_raw(
        methods=["subtask_induction", "sampled_subnetwork", "scratch"],
        sparsities=[0.5, 0.8],
        data_fractions=[0.2, 0.6, 1.0],
        seeds=[0, 1],
        training={"epochs": 4},
    )
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump(raw))

    interrupted = tmp_path / "interrupted"
    proc = _run(sweep_path, interrupted, wait=False)
    rows = interrupted / "rows"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(rows.glob("*.json"))) < 6:
        if proc.poll() is not None:
            pytest.fail("the sweep finished before it could be interrupted: " + proc.stderr.read()[-2000:])
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = len(list(rows.glob("*.json")))
    assert 6 <= finished_before < 30, "the kill must land mid-sweep"
    assert not (interrupted / "results.parquet").exists()

    _run(sweep_path, interrupted)  # resume
    reference = tmp_path / "reference"
    _run(sweep_path, reference)

    resumed = results.read(interrupted / "results.parquet")
    uninterrupted = results.read(reference / "results.parquet")
    assert len(resumed) == len(uninterrupted) == 30
    assert (resumed["status"] == "done").all()
    pd.testing.assert_frame_equal(_stable(resumed), _stable(uninterrupted))
    # The resumed run did not redo finished trials: their rows were kept as they were.
    tune_runs = sorted((interrupted / "tune").iterdir())
    assert len(tune_runs) == 2
    second_run_trials = [p for p in tune_runs[1].iterdir() if p.is_dir()]
    assert len(second_run_trials) <= 30 - finished_before + 2  # only unfinished ones (plus those in flight)
