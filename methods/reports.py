"""Report extras: tables and figures that artifact kinds and analyses add to `instill report`.

An extra is `extra(ctx: ReportContext) -> list[Table | Figure]` under `@register_report(name)`,
declared beside what it reports on (`methods/mask_reports.py`). A `Table` becomes `<name>.parquet`
and a section of summary.md and index.html, a `Figure` `<name>.png/.svg` (for papers) and a chart on
index.html: interactive where it also gives a Vega-Lite spec (`Figure.vega`), else its PNG.

`METHOD_COLOURS`: each method's colour in every report's figures, static and interactive (read by
`orchestrator.report.palette`; a plug-in method may add its own entry; a method without one gets a
colour derived from its name)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

from common.registry import Registry


@dataclasses.dataclass(frozen=True)
class ReportContext:
    """`summary`: per series and budget, `label`, `family`, `task`, one column per axis and
    `<column>_mean`/`_ci_lo`/`_ci_hi` per summarised column; `table`: the merged rows;
    `artifacts(kind)`: (key, tensors) of every readable artifact of `kind` in the sweeps' stores;
    `differences(configs)`: per nested dict, the `path=value` fields that tell it apart ("" for none);
    `previous(name)`: the table `<name>.parquet` of the report already in the input folders (a
    committed report rebuilt from its rows, without the artifacts it was made from), or None."""

    summary: Any  # pandas.DataFrame
    table: Any  # pandas.DataFrame
    artifacts: Callable[[str], list[tuple[dict, dict[str, Any]]]]
    differences: Callable[[list[dict]], list[str]]
    previous: Callable[[str], Any] = lambda name: None


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
    figure: Any  # a matplotlib figure, drawn with `pyplot()` (None: the page's chart only)
    # Optional: a Vega-Lite spec (a dict, its data inline under `data.values`) that index.html draws
    # as an interactive chart in place of the PNG; `method_colours(names)` gives the palette's scale.
    vega: dict | None = None


# One colour per method, the same in every report (colour-blind-safe Okabe-Ito first, then Tableau).
METHOD_COLOURS: dict[str, str] = {
    "scratch": "#7f7f7f",
    "subtask_induction": "#0072b2",
    "full_transfer": "#d55e00",
    "sampled_subnetwork": "#009e73",
    "paper_sampled_subnetwork": "#56b4e9",
    "complement_subnetwork": "#cc79a7",
    "naive_finetune": "#e69f00",
    "l2sp": "#8c564b",
    "guidance": "#9467bd",
    "cbft": "#17becf",
    "llrt": "#bcbd22",
    "lpft": "#393b79",
    "linearized_gp": "#ad494a",
}


REPORTS = Registry("report extra")


def register_report(name: str):
    """Decorator: `extra(ctx) -> list[Table | Figure]` runs in every report ([] for nothing to show)."""
    return REPORTS.register(name)


def method_colours(methods) -> dict[str, str]:
    """{method: colour} for `methods`, from the report's one palette (`orchestrator.report.palette`
    does the same; this is its copy for extras, which cannot import the orchestrator)."""
    return {m: colour_of(m, taken) for taken in [set()] for m in sorted(set(methods), key=_known_first)}


# Colours for methods without an entry in METHOD_COLOURS, picked by a hash of the name.
FALLBACK_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#8c6d31", "#e377c2", "#637939", "#7b4173",
    "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#843c39", "#d6616b", "#6b6ecf",
)  # fmt: skip


def _known_first(method: str) -> tuple[bool, str]:
    return (method not in METHOD_COLOURS, method)


def colour_of(method: str, taken: set[str]) -> str:
    """`method`'s colour: its METHOD_COLOURS entry, else the first colour not in `taken` from
    FALLBACK_COLOURS, starting at a hash of the name (deterministic); adds it to `taken`."""
    colour = METHOD_COLOURS.get(method)
    if colour is None:
        start = int(hashlib.sha256(method.encode()).hexdigest(), 16) % len(FALLBACK_COLOURS)
        ring = FALLBACK_COLOURS[start:] + FALLBACK_COLOURS[:start]
        colour = next((c for c in ring if c not in taken), ring[0])
    taken.add(colour)
    return colour


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
