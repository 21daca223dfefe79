"""index.html's interactive charts: Vega-Lite specs drawn by vega-embed, its scripts inside the page.

Why Vega-Lite: the page must be one file that reads offline and weighs at most 5 MB. The Vega,
Vega-Lite and vega-embed bundle that `vl-convert-python` ships (`vl_convert.javascript_bundle()`,
no download at run time) is about 0.9 MB, against 3.5-4.7 MB for plotly.js, which would leave little
of the 5 MB for the data. The specs are plain dicts (a Vega-Lite spec is JSON), so the report needs
no plotting library beyond matplotlib, which draws the PNG/SVG files kept for papers.

The curves chart (`curves_chart`): small multiples as in the static figure (`layout`), a line per
series coloured by its method (`palette`), its 95% interval as a band and each seed's value as a
point under it; hovering a point shows its series, seed, budget and value; a click on a legend entry
shows that method (or line) alone (shift-click: several); a menu picks the summarised column drawn.
Its rows travel compactly (per series, then [series, column, n, values...]) and are expanded in the
page (`EXPAND`), so that a paper-sized sweep stays far below 5 MB."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pandas as pd

from orchestrator.config import ConfigError
from orchestrator.report import palette
from orchestrator.report.layout import layout, line_name, panel_axes

MAX_PAGE = 5 * 1024 * 1024  # bytes: index.html's limit (a page people mail and attach)
PANEL_WIDTH, PANEL_HEIGHT = 250, 170


@functools.cache
def bundle() -> str:
    """The Vega + Vega-Lite + vega-embed script (defines window.vegaEmbed), from the installed
    vl-convert-python: nothing is fetched. Bundling takes seconds, so the script is kept in the user's
    cache folder per vl-convert version (rebuilt where that cannot be read or written)."""
    try:
        import vl_convert
    except ImportError as err:  # an environment installed before the dependency was
        raise ConfigError(
            "index.html's charts need vl-convert-python (a dependency of instill): run `bash scripts/setup.sh` "
            "or `pip install vl-convert-python`"
        ) from err

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "instill"
    file = cache / f"vega-embed-{vl_convert.__version__}.js"
    try:
        return file.read_text()
    except OSError:
        pass
    script = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        temporary = file.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(script)
        temporary.replace(file)
    except OSError:
        pass
    return script


def _num(value) -> float | None:
    """A value for the page: 4 significant digits (what a tooltip shows), None for missing."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return float(f"{v:.4g}") if math.isfinite(v) else None


def panelings(summary: pd.DataFrame) -> list[tuple[str, list[str] | None]]:
    """The ways the page may lay out the curves, the first the default: (menu label, panel axes):
    a panel per combination of every axis the series differ in, per value of one of them, or one panel."""
    axes = panel_axes(summary)
    out: list[tuple[str, list[str] | None]] = [(f"a panel per {' × '.join(axes)}" if axes else "one panel", None)]
    if len(axes) > 1:
        out += [(f"a panel per {a}", [a]) for a in axes]
    if axes:
        out.append(("one panel", []))
    return out


