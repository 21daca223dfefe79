"""Graceful stops of `instill run`: SIGTERM/SIGINT write every finished row and results.parquet,
print the command that resumes, exit 143/130, and print no native stack trace; a second signal (or
a signal that also stopped Ray) stops at once; the next run finishes the sweep."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_raw

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NATIVE = ("SIGTERM received", "Aborted", "Traceback", "logging.cc", "PC: @")


def _sweep(tmp_path):
    # Trials of a few seconds each, so that some are running when the signal comes.
    raw = tiny_raw(
        methods=["scratch", "full_transfer"],
        data_fractions=[0.5, 1.0],
        seeds=[0, 1, 2],
        training={"epochs": 40},
        # Trials alone, which checkpoint when stopped (a pack: tests/orchestrator/test_worker.py).
        resources={"pack": 1},
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _start(sweep, out, *extra):
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(sweep), "--out", str(out), "--num-cpus", "2"]
    return subprocess.Popen(
        [*cmd, "--no-report", *extra],
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a shell job or a batch step would be
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_rows(proc, out, n):
    deadline = time.time() + 300
    while len(glob.glob(f"{out}/rows/*.json")) < n:
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail("the sweep ended before it could be stopped: " + proc.stderr.read()[-2000:])
        time.sleep(0.2)


def _rows(out):
    return {os.path.basename(p): json.loads(open(p).read()) for p in glob.glob(f"{out}/rows/*.json")}


@pytest.mark.slow  # Ray in a subprocess, about a minute on two cores
@pytest.mark.parametrize(
    "signum, to_group, twice",
    [
        (signal.SIGTERM, False, False),  # Kubernetes, SLURM --signal=B:TERM: the driver only
        (signal.SIGINT, True, False),  # Ctrl-C: the whole foreground process group
        (signal.SIGTERM, False, True),  # a second signal: stop at once
    ],
    ids=["term-driver", "int-group", "term-twice"],
)
def test_a_signal_stops_the_sweep_gracefully_and_the_next_run_finishes_it(tmp_path, signum, to_group, twice):
    sweep, out = _sweep(tmp_path), tmp_path / "out"
    proc = _start(sweep, out)
    _wait_for_rows(proc, out, 2)
    send = (lambda s: os.killpg(proc.pid, s)) if to_group else (lambda s: os.kill(proc.pid, s))
    send(signum)
    sent = time.monotonic()
    if twice:
        time.sleep(0.5)
        send(signum)
    stdout, stderr = proc.communicate(timeout=300)
    took = time.monotonic() - sent

    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert not [marker for marker in NATIVE if marker in stderr], stderr[-3000:]
    assert f"{signal.Signals(signum).name}: stopping" in stderr
    assert f"instill run {sweep} --out {out}" in stderr, "the command that resumes"
    if twice:
        assert took < 30, f"a second signal stops at once (took {took:.0f} s)"
    table = pd.read_parquet(out / "results.parquet")
    before = _rows(out)
    done = table[table["status"] == "done"]
    assert len(done) == len(before) >= 2, "every finished row is in results.parquet"
    assert (table["status"] != "failed").all(), "a trial stopped on request is not a failure"
    assert len(table) == 12 and (table["status"] == "pending").any(), "stopped mid-sweep"
    assert not (out / "driver.lock").exists(), "the lease is released"
    if to_group or twice:
        return  # the resume is the same for every way of stopping: checked once

    resumed = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(sweep), "--out", str(out), "--num-cpus", "2"]
        + ["--no-report"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = pd.read_parquet(out / "results.parquet")
    assert (final["status"] == "done").all() and len(final) == 12
    after = _rows(out)
    assert {k: after[k] for k in before} == before, "rows finished before the stop are kept as they were"
