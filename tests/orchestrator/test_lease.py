"""One driver per output directory: the lease on OUT/driver.lock, locally and on object storage."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from orchestrator.lease import DirectoryBusy, Holder
from orchestrator.outdir import OutDir
from tests.conftest import moto_s3, tiny_raw

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FAST = dict(ttl_s=1.0, heartbeat_s=0.1, settle_s=0.3)


def _write_holder(out: OutDir, **fields) -> Holder:
    holder = Holder(
        **{
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": "someone-else",
            "started": time.time(),
            "heartbeat": time.time(),
            "beats": 0,
            **fields,
        }
    )
    out.write_text("driver.lock", json.dumps(dataclasses.asdict(holder)))
    return holder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_driver_is_refused_with_the_holders_host_and_pid(tmp_path):
    out = OutDir(tmp_path)
    with out.lease(**FAST):
        with pytest.raises(DirectoryBusy) as err:
            out.lease(**FAST).acquire()
    message = str(err.value)
    assert socket.gethostname() in message and str(os.getpid()) in message
    assert f"instill status {tmp_path}" in message
    assert not out.exists("driver.lock"), "released on exit"


def test_the_holder_keeps_its_lease_alive(tmp_path):
    out = OutDir(tmp_path)
    with out.lease(**FAST) as lease:
        first = lease.read()
        time.sleep(0.5)
        later = lease.read()
    assert later.token == first.token and later.beats > first.beats and later.heartbeat > first.heartbeat


def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    out = OutDir(tmp_path)
    _write_holder(out, pid=_dead_pid())
    start = time.monotonic()
    with out.lease(**FAST) as lease:
        assert lease.read().token == lease.token
    assert time.monotonic() - start < FAST["ttl_s"], "no need to wait for a heartbeat"


def test_a_silent_lease_from_another_host_is_taken_over_after_its_ttl(tmp_path):
    out = OutDir(tmp_path)
    _write_holder(out, host="elsewhere", heartbeat=time.time() - 3600)
    start = time.monotonic()
    with out.lease(**FAST) as lease:
        assert lease.read().token == lease.token
    assert time.monotonic() - start >= FAST["ttl_s"]


def test_a_beating_lease_from_another_host_is_respected(tmp_path, monkeypatch):
    out = OutDir(tmp_path)
    other = out.lease(**FAST)
    monkeypatch.setattr(socket, "gethostname", lambda: "elsewhere")
    other.acquire()  # recorded as held from host "elsewhere", beating in a thread
    monkeypatch.undo()
    try:
        with pytest.raises(DirectoryBusy, match="host elsewhere"):
            out.lease(**FAST).acquire()
    finally:
        other.release()


def test_a_holder_that_loses_its_lease_is_told(tmp_path):
    out = OutDir(tmp_path)
    lost = threading.Event()
    with out.lease(**FAST, on_lost=lambda holder: lost.set()):
        _write_holder(out, token="usurper")
        assert lost.wait(2.0)
    assert json.loads(out.read_text("driver.lock"))["token"] == "usurper", "never deletes another's lease"


def test_an_unreadable_lease_is_stale(tmp_path):
    out = OutDir(tmp_path)
    out.write_text("driver.lock", "{not json")
    with out.lease(**FAST) as lease:
        assert lease.read().token == lease.token


def test_two_drivers_racing_on_a_stale_local_lease_one_wins(tmp_path):
    out = OutDir(tmp_path)
    _write_holder(out, pid=_dead_pid())
    results, barrier = [], threading.Barrier(4)

    def contend():
        lease = out.lease(**FAST)
        barrier.wait()
        try:
            lease.acquire()
            results.append(lease)
        except DirectoryBusy:
            results.append(None)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    winners[0].release()


def test_on_object_storage_one_of_two_racing_drivers_wins():
    with moto_s3("instill-lease") as (endpoint, _):
        out = OutDir(f"s3://instill-lease/out?endpoint_override={endpoint}&scheme=http&region=us-east-1")
        out.makedirs()
        results, barrier = [], threading.Barrier(2)

        def contend():
            lease = out.lease(ttl_s=2.0, heartbeat_s=0.2, settle_s=1.0)
            barrier.wait()
            try:
                lease.acquire()
                results.append(lease)
            except DirectoryBusy:
                results.append(None)

        threads = [threading.Thread(target=contend) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, "the last writer wins; the other reads back a foreign token"
        assert out.lease().read().token == winners[0].token
        winners[0].release()
        assert not out.exists("driver.lock")


def test_instill_run_on_a_held_directory_exits_2_and_names_the_holder(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(tiny_raw()))
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from orchestrator.outdir import OutDir; "
            f"lease = OutDir({str(out)!r}).lease(); lease.acquire(); print('held', flush=True); time.sleep(120)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        run = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", str(sweep), "--out", str(out), "--no-report"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2, run.stderr
        assert f"process {holder.pid}" in run.stderr and "instill status" in run.stderr
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "rows").exists() or not list((out / "rows").iterdir()), "the refused run wrote nothing"


def test_creating_a_lease_never_overwrites_an_existing_one(tmp_path):
    # Between reading a stale lease and creating its own, another driver may have created one.
    out = OutDir(tmp_path)
    _write_holder(out, token="first")
    lease = out.lease(**FAST)
    assert lease._create() is False
    assert json.loads(out.read_text("driver.lock"))["token"] == "first"