def curves_data(
    summary: pd.DataFrame,
    seeds: pd.DataFrame | None,
    metrics: list[str],
    means_over: tuple[str, pd.DataFrame] | None = None,
) -> dict:
    """The curves chart's rows, compact: series (label, method, and per layout of `panelings` its line
    name and panels), the metrics, the means ([series, metric, n, mean, lo, hi, seeds]) and each seed's
    value ([series, metric, n, seed, value]). `means_over`: (axis, `statistics.mean_over` of the first
    metric), drawn as one more panel of the default layout."""
    choices = panelings(summary)
    plans = [layout(summary, axes) for _, axes in choices]
    plan = plans[0]
    order = list(plan.line)
    index = {s: i for i, s in enumerate(order)}
    labels = summary.drop_duplicates("series").set_index("series")["label"].to_dict()
    series = []
    for s in order:
        where = [[p.line[s], [title for title, inside in p.panels if s in inside]] for p in plans]
        series.append({"s": str(labels[s]), "m": plan.method[s], "o": where})
    means, points = [], []
    for mi, metric in enumerate(metrics):
        if f"{metric}_mean" not in summary:
            continue
        part = summary[summary[f"{metric}_mean"].notna()]
        cols = ["series", "n_train", f"{metric}_mean", f"{metric}_ci_lo", f"{metric}_ci_hi", "seeds"]
        for s, n, mean, lo, hi, k in part[cols].itertuples(index=False):
            means.append([index[s], mi, _num(n), _num(mean), _num(lo), _num(hi), int(k)])
        if seeds is not None and metric in seeds:
            values = pd.to_numeric(seeds[metric], errors="coerce")
            kept = seeds[values.notna() & seeds["series"].isin(index)]
            for s, n, seed, v in zip(kept["series"], kept["n_train"], kept["seed"], values[kept.index], strict=True):
                points.append([index[s], mi, _num(n), _num(seed), _num(v)])
    colours, titles = dict(plan.colour), [title for p in plans for title, _ in p.panels]
    by_method: dict[str, list[str]] = {}
    for p in plans:
        for s in order:
            lines = by_method.setdefault(p.method[s], [])
            if p.line[s] not in lines:
                lines.append(p.line[s])
    if means_over is not None and not means_over[1].empty and metrics:
        axis, frame = means_over
        title = f"mean over {axis}"
        titles.insert(len(plan.panels), title)
        for label, group in frame.groupby("label", sort=True):
            method = str(group["method"].iloc[0])
            colours.setdefault(method, palette.colours([*colours, method])[method])
            line = line_name(str(label).split(" [mean over ")[0], plan.axes)
            by_method.setdefault(method, [])
            if line not in by_method[method]:
                by_method[method].append(line)
            series.append({"s": str(label), "m": method, "o": [[line, [title]]] + [[line, []]] * (len(plans) - 1)})
            cols = ["n_train", f"{metrics[0]}_mean", f"{metrics[0]}_ci_lo", f"{metrics[0]}_ci_hi", "seeds"]
            for n, mean, lo, hi, k in group[cols].itertuples(index=False):
                means.append([len(series) - 1, 0, _num(n), _num(mean), _num(lo), _num(hi), int(k)])
    dash = palette.dashes({m: sorted(lines) for m, lines in by_method.items()})
    return {"series": series, "metrics": metrics, "means": means, "seeds": points,
            "options": [label for label, _ in choices], "panels": list(dict.fromkeys(titles)),
            "n_panels": len(plan.panels) + (means_over is not None), "budgets": sorted({r[2] for r in means}),
            "colours": colours, "dashes": {line: palette.DASHES[i][1] for line, i in dash.items()}}  # fmt: skip


