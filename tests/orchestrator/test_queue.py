"""A failing trial is retried, then recorded `failed` with its error; the sweep finishes the rest."""

import contextlib
import io
import re

import pytest
import yaml

from orchestrator import results
from orchestrator.cli import main
from tests.conftest import tiny_raw


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    import os

    import ray

    tmp = tmp_path_factory.mktemp("failing")
    attempts = tmp / "attempts"
    attempts.mkdir()
    os.environ["INSTILL_TEST_ATTEMPTS"] = str(attempts)
    raw = tiny_raw(
        plugins=["tests.plugins.faulty"],
        methods=["scratch", "explodes", "goes_nan"],
        data_fractions=[0.5],
        max_failures=1,
    )
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp / "out"
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        rc = main(["run", str(path), "--out", str(out), "--num-cpus", "2", "--no-report"])
    ray.shutdown()
    os.environ.pop("INSTILL_TEST_ATTEMPTS")
    return rc, out, attempts, console.getvalue()


def test_failed_trials_are_recorded_and_the_rest_finish(failing_sweep, capsys):
    rc, out, _, _ = failing_sweep
    assert rc == 1, "a sweep with failed trials exits non-zero"
    table = results.read(out / "results.parquet").set_index("method")
    assert table.loc["scratch", "status"] == "done"
    assert table.loc["explodes", "status"] == "failed"
    assert "deliberate failure" in table.loc["explodes", "error"]
    assert table.loc["goes_nan", "status"] == "failed"
    assert "NonFiniteLoss" in table.loc["goes_nan", "error"]


def test_failing_trial_is_retried_max_failures_times(failing_sweep):
    _, _, attempts, _ = failing_sweep
    assert len((attempts / "explodes").read_text()) == 2  # the first try and one retry


def test_status_shows_counts_and_errors(failing_sweep, capsys):
    _, out, _, _ = failing_sweep
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 done, 0 running, 0 pending, 2 failed" in text
    assert "explodes-f0.5-seed0: RuntimeError: deliberate failure" in text
    assert re.search(r"compute so far: trials 3 x, [\d.]+ h; total [\d.]+ h", text), text


def test_status_counts_the_compute_of_this_grids_artifacts_only():
    from orchestrator.status import compute_line

    records = [
        {"kind": "source", "key": "a", "seconds": 3600.0},
        {"kind": "mask", "key": "b", "seconds": 1800.0},
        {"kind": "mask", "key": "c", "seconds": 1800.0},
        {"kind": "mask", "key": "other", "seconds": 9e9},  # another sweep's, in a shared store
    ]
    line = compute_line(records, {("source", "a"), ("mask", "b"), ("mask", "c")}, 7200.0, 4)
    assert line.startswith("compute so far: mask 2 x, 1.00 h; source 1 x, 1.00 h; trials 4 x, 2.00 h; total 4.00 h")


def test_console_shows_the_live_summary_and_a_failure_list(failing_sweep):
    _, _, _, console = failing_sweep
    lines = [line for line in console.splitlines() if line.startswith("[instill] ")]
    pattern = r"\[instill\] \d+/3 done, \d+ running, \d+ pending, \d+ failed \| elapsed \S+ \| ETA \S+"
    assert lines and all(re.fullmatch(pattern, line) for line in lines if " done, " in line)
    assert any(line.startswith("[instill] 1/3 done, 0 running, 0 pending, 2 failed") for line in lines)
    assert "2 trial(s) failed:" in console and "deliberate failure" in console
