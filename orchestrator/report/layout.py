"""Where each series goes in the report's figures: small multiples, one panel per combination of the
values of the axes that differ between the series (the task too, when the report holds several), a
line per series inside its panel, coloured by its method (`palette`).

A series without a value on a panel axis (a method that uses no artifact declaring that axis) is drawn
in every panel along that axis, as the reference it is. Inside a panel, the lines of one method are
told apart by their dash and by their name: the series' `family` without the panel's own fields."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

from orchestrator import results
from orchestrator.report import palette
from orchestrator.report.series import _fmt_value

TASK = "task"


@dataclass
class Layout:
    axes: list[str]  # the panel axes (config paths; `task` first when there are several tasks)
    panels: list[tuple[str, list[str]]]  # (title, series in it), in order
    line: dict[str, str] = field(default_factory=dict)  # series -> line name (legend entry)
    method: dict[str, str] = field(default_factory=dict)  # series -> method
    colour: dict[str, str] = field(default_factory=dict)  # method -> colour
    dash: dict[str, int] = field(default_factory=dict)  # line name -> index into palette.DASHES

    def lines(self) -> list[str]:
        """Every line name once, by method then name: the one legend."""
        return sorted(set(self.line.values()), key=lambda n: (self._method_of(n), n))

    def _method_of(self, line: str) -> str:
        return next(m for s, m in self.method.items() if self.line[s] == line)


def panel_axes(frame: pd.DataFrame) -> list[str]:
    """The config-path axis columns whose values differ between the series of `frame` (one row per
    series and budget), with `task` first when there are several tasks."""
    firsts = frame.drop_duplicates("series" if "series" in frame else "label")
    axes = [a for a in results.axis_columns(frame.columns) if "." in a]
    varying = [a for a in axes if firsts[a].dropna().map(_fmt_value).nunique() > 1]
    return ([TASK] if firsts[TASK].nunique() > 1 else []) + varying


def _sort_key(value) -> tuple:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def layout(frame: pd.DataFrame, axes: list[str] | None = None) -> Layout:
    """The panels, lines, colours and dashes of the curves of `frame` (one row per series and budget,
    with `series`, `task`, `method`, `family` and the axis columns); `axes`: the panel axes, default
    `panel_axes(frame)` ([]: one panel of every series)."""
    axes = panel_axes(frame) if axes is None else axes
    firsts = frame.drop_duplicates("series").set_index("series")
    point = {s: tuple((a, r[a]) for a in axes if not pd.isna(r[a])) for s, r in firsts.iterrows()}
    points = set(point.values())
    # Panels: the points no other point extends (a series of fewer axes joins every panel that holds its values).
    maximal = [p for p in points if p and not any(set(p) < set(q) for q in points)] or [()]
    maximal.sort(key=lambda p: tuple((a, _sort_key(v)) for a, v in p))
    panels = []
    for p in maximal:
        inside = [s for s in firsts.index if set(point[s]) <= set(p)]
        title = ", ".join(f"{v}" if a == TASK else f"{a} = {_fmt_value(v)}" for a, v in p) or "every series"
        panels.append((title, inside))
    line = {s: line_name(str(r.get("family", r["method"])), axes) for s, r in firsts.iterrows()}
    method = firsts["method"].astype(str).to_dict()
    by_method: dict[str, list[str]] = {}
    for s in sorted(firsts.index, key=lambda s: line[s]):
        names = by_method.setdefault(method[s], [])
        if line[s] not in names:
            names.append(line[s])
    return Layout(axes, panels, line, method, palette.colours(method.values()), palette.dashes(by_method))


def line_name(family: str, axes: list[str]) -> str:
    """`family` without the `axis=value` fields of the panel axes (the panel's title says them)."""
    match = re.fullmatch(r"(.*?) \[(.*)\]((?: #\w+)?)", family)
    if not match:
        return family
    base, inside, tag = match.groups()
    kept = [f for f in inside.split(", ") if not any(f.startswith(f"{a}=") for a in axes)]
    return base + (f" [{', '.join(kept)}]" if kept else "") + tag
