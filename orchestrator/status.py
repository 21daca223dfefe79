"""`instill status OUT`: where a sweep stands, from its output directory alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

from orchestrator.config import ConfigError, load_sweep
from orchestrator.outdir import OutDir, as_outdir, is_running, read_row, store_for
from orchestrator.trial import expand, trial_hash, upstream_keys


def sweep_status(out_dir: str | Path | OutDir) -> tuple[str, int]:
    """A printable summary and the number of failed trials."""
    out = as_outdir(out_dir)
    text = out.read_text("sweep.json")
    if text is None:
        raise ConfigError(f"{out}: not a sweep output directory (no sweep.json); give the --out of `instill run`")
    sweep = load_sweep(json.loads(text)["config"], out.join("sweep.json"))
    counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
    failures = []
    trial_s, keys = 0.0, set()
    for spec in expand(sweep):
        keys.update(upstream_keys(sweep, spec))
        row = read_row(out, sweep, spec)
        if row is None:
            state = "running" if is_running(out, trial_hash(sweep, spec)) else "pending"
        else:
            state = row["status"]
            trial_s += float(row.get("total_s") or 0.0)
            if state == "failed":
                failures.append(f"  {spec.name}: {row.get('error')}")
        counts[state] += 1
    lines = [f"{out}: sweep {sweep.name!r}, {sum(counts.values())} trials"]
    holder = out.lease().read()
    if holder is None:
        lines.append("  no driver is running here")
    else:
        age = max(0.0, time.time() - holder.heartbeat)
        lines.append(f"  driver: {holder.describe()}, last heartbeat {age:.0f} s ago")
    lines.append("  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    finished = counts["done"] + counts["failed"]
    lines.append("  " + compute_line(store_for(sweep, out).computations(), keys, trial_s, finished))
    if failures:
        lines.append("failed trials:")
        lines += failures
    return "\n".join(lines), counts["failed"]


def compute_line(computations: list[dict], keys: set[tuple[str, str]], trial_s: float, trials: int) -> str:
    """The compute this grid has used so far: each upstream kind's computations (of this grid's
    keys only: a store may be shared) and the finished trials' `total_s`, in hours."""
    by_kind: dict[str, list[float]] = {}
    for record in computations:
        if (record["kind"], record["key"]) in keys:
            by_kind.setdefault(record["kind"], []).append(float(record["seconds"]))
    parts = [f"{kind} {len(s)} x, {sum(s) / 3600:.2f} h" for kind, s in sorted(by_kind.items())]
    total = sum(sum(s) for s in by_kind.values()) + trial_s
    parts.append(f"trials {trials} x, {trial_s / 3600:.2f} h")
    return f"compute so far: {'; '.join(parts)}; total {total / 3600:.2f} h (wall time >= total / trials at once)"
