"""The results table: one row per trial of a sweep's current grid, as Parquet.

Identifying columns come first, then one per axis of the grid (named by its path; `variant`), the
headline metrics, the columns analyses add (each starting with its analysis's name), then
bookkeeping. Unfinished trials appear with status `pending`, so the table covers the whole grid.
`summarised_columns` says which columns the report summarises: only what is declared, never guessed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from methods import ANALYSES, ARTIFACTS
from orchestrator.config import VARIANT, SweepConfig
from orchestrator.outdir import read_row
from orchestrator.trial import TrialSpec, base_row, own_settings

IDENTIFYING = ["trial", "trial_hash", "task", "model", "method", "data_fraction", "n_train", "seed"]
HEADLINE = ["status", "test_acc", "val_acc", "test_acc_last"]
CORE_SUMMARISED = ("test_acc", "val_acc")
TRAILING = [
    "best_epoch",
    "epochs_run",
    "total_s",
    "train_s",
    "wait_s",
    "device",
    "threads",
    "pack",
    "packed",
    "compiled",
    "compiled_whole",
    "worker",
    "started_at",
    "finished_at",
    "error",
    "analysis_errors",
    "gates_failed",
    "series",
    "own_settings",
    "config_json",
    "measurements_json",
    "code_version",
    "versions",
]
COLUMNS = IDENTIFYING + HEADLINE + TRAILING
_FLOATS = ("test_acc", "val_acc", "test_acc_last")


def axis_columns(columns) -> list[str]:
    """The columns of a sweep's axes: one per axis path (named by the dotted path) and `variant`
    (the names of `variants:`)."""
    return sorted(str(c) for c in columns if "." in str(c) or c == VARIANT)


def artifact_columns() -> list[str]:
    """The row columns artifact kinds report (their `reported`), in registry order."""
    return [col for _, kind in ARTIFACTS.items() for col in kind.reported]


def collect(out_dir: Path, sweep: SweepConfig, specs: list[TrialSpec]) -> pd.DataFrame:
    """Rows of `specs` from OUT/rows, with `pending` rows for trials that have none."""
    rows = []
    for spec in specs:
        row = read_row(out_dir, sweep, spec)
        if row is None:
            row = {**base_row(sweep, spec), "status": "pending"}
        else:  # a reused row: the trial may be named and placed on other axes in this version of the sweep
            row.update({path: spec.axes.get(path) for path in sweep.grid}, trial=spec.name)
            row["own_settings"] = own_settings(sweep, spec.method)
        rows.append(row)
    return frame(rows, axes=list(sweep.grid))


def frame(rows: list[dict], axes: list[str] | None = None) -> pd.DataFrame:
    """A DataFrame with the documented columns first (all present, null where not applicable)."""
    table = pd.DataFrame(rows)
    axes = axes if axes is not None else axis_columns(table.columns)
    upstream = artifact_columns()
    for col in COLUMNS + axes + upstream:
        if col not in table:
            table[col] = None
    known = set(COLUMNS) | set(axes) | set(upstream)
    extra = sorted(c for c in table.columns if c not in known)
    timings = [c for c in extra if c.endswith("_s") or c.endswith("_computed")]
    analyses = [c for c in extra if c not in timings]
    return table[IDENTIFYING + axes + HEADLINE + analyses + upstream + TRAILING + timings]


def _analyses_run(table: pd.DataFrame) -> list:
    names = set()
    for text in table.get("config_json", pd.Series(dtype=object)).dropna().unique():
        names |= {a["name"] for a in json.loads(text).get("analyses", [])}
    # A plug-in analysis not imported here keeps its columns in the table, unsummarised.
    return [ANALYSES.get(name) for name in sorted(names) if name in ANALYSES]


def _declared(table: pd.DataFrame):
    """(analysis, column, its declaration) for each column of `table` that an analysis that ran declares."""
    for analysis in _analyses_run(table):
        for col in table.columns:
            spec = analysis.declares(col) if col.startswith(analysis.name) else None
            if spec is not None:
                yield analysis, col, spec


def plotted_columns(table: pd.DataFrame) -> list[str]:
    """Columns an analysis that ran declares with `plot=True`: the report draws each against budget."""
    return list(dict.fromkeys(col for _, col, spec in _declared(table) if spec.plot))


def profiled_columns(table: pd.DataFrame) -> list[tuple[str, Any, list[str]]]:
    """(analysis name, its `Profile`, the columns it covers) for each column family that an analysis
    that ran declares with a profile: the report draws those as profiles (e.g. R² against depth)."""
    groups: dict[tuple[int, int], tuple[str, Any, list[str]]] = {}
    for analysis, col, spec in _declared(table):
        if spec.profile is not None:
            groups.setdefault((id(analysis), id(spec.profile)), (analysis.name, spec.profile, []))[2].append(col)
    return list(groups.values())


def summarised_columns(table: pd.DataFrame) -> list[str]:
    """The columns the report summarises: test and validation accuracy, what artifact kinds report,
    and every column an analysis that ran declares with `summarise=True`."""
    out = [c for c in (*CORE_SUMMARISED, *artifact_columns()) if c in table.columns]
    for _, col, spec in _declared(table):
        if spec.summarise and col not in out:
            out.append(col)
    return [c for c in out if pd.to_numeric(table[c], errors="coerce").notna().any()]


def analysis_errors_line(rows) -> str | None:
    """How many rows have analyses that failed, and the first failure; None when none has.
    `rows`: (trial, analysis_errors) pairs, the latter JSON {analysis: message} or null."""
    failed = [(trial, json.loads(text)) for trial, text in rows if isinstance(text, str)]
    if not failed:
        return None
    trial, first = failed[0]
    name = next(iter(first))
    return (f"{len(failed)} finished row(s) have analysis errors (their columns are empty; see analysis_errors), "
            f"first: {trial}: {name}: {first[name]}")  # fmt: skip


def write(table: pd.DataFrame, path: Path) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_suffix(".parquet.tmp")
    fixed = table.copy()
    for col in (*_FLOATS, *artifact_columns()):
        fixed[col] = pd.to_numeric(fixed[col], errors="coerce").astype("float64")
    for col in fixed.columns:
        if fixed[col].dtype == object and fixed[col].map(lambda v: isinstance(v, (list, dict))).any():
            fixed[col] = fixed[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    for col in ("error", "analysis_errors", "device"):
        fixed[col] = fixed[col].astype("object")
    pq.write_table(pa.Table.from_pandas(fixed, preserve_index=False), tmp)
    os.replace(tmp, path)


def read(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()
