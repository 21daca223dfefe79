"""What produced a report, as a table of (item, value) rows per results directory: the command,
the sweep (name, hash, `--set` overrides; its resolved config beside the report as
sweep_config[-k].json), the code version (commit, dirty or not), plug-in hashes, package versions,
the machine, seeds, dates, wall time and compute, and the command that rebuilds the report. What a
run did not record (older runs) reads "not recorded".

From OUT/sweep.json (`orchestrator.outdir.prepare_out_dir`: the config, overrides, plug-in paths and,
since runs record it, `invocation`: argv, start, driver code version and machine) and from the rows
(`code_version`, `versions`, the plug-in hashes in `config_json`'s `code`, `device`, `worker`,
`started_at`, `finished_at`, `total_s`)."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from methods import ANALYSES
from orchestrator.outdir import read_sweep

NOT_RECORDED = "not recorded"
CONFIG_FILE = "sweep_config{}.json"  # the resolved sweep config beside the report ("" or "-2", ...); never
# sweep.json, which a report written into its own results directory would overwrite


def _date(ts) -> str:
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _seeds(values) -> str:
    """Seeds as ranges: `0-9, 12`."""
    seeds = sorted({int(v) for v in values if not pd.isna(v)})
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(f"{seeds[i]}" if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return f"{', '.join(parts)} ({len(seeds)} seeds)" if seeds else NOT_RECORDED


def _counted(values, unit: str = "rows") -> str:
    counts = Counter(str(v) for v in values if isinstance(v, str) and v)
    return "; ".join(f"{v} ({n} {unit})" for v, n in counts.most_common()) or NOT_RECORDED


def _command(invocation: dict) -> str:
    argv = invocation.get("argv") or []
    if not argv:
        return NOT_RECORDED
    name = Path(argv[0]).name
    shown = ["instill", *argv[1:]] if name == "instill" else argv
    where = f" (in {invocation['cwd']})" if invocation.get("cwd") else ""
    return shlex.join(shown) + where


def _versions(texts) -> str:
    found = []
    for text in dict.fromkeys(t for t in texts if isinstance(t, str) and t):
        try:
            versions = json.loads(text)
        except ValueError:
            continue
        keys = [k for k in ("python", "torch", "ray", "instill") if k in versions]
        keys += sorted(k for k in versions if k not in keys)
        found.append(", ".join(f"{k} {versions[k]}" for k in keys))
    return "; ".join(found) or NOT_RECORDED


def _plugin_hashes(configs, paths: dict) -> str:
    code: dict[str, set[str]] = {}
    for text in configs:
        for module, digest in (json.loads(text).get("code") or {}).items():
            code.setdefault(module, set()).add(digest)
    modules = sorted(set(code) | set(paths))
    shown = [f"{m} ({paths.get(m, 'Python path')}): {', '.join(sorted(code.get(m, {NOT_RECORDED})))}" for m in modules]
    return "; ".join(shown) or "none (the project's own code only)"


def _machine(invocation: dict, rows: pd.DataFrame) -> str:
    machine = invocation.get("machine") or {}
    driver = NOT_RECORDED
    if machine:
        gpus = ", ".join(machine.get("gpus") or []) or "none"
        driver = f"{machine.get('cpu') or '?'} ({machine.get('cpus') or '?'} CPUs), GPUs: {gpus}"
    hosts = Counter(str(w).rsplit(":", 1)[0] for w in rows.get("worker", pd.Series(dtype=object)).dropna())
    devices = _counted(rows.get("device", pd.Series(dtype=object)), "trials")
    workers = ", ".join(f"{h} ({n} trials)" for h, n in hosts.most_common()) or NOT_RECORDED
    return f"driver: {driver}; trial devices: {devices}; worker hosts: {workers}"


def rebuild_command(out_dirs: list, report_dir: Path, settings: dict) -> str:
    """The one-line `instill report` that writes this report again."""
    parts = ["instill", "report", *map(str, out_dirs), "--to", str(report_dir)]
    for v in settings.get("versus") or []:
        parts += ["--versus", v]
    for m in settings.get("metrics") or []:
        parts += ["--metric", m]
    for option in ("margin", "mean_over", "target"):
        if settings.get(option) is not None:
            parts += [f"--{option.replace('_', '-')}", f"{settings[option]:g}" if option != "mean_over" else
                      str(settings[option])]  # fmt: skip
    return shlex.join(parts)


def provenance(out_dirs: list, table: pd.DataFrame, report_dir: Path, settings: dict) -> tuple[pd.DataFrame, str, list]:
    """(rows `results`/`item`/`value`, a warning note ("" for none), [(file name, resolved config)])."""
    rows, problems, configs = [], [], []
    for k, location in enumerate(out_dirs):
        record, failed = read_sweep(location)
        record = record or {}
        problems += [f"{location}: {problem}" for problem in failed]
        invocation = record.get("invocation") or {}
        part = table[table["_source"] == k] if "_source" in table else table
        done = part[part["status"] == "done"] if "status" in part else part
        config_file = CONFIG_FILE.format("" if k == 0 else f"-{k + 1}")
        if record.get("config") is not None:
            configs.append((config_file, record["config"]))
        sweep = (f"{record.get('name')} (config hash {record.get('config_hash')}; resolved config: {config_file})"
                 if record else NOT_RECORDED)  # fmt: skip
        versions = part["code_version"] if "code_version" in part else []
        dirty = {str(v).endswith("-dirty") for v in versions if isinstance(v, str)}
        code = _counted(versions)
        if dirty:
            changed = "yes" if dirty == {True} else "in some rows" if True in dirty else "no"
            code += f"; uncommitted changes: {changed}"
        starts = pd.to_numeric(done.get("started_at", pd.Series(dtype=float)), errors="coerce").dropna()
        ends = pd.to_numeric(done.get("finished_at", pd.Series(dtype=float)), errors="coerce").dropna()
        spent = pd.to_numeric(done.get("total_s", pd.Series(dtype=float)), errors="coerce").dropna()
        items = {
            "command": _command(invocation),
            "run started": _date(invocation["started"]) if invocation.get("started") else NOT_RECORDED,
            "sweep": sweep,
            "--set": " ".join(record.get("overrides", [])) or "none" if record else NOT_RECORDED,
            "code version": code,
            "driver code version": invocation.get("code_version") or NOT_RECORDED,
            "plug-ins": _plugin_hashes(part["config_json"].dropna().unique() if "config_json" in part else [],
                                       record.get("plugin_paths") or {}),  # fmt: skip
            "packages": _versions(part["versions"]) if "versions" in part else NOT_RECORDED,
            "machine": _machine(invocation, done),
            "seeds": _seeds(done["seed"]) if "seed" in done else NOT_RECORDED,
            "trials": f"{len(done)} finished of {len(part)} rows",
            "dates": f"{_date(starts.min())} to {_date(ends.max())}" if len(starts) and len(ends) else NOT_RECORDED,
            "wall time": (f"{_duration(ends.max() - starts.min())} from the first trial's start to the last's end "
                          "(resumed runs: pauses included)") if len(starts) and len(ends) else NOT_RECORDED,
            "compute": f"{_duration(spent.sum())} of trial time, summed over trials" if len(spent) else NOT_RECORDED,
        }  # fmt: skip
        rows += [{"results": str(location), "item": item, "value": value} for item, value in items.items()]
    rows.append({"results": "all", "item": "rebuild this report", "value": rebuild_command(out_dirs, report_dir,
                                                                                             settings)})  # fmt: skip
    ran = {a["name"] for text in (table["config_json"].dropna().unique() if "config_json" in table else [])
           for a in json.loads(text).get("analyses", [])}  # fmt: skip
    if missing := sorted(ran - set(ANALYSES.names())):
        problems.append(f"analyses {', '.join(missing)} ran but no plug-in imported here registers them")
    note = "".join(f"Warning: {p}. " for p in problems)
    note += "Their columns are in results.parquet but not summarised." if problems else ""
    frame = pd.DataFrame(rows)
    if len(out_dirs) == 1:
        frame = frame.drop(columns="results")
    return frame, note.strip(), configs
