"""The report's one palette: a colour per method, the same in every report and in every figure,
static (matplotlib) and interactive (Vega-Lite), and a dash per line that shares its method's colour
inside one panel.

The colours are `methods.reports.METHOD_COLOURS` (beside the methods, so that no method is named
here); a method without an entry gets one of `methods.reports.FALLBACK_COLOURS`, chosen by a hash
of its name (the next free one where two names of one report hash alike)."""

from __future__ import annotations

from methods.reports import method_colours

# Matplotlib dash patterns and the same as Vega-Lite strokeDash arrays, in order of use.
DASHES = ((None, []), ((0, (5, 2)), [5, 2]), ((0, (1, 1.5)), [1, 2]), ((0, (6, 2, 1, 2)), [6, 2, 1, 2]))


def colours(methods) -> dict[str, str]:
    """{method: hex colour} for the methods of one report."""
    return method_colours(methods)


def dashes(lines_by_method: dict[str, list[str]]) -> dict[str, int]:
    """{line: dash index into DASHES}: the lines of one method take solid, dashed, dotted, ... in order."""
    return {line: i % len(DASHES) for lines in lines_by_method.values() for i, line in enumerate(lines)}