def curves_chart(data: dict, metric: str) -> dict:
    """The Vega-Lite spec of the curves chart; its rows (`datasets.rows`) are filled in by the page."""
    methods = sorted(data["colours"])
    dashed = any(data["dashes"].values())
    colour = {"field": "method", "type": "nominal", "title": "method",
              "scale": {"domain": methods, "range": [data["colours"][m] for m in methods]},
              "legend": {"orient": "bottom", "columns": 4, "symbolType": "stroke", "symbolOpacity": 1,
                         "symbolStrokeWidth": 3}}  # fmt: skip
    x = {"field": "n", "type": "quantitative", "title": "training budget n (log scale)",
         "scale": {"type": "symlog", "constant": 10}, "axis": {"grid": True, "values": data["budgets"]}}  # fmt: skip
    shown = {"and": [{"param": "pick_method"}] + ([{"param": "pick_line"}] if dashed else [])}
    opacity = {"condition": {"test": shown, "value": 1}, "value": 0.07}
    picks = [{"name": "pick_method", "select": {"type": "point", "fields": ["method"]}, "bind": "legend"}]
    if dashed:
        picks.append({"name": "pick_line", "select": {"type": "point", "fields": ["line"]}, "bind": "legend"})
    line = {
        "transform": [{"filter": "datum.kind === 'mean'"}],
        "mark": {"type": "line", "point": {"size": 25}, "strokeWidth": 1.8},
        "params": picks,
        "encoding": {
            "x": x,
            "y": {"field": "y", "type": "quantitative", "title": "mean and seeds", "scale": {"zero": False}},
            "color": colour,
            "detail": {"field": "series"},
            "opacity": opacity,
            "tooltip": [
                {"field": "series"},
                {"field": "n", "title": "budget n"},
                {"field": "y", "title": "mean", "format": ".4g"},
                {"field": "lo", "title": "95% CI low"},
                {"field": "hi", "title": "95% CI high"},
                {"field": "seeds", "title": "seeds"},
            ],
        },  # fmt: skip
    }
    if dashed:
        lines = sorted(data["dashes"])
        line["encoding"]["strokeDash"] = {"field": "line", "type": "nominal", "title": "line",
                                          "scale": {"domain": lines, "range": [data["dashes"][n] or [1, 0]
                                                                               for n in lines]},
                                          "legend": {"orient": "bottom", "columns": 2}}  # fmt: skip
    band = {
        "transform": [{"filter": "datum.kind === 'mean' && isValid(datum.lo)"}],
        "mark": {"type": "area", "opacity": 0.14},
        "encoding": {
            "x": x,
            "y": {"field": "lo", "type": "quantitative"},
            "y2": {"field": "hi"},
            "color": colour,
            "detail": {"field": "series"},
            "opacity": {"condition": {"test": shown, "value": 0.14}, "value": 0.02},
        },  # fmt: skip
    }
    points = {
        "transform": [{"filter": "datum.kind === 'seed'"}],
        "mark": {"type": "circle", "size": 16},
        "encoding": {
            "x": x,
            "y": {"field": "y", "type": "quantitative"},
            "color": colour,
            "opacity": {"condition": {"test": shown, "value": 0.45}, "value": 0.03},
            "tooltip": [
                {"field": "series"},
                {"field": "seed"},
                {"field": "n", "title": "budget n"},
                {"field": "y", "title": "value", "format": ".4g"},
            ],
        },  # fmt: skip
    }
    scale = {1: 1.8, 2: 1.35}.get(data["n_panels"], 1.0)  # few panels: larger ones
    inner = {"width": round(PANEL_WIDTH * scale), "height": round(PANEL_HEIGHT * scale), "layer": [band, points, line]}
    base = {
        "params": [{"name": "metric", "value": metric,
                    "bind": {"input": "select", "options": data["metrics"], "name": "column drawn: "}},
                   {"name": "paneling", "value": data["options"][0],
                    **({"bind": {"input": "select", "options": data["options"], "name": "panels: "}}
                       if len(data["options"]) > 1 else {})}],
        "datasets": {"rows": []},
        "data": {"name": "rows"},
        "transform": [{"filter": "datum.metric === metric && datum.opt === paneling"}],
        "title": {"text": {"expr": "metric + ' against training budget (mean, 95% CI, one point per seed)'"},
                  "anchor": "start", "fontSize": 13},
        "config": {"font": "system-ui, sans-serif", "view": {"stroke": "#ccc"}},
    }  # fmt: skip
    facet = {"field": "panel", "type": "nominal", "sort": data["panels"], "title": None,
             "header": {"labelFontSize": 11, "labelLimit": 400}}  # fmt: skip
    return {**base, "facet": facet, "columns": min(len(data["panels"]), 3), "spec": inner}


# Expands `curves_data` into the rows `curves_chart` reads (one per panel a series is drawn in).
EXPAND = """
function instillRows(d) {
  var rows = [];
  function add(r, make) {
    var s = d.series[r[0]];
    s.o.forEach(function (where, k) {
      where[1].forEach(function (p) {
        var row = make(r);
        row.opt = d.options[k]; row.panel = p; row.series = s.s; row.method = s.m; row.line = where[0];
        row.metric = d.metrics[r[1]];
        rows.push(row);
      });
    });
  }
  d.means.forEach(function (r) {
    add(r, function (r) { return {kind: "mean", n: r[2], y: r[3], lo: r[4], hi: r[5], seeds: r[6]}; });
  });
  d.seeds.forEach(function (r) {
    add(r, function (r) { return {kind: "seed", n: r[2], seed: r[3], y: r[4]}; });
  });
  return rows;
}
"""


def script_json(value) -> str:
    """JSON to place inside a <script> element (no `</` that would end it)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
