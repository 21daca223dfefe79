"""`instill status OUT`: where a sweep stands, from its output directory alone."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.config import ConfigError, load_sweep
from orchestrator.outdir import read_row, running_marker
from orchestrator.trial import expand, trial_hash


def sweep_status(out_dir: Path) -> tuple[str, int]:
    """A printable summary and the number of failed trials."""
    marker = Path(out_dir) / "sweep.json"
    if not marker.exists():
        raise ConfigError(f"{out_dir}: not a sweep output directory (no sweep.json); give the --out of `instill run`")
    record = json.loads(marker.read_text())
    sweep = load_sweep(record["config"], str(marker))
    counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
    failures = []
    for spec in expand(sweep):
        row = read_row(out_dir, sweep, spec)
        if row is None:
            state = "running" if running_marker(out_dir, trial_hash(sweep, spec)).exists() else "pending"
        else:
            state = row["status"]
            if state == "failed":
                failures.append(f"  {spec.name}: {row.get('error')}")
        counts[state] += 1
    total = sum(counts.values())
    lines = [f"{out_dir}: sweep {sweep.name!r}, {total} trials"]
    lines.append("  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if failures:
        lines.append("failed trials:")
        lines += failures
    return "\n".join(lines), counts["failed"]
