"""Graceful stops: SIGINT/SIGTERM on the driver, and the stop request as the workers see it.

On the first signal (SLURM, Kubernetes and spot preemption send SIGTERM; Ctrl-C SIGINT) the driver:

1. launches no new trial (the trial queue, `orchestrator.queue`, reports itself finished);
2. asks running trials to stop through a flag in a small named Ray actor, read by each trial at the
   end of every epoch (`requested()`): it saves a checkpoint and ends with stage `interrupted`;
3. waits for them at most `grace_s` seconds, writes every finished row and results.parquet, and
   exits 130 (SIGINT) or 143 (SIGTERM) with the command that resumes.

A second signal, the end of the grace period, or Ray's own processes stopping stops at once: rows
already written are kept, results.parquet is rebuilt from them, and the process exits.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

ACTOR = "instill-stop"
_CHECK_EVERY_S = 1.0
_cache = {"checked": -1e9, "value": False, "handle": None}


def requested() -> bool:
    """Whether the driver asked running trials to stop. Cheap: asks the flag actor at most once a
    second, and is False outside a Ray sweep."""
    now = time.monotonic()
    if now - _cache["checked"] < _CHECK_EVERY_S:
        return _cache["value"]
    _cache["checked"] = now
    try:
        import ray

        if not ray.is_initialized():
            return False
        if _cache["handle"] is None:
            _cache["handle"] = ray.get_actor(ACTOR)
        _cache["value"] = bool(ray.get(_cache["handle"].requested.remote(), timeout=10))
    except Exception:  # no flag actor (not in a sweep), or it is gone with its driver: not a request
        _cache["handle"] = None
        _cache["value"] = False
    return _cache["value"]


_driver = {"stopping": False}  # this driver process's own state (set by GracefulStop)


def driver_stopping() -> bool:
    """On the driver: whether the running sweep is stopping. A plain module function, so that Tune
    can pickle the callbacks that ask it."""
    return _driver["stopping"]


def _flag_class():
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        def __init__(self):
            self.value = False

        def set(self, value: bool) -> None:
            self.value = value

        def requested(self) -> bool:
            return self.value

    return StopFlag


class GracefulStop:
    """The driver's signal handling for one sweep (install, then restore when the sweep ends).
    `finish_now(signum)` stops at once: it must write what is finished and end the process."""

    def __init__(self, grace_s: float, finish_now: Callable[[int], None]):
        self.grace_s = grace_s
        self.finish_now = finish_now
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._flag = None
        self._timer: threading.Timer | None = None
        self._gcs: str | None = None

    @property
    def stopping(self) -> bool:
        return self.signum is not None

    def install(self) -> GracefulStop:
        """Take over SIGINT and SIGTERM (main thread only; elsewhere the process keeps its handlers)."""
        _driver["stopping"] = self.stopping
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, self._handle)
        return self

    def connect(self) -> None:
        """Once Ray is up: create the flag the trials read (set already if a signal came first), and
        install our handlers again, in front of the native SIGTERM handler Ray's core worker installs."""
        import ray

        self.install()
        flag = _flag_class().options(name=ACTOR, get_if_exists=True, lifetime=None).remote()
        ray.get(flag.set.remote(self.stopping))
        try:
            self._gcs = ray.get_runtime_context().gcs_address
        except Exception:  # not offered by this Ray version: no watch
            self._gcs = None  # also clears a flag left set by an earlier sweep of this process
        self._flag = flag

    def restore(self) -> None:
        _driver["stopping"] = False
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._flag is not None:
            with contextlib.suppress(Exception):
                import ray

                ray.kill(self._flag)
            self._flag = None

    def request(self, signum: int) -> None:
        """The first stop: no new trials; running ones checkpoint and end; the grace timer starts."""
        self.signum = signum
        _driver["stopping"] = True
        name = signal.Signals(signum).name
        print(
            f"\n[instill] {name}: stopping. No new trials start; running trials save a checkpoint at the end "
            f"of their epoch (up to {self.grace_s:.0f} s). Signal again to stop at once.",
            file=sys.stderr,
            flush=True,
        )
        if self._flag is not None:
            self._flag.set.remote(True)
        self._timer = threading.Timer(self.grace_s, self._grace_over)
        self._timer.daemon = True
        self._timer.start()
        threading.Thread(target=self._watch_ray, name="instill-stop-watch", daemon=True).start()

    def _watch_ray(self) -> None:
        """Stop at once when a signal to the whole process group stopped the local Ray too, watched by
        connecting to Ray's GCS port (a call through Ray would block on the dead GCS)."""
        host, _, port = (self._gcs or "").rpartition(":")
        if not host:
            return
        while self._previous:  # until restore()
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
            except OSError:
                print(
                    "[instill] Ray stopped as well (the signal reached its processes): stopping now.",
                    file=sys.stderr,
                    flush=True,
                )
                self.finish_now(self.signum or signal.SIGTERM)
                return
            time.sleep(1.0)

    def _grace_over(self) -> None:
        print(f"[instill] grace period of {self.grace_s:.0f} s over: stopping now.", file=sys.stderr, flush=True)
        self.finish_now(self.signum or signal.SIGTERM)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.request(signum)
        else:
            print(f"\n[instill] {signal.Signals(signum).name} again: stopping now.", file=sys.stderr, flush=True)
            self.finish_now(self.signum)
