"""Report extras: tables and figures that artifact kinds and analyses add to `instill report`.

An extra is `extra(ctx: ReportContext) -> list[Table | Figure]` under `@register_report(name)`,
declared beside what it reports on (`methods/mask_reports.py`). A `Table` becomes `<name>.parquet`
and a section of summary.md and index.html, a `Figure` `<name>.png/.svg`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from common.registry import Registry


@dataclasses.dataclass(frozen=True)
class ReportContext:
    """`summary`: per series and budget, `label`, `family`, `task`, one column per axis and
    `<column>_mean`/`_ci_lo`/`_ci_hi` per summarised column; `table`: the merged rows;
    `artifacts(kind)`: (key, tensors) of every readable artifact of `kind` in the sweeps' stores;
    `differences(configs)`: per nested dict, the `path=value` fields that tell it apart ("" for none)."""

    summary: Any  # pandas.DataFrame
    table: Any  # pandas.DataFrame
    artifacts: Callable[[str], list[tuple[dict, dict[str, Any]]]]
    differences: Callable[[list[dict]], list[str]]


@dataclasses.dataclass(frozen=True)
class Table:
    name: str  # <name>.parquet holds `frame`; summary.md and index.html show `shown` under `title`
    title: str
    frame: Any
    shown: Any
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str  # <name>.png and .svg
    caption: str
    figure: Any  # a matplotlib figure, drawn with `pyplot()`


REPORTS = Registry("report extra")


def register_report(name: str):
    """Decorator: `extra(ctx) -> list[Table | Figure]` runs in every report ([] for nothing to show)."""
    return REPORTS.register(name)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
