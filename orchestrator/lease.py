"""One driver per output directory: a lease on OUT/driver.lock, kept alive by a heartbeat.

The lease is a small JSON record (host, process id, random token, start and heartbeat) on OUT's own
file system, so it holds on a local disk, NFS and object storage (`s3://`, `gs://`):

- A new lease is created exclusively (`O_CREAT | O_EXCL`); on object stores it is written, then
  read back after a settling pause: the last writer wins.
- The holder rewrites it every `heartbeat_s` seconds, first checking the token is still its own; a
  holder that finds another token has lost it and is told so through `on_lost` (it stops launching
  trials; rows are written whole by trial identity, so a trial run twice is never corrupted).
- A lease is stale, and taken over, when its holder is gone: on the same host, when its process no
  longer exists; from another host, when its heartbeat has not moved for `ttl_s` seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from filelock import FileLock

from orchestrator.config import ConfigError

LEASE = "driver.lock"


class DirectoryBusy(ConfigError):
    """Another live driver holds the output directory."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float
    beats: int
    command: str = ""

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, process {self.pid}, since {started}"


class Lease:
    """The lease of one output directory (`fs`, `root`: its pyarrow file system and path)."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        *,
        posix: bool,
        display: str,
        ttl_s: float = 30.0,
        heartbeat_s: float = 5.0,
        settle_s: float = 2.0,
        on_lost: Callable[[Holder | None], None] | None = None,
    ):
        self.fs, self.path, self.posix, self.display = fs, f"{root}/{LEASE}", posix, display
        self.ttl_s, self.heartbeat_s, self.settle_s = ttl_s, heartbeat_s, settle_s
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def read(self) -> Holder | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                record = json.loads(f.read())
            return Holder(**record)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            # Half-written by a driver killed mid-write (object stores never show that; local
            # writes are atomic renames), or written by something else: treat as stale.
            return Holder(host="?", pid=-1, token="unreadable", started=0.0, heartbeat=0.0, beats=-1)

    def judge(self, holder: Holder) -> str:
        """'live', 'stale' (its driver is gone), or 'changed' (the lease changed hands while watched).
        A remote holder is watched for up to `ttl_s` seconds: a live one beats within `heartbeat_s`."""
        if holder.token == "unreadable":
            return "stale"
        if holder.host == socket.gethostname():
            return "live" if _process_exists(holder.pid) else "stale"
        deadline = time.monotonic() + self.ttl_s
        while time.monotonic() < deadline:
            time.sleep(min(self.heartbeat_s, max(0.0, deadline - time.monotonic())))
            now = self.read()
            if now is None or now.token != holder.token:
                return "changed"
            if now.beats != holder.beats:
                return "live"
        return "stale"

    def acquire(self) -> None:
        """Take the lease, taking over a stale one; raise DirectoryBusy if a live driver holds it."""
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        # On POSIX paths contenders take turns (reading, removing a stale lease, creating): without
        # it, one could move away the lease another has just created in place of the same stale one.
        with FileLock(self.path + ".turn") if self.posix else contextlib.nullcontext():
            self._acquire()

    def _acquire(self) -> None:
        for _ in range(5):
            holder = self.read()
            if holder is not None:
                verdict = self.judge(holder)
                if verdict == "live":
                    raise DirectoryBusy(self._busy_message(holder))
                if verdict == "changed":
                    continue
                self._remove_stale(holder)
            if self._create():
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="instill-lease", daemon=True)
                self._thread.start()
                return
        holder = self.read()
        raise DirectoryBusy(self._busy_message(holder) if holder else f"{self.display}: could not take the lease")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        if self.held:
            holder = self.read()
            if holder is not None and holder.token == self.token:
                self.fs.delete_file(self.path)
            self.held = False

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> dict[str, Any]:
        return dataclasses.asdict(
            Holder(
                host=socket.gethostname(),
                pid=os.getpid(),
                token=self.token,
                started=self.started,
                heartbeat=time.time(),
                beats=self.beats,
                command=" ".join(sys.argv)[:500],
            )
        )

    def _create(self) -> bool:
        if self.posix:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(self._record()).encode())
            return True
        self._write()
        time.sleep(self.settle_s)  # another driver writing at the same moment: the last writer wins
        holder = self.read()
        return holder is not None and holder.token == self.token

    def _remove_stale(self, holder: Holder) -> None:
        if not self.posix:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self.path)
            return
        # A rename is atomic: of two drivers taking over the same stale lease, one moves it away.
        moved = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        try:
            taken = json.loads(Path(moved).read_text()).get("token")
        except (OSError, ValueError):
            taken = "unreadable"
        if taken not in (holder.token, "unreadable"):
            # The lease changed hands between our read and the rename: put the live one back,
            # unless yet another driver has created one meanwhile (a link never overwrites).
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
        os.unlink(moved)

    def _write(self) -> None:
        data = json.dumps(self._record()).encode()
        if self.posix:
            tmp = f"{self.path}.tmp-{self.token[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.read()
                if holder is None or holder.token != self.token:
                    self.held = False
                    if self.on_lost is not None:
                        self.on_lost(holder)
                    return
                self.beats += 1
                self._write()
            except OSError:
                continue  # a transient storage error: the next beat tries again (ttl_s >> heartbeat_s)

    def _busy_message(self, holder: Holder) -> str:
        age = max(0.0, time.time() - holder.heartbeat)
        return (
            f"{self.display} is in use by another `instill run` ({holder.describe()}; last heartbeat "
            f"{age:.0f} s ago). Watch it with `instill status {self.display}`; to run here instead, stop "
            f"it first (`kill -TERM {holder.pid}` on {holder.host}: it writes its finished rows and exits), "
            "or pass another --out."
        )


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
