"""The output directory of a sweep, and its rows.

    OUT/sweep.json               the current version of the sweep (its resolved config)
    OUT/sweeps/<hash>.json       every version of the sweep that ran here
    OUT/rows/<trial_hash>.json   one row per finished (or finally failed) trial, by trial identity
    OUT/results.parquet          the rows of the current grid, rebuilt at the end of each run
    OUT/artifacts/               source models and masks (unless storage.artifacts points elsewhere)
    OUT/tune/                    Ray Tune's own experiment state and per-trial logs
    OUT/driver.lock              the lease of the driver running here (`orchestrator.lease`)

OUT is a local or shared (NFS) path, or an object-store URI (`s3://bucket/prefix`, `gs://...`):
`OutDir` reads and writes it through its pyarrow file system, with whole-object writes.

A row is named by the hash of its trial's identity (method, grid point and every setting it ran
with), so a new version of a sweep reuses every row whose trial it shares.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from common.provenance import code_version
from orchestrator.artifacts import ArtifactStore, open_filesystem
from orchestrator.config import ConfigError, SweepConfig, import_plugins, plugin_paths
from orchestrator.trial import TrialSpec, trial_hash


class OutDir:
    """A sweep's output directory: a local path or an object-store URI."""

    def __init__(self, location: str | Path | OutDir):
        if isinstance(location, OutDir):
            location = location.uri
        text = str(location)
        self.fs, self.root, self.posix = open_filesystem(text)
        self.uri = self.root if self.posix else text.rstrip("/")

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"OutDir({self.uri!r})"

    @property
    def local(self) -> Path | None:
        """The directory as a local path, or None on object storage."""
        return Path(self.root) if self.posix else None

    def path(self, name: str) -> str:
        """`name` (relative, '/'-separated) as a path inside the file system."""
        return f"{self.root}/{name}"

    def join(self, name: str) -> str:
        """`name` as a location to hand to another tool: a local path or a URI."""
        if self.posix:
            return self.path(name)
        base, _, query = self.uri.partition("?")
        return f"{base}/{name}" + (f"?{query}" if query else "")

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def read_text(self, name: str) -> str | None:
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write atomically: a temporary name renamed into place (locally); a whole object (object stores)."""
        path = self.path(name)
        if self.posix:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(name))

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Names (relative to OUT) of the files directly in `folder` ending in `suffix`."""
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True)
        prefix = len(self.root) + 1
        return sorted(
            info.path[prefix:]
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith(suffix)
        )

    def makedirs(self) -> None:
        self.fs.create_dir(self.root, recursive=True)

    def lease(self, **kwargs):
        """The lease of this directory's driver (`orchestrator.lease.Lease`)."""
        from orchestrator.lease import Lease

        return Lease(self.fs, self.root, posix=self.posix, display=self.uri, **kwargs)


def as_outdir(out: str | Path | OutDir) -> OutDir:
    return out if isinstance(out, OutDir) else OutDir(out)


class SweepMismatch(ConfigError):
    """The output directory holds a different sweep."""


def prepare_out_dir(
    sweep: SweepConfig, out_dir: str | Path | OutDir, force: bool = False, overrides: Sequence[str] = ()
) -> None:
    """Create OUT, or check that it holds a version of this same sweep (same name). Never deletes
    a row: rows of other versions stay and are reused where their trials recur. sweep.json records
    the `overrides` (`--set`) as given and where the plug-ins were found (`read_sweep` imports them)."""
    out = as_outdir(out_dir)
    previous_text = out.read_text("sweep.json")
    if previous_text is not None:
        previous = json.loads(previous_text)
        if previous.get("name") != sweep.name and not force:
            raise SweepMismatch(
                f"{out} holds a different sweep ({previous.get('name')!r}); pass another --out, or "
                f"--force to run {sweep.name!r} there (finished trials they share are reused)"
            )
    out.makedirs()
    if out.posix:
        for folder in ("rows", "sweeps"):
            (out.local / folder).mkdir(exist_ok=True)
    for folder, suffix in (("rows", ".running"), ("rows", ".tmp"), ("sweeps", ".tmp"), ("", ".tmp")):
        for stale in out.list(folder, suffix):  # left by a driver that was killed
            out.delete(stale)
    record = {"name": sweep.name, "config_hash": sweep.config_hash, "config": sweep.canonical()}
    record = json.dumps({**record, "overrides": list(overrides), "plugin_paths": plugin_paths(sweep.plugins),
                         "invocation": invocation()}, indent=1)  # fmt: skip
    out.write_text(f"sweeps/{sweep.config_hash}.json", record)
    out.write_text("sweep.json", record)


def cpu_model() -> str:
    """This machine's CPU model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    with contextlib.suppress(OSError):
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]  # fmt: skip
        if models:
            return models[0]
    return platform.processor() or platform.machine()


def invocation() -> dict[str, Any]:
    """What the report's provenance needs of this run and no row holds: the command line, when, the
    driver's code version, and its machine (CPU model, GPU names from `nvidia-smi`, if any)."""
    cpu = cpu_model()
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
            gpus = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.split("\n")
            gpus = [g.strip() for g in gpus if g.strip()]
    return {"argv": list(sys.argv), "cwd": os.getcwd(), "started": time.time(), "code_version": code_version(),
            "machine": {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "gpus": gpus,
                        "platform": platform.platform()}}  # fmt: skip


def read_sweep(out_dir: str | Path | OutDir) -> tuple[dict[str, Any] | None, list[str]]:
    """OUT/sweep.json (None if there is none) with its plug-ins imported from where the run found
    them, and why each that cannot be imported here cannot."""
    text = as_outdir(out_dir).read_text("sweep.json")
    record = json.loads(text) if text is not None else None
    problems: list[str] = []
    found = (record or {}).get("plugin_paths", {})
    for module in ((record or {}).get("config") or {}).get("plugins", []):
        import_plugins([module], problems, (Path(found[module]),) if module in found else ())
    return record, problems


def row_name(key: str) -> str:
    return f"rows/{key}.json"


def write_row(out_dir: str | Path | OutDir, row: dict[str, Any]) -> None:
    as_outdir(out_dir).write_text(row_name(row["trial_hash"]), json.dumps(row, default=str))


def read_row(out_dir: str | Path | OutDir, sweep: SweepConfig, spec: TrialSpec) -> dict[str, Any] | None:
    """The stored row of `spec`'s trial in this sweep, or None."""
    text = as_outdir(out_dir).read_text(row_name(trial_hash(sweep, spec)))
    return json.loads(text) if text is not None else None


def mark_running(out_dir: str | Path | OutDir, key: str, running: bool = True) -> None:
    """Mark (or unmark) the trial `key` as running, for `instill status`."""
    out = as_outdir(out_dir)
    if running:
        out.write_bytes(f"rows/{key}.running", b"")
    else:
        out.delete(f"rows/{key}.running")


def is_running(out_dir: str | Path | OutDir, key: str) -> bool:
    return as_outdir(out_dir).exists(f"rows/{key}.running")


def store_for(sweep: SweepConfig, out_dir: str | Path | OutDir) -> ArtifactStore:
    return ArtifactStore(sweep.storage.artifacts or as_outdir(out_dir).join("artifacts"))
