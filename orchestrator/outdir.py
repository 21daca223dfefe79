"""The output directory of a sweep, and its rows.

    OUT/sweep.json               the current version of the sweep (its resolved config)
    OUT/sweeps/<hash>.json       every version of the sweep that ran here
    OUT/rows/<trial_hash>.json   one row per finished (or finally failed) trial, by trial identity
    OUT/results.parquet          the rows of the current grid, rebuilt at the end of each run
    OUT/artifacts/               source models and masks (unless storage.artifacts points elsewhere)
    OUT/tune/                    Ray Tune's own experiment state and per-trial logs

A row is named by the hash of its trial's identity (method, grid point and every setting it ran
with), so the directory may hold rows of several versions of a sweep, and a version reuses every row
whose trial it shares: adding a seed, a budget, a method or an axis value runs only the new trials.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.artifacts import ArtifactStore
from orchestrator.config import ConfigError, SweepConfig
from orchestrator.trial import TrialSpec, trial_hash


class SweepMismatch(ConfigError):
    """The output directory holds a different sweep."""


def prepare_out_dir(sweep: SweepConfig, out_dir: Path, force: bool = False) -> None:
    """Create OUT, or check that it holds a version of this same sweep (same name). Never deletes
    a row: rows of other versions stay and are reused where their trials recur."""
    marker = out_dir / "sweep.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("name") != sweep.name and not force:
            raise SweepMismatch(
                f"{out_dir} holds a different sweep ({previous.get('name')!r}); pass another --out, or "
                f"--force to run {sweep.name!r} there (finished trials they share are reused)"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rows").mkdir(exist_ok=True)
    (out_dir / "sweeps").mkdir(exist_ok=True)
    for pattern in ("rows/*.running", "rows/*.tmp", "sweeps/*.tmp", "*.tmp"):  # left by a driver that was killed
        for stale in out_dir.glob(pattern):
            stale.unlink()
    record = json.dumps({"name": sweep.name, "config_hash": sweep.config_hash, "config": sweep.canonical()}, indent=1)
    _atomic_write(out_dir / "sweeps" / f"{sweep.config_hash}.json", record)
    _atomic_write(marker, record)


def row_path(out_dir: Path, key: str) -> Path:
    """Where the row of the trial with identity hash `key` lives."""
    return Path(out_dir) / "rows" / f"{key}.json"


def write_row(out_dir: Path, row: dict[str, Any]) -> None:
    _atomic_write(row_path(out_dir, row["trial_hash"]), json.dumps(row, default=str))


def read_row(out_dir: Path, sweep: SweepConfig, spec: TrialSpec) -> dict[str, Any] | None:
    """The stored row of `spec`'s trial in this sweep, or None."""
    path = row_path(out_dir, trial_hash(sweep, spec))
    return json.loads(path.read_text()) if path.exists() else None


def running_marker(out_dir: Path, key: str) -> Path:
    return row_path(out_dir, key).with_suffix(".running")


def store_for(sweep: SweepConfig, out_dir: Path) -> ArtifactStore:
    return ArtifactStore(sweep.storage.artifacts or Path(out_dir) / "artifacts")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
