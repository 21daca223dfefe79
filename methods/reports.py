"""Report extras: tables and figures that artifact kinds and analyses add to `instill report`.

An extra is a function `(ctx: ReportContext) -> list[Table | Figure]` under `@register_report(name)`,
declared beside what it reports on (the mask kind's overlap table and its sparsity-against-subtask
figure: `methods/mask_reports.py`). The report runs every registered extra once on the merged
results and the sweeps' artifact stores, and writes what it returns beside its own tables and
figures: a `Table` as `<name>.parquet` and a section of summary.md and index.html, a `Figure` as
`<name>.png` and `.svg`. An extra with nothing to show returns [].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from common.registry import Registry


@dataclasses.dataclass(frozen=True)
class Stored:
    """One artifact in a sweep's store: its key and meta, and `load()` its tensors (None where they
    cannot be read, e.g. a corrupt file: the report logs it)."""

    key: dict[str, Any]
    meta: dict[str, Any]
    load: Callable[[], dict[str, Any] | None]


@dataclasses.dataclass(frozen=True)
class ReportContext:
    """What an extra may draw on. `summary`: per series and budget, its `label`, `family` (the label
    without the values of the axes artifact kinds declare), `task`, one column per axis, and for every
    summarised column `<column>_mean`, `_ci_lo`, `_ci_hi`; `table`: every row of the merged results;
    `artifacts(kind)`: what the sweeps' artifact stores hold of `kind`; `differences(configs)`: for
    each of several nested dicts, the `path=value` fields that tell it apart from the others, as the
    report's labels name them ("" where none)."""

    summary: Any  # pandas.DataFrame
    table: Any  # pandas.DataFrame
    artifacts: Callable[[str], list[Stored]]
    differences: Callable[[list[dict]], list[str]]


@dataclasses.dataclass(frozen=True)
class Table:
    """`frame` (long, as numbers) goes to `<name>.parquet`; summary.md and index.html show `shown`
    under `title`, with `note` above it."""

    name: str
    title: str
    frame: Any  # pandas.DataFrame
    shown: Any  # pandas.DataFrame
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Figure:
    """A matplotlib figure (drawn with `pyplot()`), saved as `<name>.png` and `.svg`."""

    name: str
    caption: str
    figure: Any


REPORTS = Registry("report extra")


def register_report(name: str):
    """Decorator for `extra(ctx) -> list[Table | Figure]`; `name` is also the stem of its files."""

    def add(fn):
        REPORTS.register(name)(fn)
        return fn

    return add


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
