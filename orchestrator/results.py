"""The results table: one row per trial of a sweep's grid, as Parquet.

Identifying and headline columns come first in a fixed order; task-specific metric columns (e.g.
accuracy under each competing reading, `test_acc_2a2`) follow in name order. Trials that have not
finished appear with status `pending`, so the table always covers the whole grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config import SweepConfig
from orchestrator.trial import TrialSpec, base_row

COLUMNS = [
    "trial",
    "task",
    "model",
    "method",
    "sparsity",
    "data_fraction",
    "n_train",
    "seed",
    "status",
    "test_acc",
    "val_acc",
    "mask_density",
    "subtask_acc",
    "natural_density",
    "source_val_acc",
    "unmasked",
    "trainable_subnetwork",
    "best_epoch",
    "epochs_run",
    "source_s",
    "discovery_s",
    "transfer_s",
    "train_s",
    "eval_s",
    "wait_s",
    "total_s",
    "source_computed",
    "mask_computed",
    "device",
    "worker",
    "started_at",
    "finished_at",
    "error",
    "config_hash",
    "config_json",
    "versions",
]


def collect(out_dir: Path, sweep: SweepConfig, specs: list[TrialSpec]) -> pd.DataFrame:
    """Rows of `specs` from OUT/rows, with `pending` rows for trials that have none."""
    from orchestrator.sweep import read_row

    rows = []
    for spec in specs:
        row = read_row(out_dir, spec, sweep.config_hash)
        rows.append(row if row is not None else {**base_row(sweep, spec), "status": "pending"})
    return frame(rows)


def frame(rows: list[dict]) -> pd.DataFrame:
    """A DataFrame with the documented columns first (all present, null where not applicable)."""
    table = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in table:
            table[col] = None
    extra = sorted(c for c in table.columns if c not in COLUMNS)
    return table[COLUMNS[:9] + _metric_first(extra) + COLUMNS[9:]]


def _metric_first(extra: list[str]) -> list[str]:
    return [c for c in extra if c.startswith(("test_acc_", "val_acc_"))] + [
        c for c in extra if not c.startswith(("test_acc_", "val_acc_"))
    ]


def write(table: pd.DataFrame, path: Path) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = path.with_suffix(".parquet.tmp")
    schema_fix = table.copy()
    for col in ("sparsity", "mask_density", "subtask_acc", "natural_density", "test_acc", "val_acc"):
        schema_fix[col] = pd.to_numeric(schema_fix[col], errors="coerce").astype("float64")
    for col in ("error", "device", "unmasked"):
        schema_fix[col] = schema_fix[col].astype("object")
    pq.write_table(pa.Table.from_pandas(schema_fix, preserve_index=False), tmp)
    os.replace(tmp, path)


def read(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()
