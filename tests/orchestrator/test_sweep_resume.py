"""SIGKILL the driver mid-sweep, resume, and get exactly the rows of an uninterrupted run."""

import collections
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import yaml

from orchestrator import results
from tests.conftest import tiny_raw

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
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


@pytest.mark.slow  # Ray, a minute or more on two cores
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    raw = tiny_raw(
        methods=["subtask_induction", "sampled_subnetwork", "scratch"],
        sparsities=[0.5, 0.8],
        data_fractions=[0.2, 0.6, 1.0],
        seeds=[0, 1],
        training={"epochs": 4},
        # Trials alone (`pack: 1`): their rows land one by one, so the kill falls between them (a
        # pack's rows land at once, and these tiny packs finish within one poll of each other).
        # Packs stopped and resumed: tests/orchestrator/test_worker.py, tests/methods/test_packing.py.
        resources={"pack": 1},
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


def _watch(stream, lines: list[str]) -> threading.Thread:
    """Collect `stream`'s lines into `lines` on a thread (so the child never blocks on a full pipe)."""

    def read():
        for line in stream:
            lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_sigkill_during_the_upstream_phase_then_resume(tmp_path):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep
    from orchestrator.trial import expand, upstream_keys

    raw = tiny_raw(
        methods=["subtask_induction", "sampled_subnetwork", "scratch"],
        sparsities=[0.3, 0.5, 0.8],
        # Three seeds on two slots: each seed's masks come from one discovery run, and the third
        # seed's run starts only when another ends, so the kill has a wide window between runs.
        seeds=[0, 1, 2],
        # upstream work of a few seconds per artifact, so that the kill can land between two of them
        task={"operand_range": 60, "n_base": 2000, "n_subtask": 600},
        source={"epochs": 20, "patience": None, "target_val_acc": None},
        discovery={"epochs": 30, "batch_size": 50},
    )
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump(raw))
    sweep = load_sweep(raw)
    keys = {key for spec in expand(sweep) for key in upstream_keys(sweep, spec)}
    assert len(keys) == 3 + 9

    out = tmp_path / "out"
    store_root = out / "artifacts"
    proc = _run(sweep_path, out, wait=False)
    lines: list[str] = []
    reader = _watch(proc.stderr, lines)
    deadline = time.time() + 300
    computed = 0
    while time.time() < deadline:
        if proc.poll() is not None:
            reader.join(5)
            pytest.fail("the sweep finished before it could be interrupted: " + "".join(lines)[-2000:])
        upstream_started = any("artifact(s) before the trials" in line for line in lines)
        computed = len(list((store_root / "computations").glob("*.json"))) if store_root.exists() else 0
        if upstream_started and computed >= 4:  # the sources and at least one discovery run's masks
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(5)
    assert 4 <= computed < len(keys), "the kill must land during the upstream phase"
    assert not list((out / "rows").glob("*.json")), "no trial had finished"

    _run(sweep_path, out)  # resume
    table = results.read(out / "results.parquet")
    assert len(table) == len(expand(sweep)) and (table["status"] == "done").all()
    counts = collections.Counter((c["kind"], c["key"]) for c in ArtifactStore(store_root).computations())
    assert set(counts) == keys, "every artifact was computed"
    assert max(counts.values()) == 1, f"an artifact was computed twice: {counts}"
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
