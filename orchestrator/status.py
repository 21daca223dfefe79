"""`instill status OUT`: where a sweep stands, from its output directory alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from orchestrator import seeds
from orchestrator.config import ConfigError, load_sweep
from orchestrator.outdir import OutDir, as_outdir, is_running, read_sweep, row_name, store_for
from orchestrator.results import analysis_errors_line
from orchestrator.trial import trial_hash, upstream_keys


def sweep_status(out_dir: str | Path | OutDir) -> tuple[str, int]:
    """A printable summary and the number of failed trials. Where the sweep cannot be loaded here
    (a plug-in gone), a warning says why and the trials of its last results.parquet are counted."""
    out = as_outdir(out_dir)
    record, problems = read_sweep(out)
    if record is None:
        raise ConfigError(f"{out}: not a sweep output directory (no sweep.json); give the --out of `instill run`")
    sweep = None
    if not problems:
        try:
            sweep = load_sweep(record["config"], out.join("sweep.json"))
        except ConfigError as err:
            problems = [str(err)]
    specs = seeds.plan(sweep, out).specs if sweep is not None else []  # every round planned so far
    trials = [(s.name, trial_hash(sweep, s)) for s in specs] if sweep is not None else _last_trials(out)
    counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
    failures, analysed = [], []
    trial_s = 0.0
    for name, key in trials:
        text = out.read_text(row_name(key))
        if text is None:
            state = "running" if is_running(out, key) else "pending"
        else:
            row = json.loads(text)
            state = row["status"]
            trial_s += float(row.get("total_s") or 0.0)
            if state == "failed":
                failures.append(f"  {name}: {row.get('error')}")
            analysed.append((name, row.get("analysis_errors")))
        counts[state] += 1
    lines = [f"warning: {line}" for line in problems]
    if problems:
        lines.append("warning: so the trials counted are those of the last results.parquet, by their rows")
    lines.append(f"{out}: sweep {record.get('name')!r}, {sum(counts.values())} trials")
    if record.get("overrides"):
        lines.append(f"  --set {' '.join(record['overrides'])}")
    holder = out.lease().read()
    if holder is None:
        lines.append("  no driver is running here")
    else:
        age = max(0.0, time.time() - holder.heartbeat)
        lines.append(f"  driver: {holder.describe()}, last heartbeat {age:.0f} s ago")
    lines.append("  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if sweep is not None:
        keys = {key for spec in specs for key in upstream_keys(sweep, spec)}
        finished = counts["done"] + counts["failed"]
        lines.append("  " + compute_line(store_for(sweep, out).computations(), keys, trial_s, finished))
    line = analysis_errors_line(analysed)
    lines += [f"  {line}"] if line else []
    if failures:
        lines.append("failed trials:")
        lines += failures
    return "\n".join(lines), counts["failed"]


def _last_trials(out: OutDir) -> list[tuple[str, str]]:
    """(name, trial hash) of each trial of OUT/results.parquet (the grid of the last run)."""
    if not out.exists("results.parquet"):
        return []
    table = pq.read_table(out.path("results.parquet"), filesystem=out.fs, columns=["trial", "trial_hash"])
    return list(zip(table["trial"].to_pylist(), table["trial_hash"].to_pylist(), strict=True))


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
