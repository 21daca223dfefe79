"""`instill status OUT`: where a sweep stands, from its output directory alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

from orchestrator.config import ConfigError, load_sweep
from orchestrator.outdir import OutDir, as_outdir, is_running, read_row
from orchestrator.trial import expand, trial_hash


def sweep_status(out_dir: str | Path | OutDir) -> tuple[str, int]:
    """A printable summary and the number of failed trials."""
    out = as_outdir(out_dir)
    text = out.read_text("sweep.json")
    if text is None:
        raise ConfigError(f"{out}: not a sweep output directory (no sweep.json); give the --out of `instill run`")
    record = json.loads(text)
    sweep = load_sweep(record["config"], out.join("sweep.json"))
    counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
    failures = []
    for spec in expand(sweep):
        row = read_row(out, sweep, spec)
        if row is None:
            state = "running" if is_running(out, trial_hash(sweep, spec)) else "pending"
        else:
            state = row["status"]
            if state == "failed":
                failures.append(f"  {spec.name}: {row.get('error')}")
        counts[state] += 1
    total = sum(counts.values())
    lines = [f"{out}: sweep {sweep.name!r}, {total} trials"]
    holder = out.lease().read()
    if holder is None:
        lines.append("  no driver is running here")
    else:
        age = max(0.0, time.time() - holder.heartbeat)
        lines.append(f"  driver: {holder.describe()}, last heartbeat {age:.0f} s ago")
    lines.append("  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if failures:
        lines.append("failed trials:")
        lines += failures
    return "\n".join(lines), counts["failed"]
