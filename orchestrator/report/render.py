"""`write_report`: the report's files, and summary.md and index.html rendered from one list of
sections; with them what the registered report extras (`methods.reports`) return."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from methods.reports import REPORTS, Figure, ReportContext, Table
from orchestrator import results
from orchestrator.artifacts import ArtifactStore, CorruptArtifact
from orchestrator.config import ConfigError, load_sweep
from orchestrator.outdir import as_outdir, read_sweep
from orchestrator.report import interactive, statistics, tables
from orchestrator.report.figures import plot_curves, plot_profiles, save
from orchestrator.report.provenance import provenance
from orchestrator.report.series import differing_fields, flatten, prepare
from orchestrator.report.statistics import METRIC
from orchestrator.trial import own_settings

log = logging.getLogger(__name__)
CURVES = "Test accuracy by budget (mean [95% CI] over seeds)"


@dataclass(frozen=True)
class Section:
    """A titled table. summary.md shows every section, in order; index.html those with a `page`
    heading: the findings (`lead`) above the figures, the others below them."""

    title: str
    table: pd.DataFrame
    note: str = ""
    empty: str = "(no finished trials)\n"  # summary.md's text in place of an empty table
    end: str = ""  # summary.md's text after the table or `empty`
    page: str | None = None  # the heading on index.html; None: in summary.md only
    lead: bool = False
    markdown_too: bool = True  # False: on index.html only
    scroll: bool = False  # on index.html in a box of limited height (a long list on the first screen)
    after: str = ""  # HTML after the table on index.html

    def markdown(self) -> str:
        if not self.markdown_too:
            return ""
        body = self.empty if self.table.empty else _markdown(tables.fit(self.table))
        note = f"{self.note}\n\n" if self.note else ""
        return f"\n## {self.title}\n\n{note}{body}{self.end}"

    def html(self) -> str:
        note = f"<p>{html.escape(self.note)}</p>\n" if self.note else ""
        empty = "<p>(no finished trials)</p>"
        table = empty if self.table.empty else tables.fit(self.table).to_html(index=False, border=0, classes="t")
        table = f'<div class="scroll">{table}</div>' if self.scroll and not self.table.empty else table
        return f"<h2>{html.escape(self.page)}</h2>\n{note}{table}{self.after}"


def _markdown(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    rows = ["| " + " | ".join(str(v) for v in row.tolist()) + " |" for _, row in frame.iterrows()]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *rows]) + "\n"


def load_tables(out_dirs: list, sources: list | None = None) -> pd.DataFrame:
    """The results of `out_dirs` (paths or URIs), merged; `sources`, if given, receives each row's
    index into `out_dirs`."""
    frames = []
    for location in out_dirs:
        out = as_outdir(location)
        if not out.exists("results.parquet"):
            raise ConfigError(f"{out.join('results.parquet')}: missing; run `instill run SWEEP --out {out}` first")
        table = pq.read_table(out.path("results.parquet"), filesystem=out.fs).to_pandas()
        frames.append(_with_own_settings(table, out))
    if sources is not None:
        sources += [k for k, frame in enumerate(frames) for _ in range(len(frame))]
    return pd.concat(frames, ignore_index=True)


def _with_own_settings(table: pd.DataFrame, out) -> pd.DataFrame:
    """`table` with `own_settings` filled where its rows lack it (rows written before the column
    existed) from OUT/sweep.json, as `instill run` would collect them today. Where that sweep cannot
    be loaded here (no sweep.json, a plug-in gone, an older schema) the rows stay as they are, with a
    warning: their series then pair only with series of the same settings on every path."""
    if "method" not in table or ("own_settings" in table and table["own_settings"].notna().all()):
        return table
    record, problems = read_sweep(out)
    config = (record or {}).get("config")
    why = "no sweep.json with its config" if config is None else "; ".join(problems)
    if not why:
        try:
            sweep = load_sweep(config, out.join("sweep.json"))
            own = {m: own_settings(sweep, m) for m in table["method"].dropna().unique()}
        except Exception as err:  # noqa: BLE001 - any failure leaves the rows as they are, said below
            why = f"{type(err).__name__}: {err}"
    if why:
        log.warning("report: %s: rows without own_settings left so (%s); methods with settings of "
                    "their own may find no partner", out, why)  # fmt: skip
        return table
    filled = table["method"].map(own)
    table = table.copy()
    table["own_settings"] = table["own_settings"].fillna(filled) if "own_settings" in table else filled
    return table


def artifact_roots(out_dirs: list) -> list[str]:
    """Each output directory's artifact store: sweep.json's storage.artifacts, else OUT/artifacts."""
    roots = []
    for location in out_dirs:
        out = as_outdir(location)
        text = out.read_text("sweep.json")
        config = (json.loads(text).get("config") or {}) if text else {}
        roots.append(str((config.get("storage") or {}).get("artifacts") or out.join("artifacts")))
    return list(dict.fromkeys(roots))


def previous_tables(out_dirs: list):
    """`previous(name)`: `<name>.parquet` of the report already in the input folders (a committed report
    folder itself, or a run's `report/`), all found concatenated; None when none has it. A folder that
    cannot be read is skipped (logged). Extras call it only where their own inputs are absent."""

    def previous(name: str):
        frames = []
        for location in out_dirs:
            out = as_outdir(location)
            for candidate in (f"{name}.parquet", f"report/{name}.parquet"):
                try:
                    if out.exists(candidate):
                        frames.append(pd.read_parquet(io.BytesIO(out.read_bytes(candidate))))
                        break
                except (OSError, ValueError) as err:  # unreachable remote folder or unreadable table
                    log.info("report: skipping %s in %s (%s)", candidate, location, err)
        return pd.concat(frames, ignore_index=True) if frames else None

    return previous


def stored_artifacts(roots: list[str]):
    """`artifacts(kind)`: (key, tensors) of every readable artifact of `kind` in the stores at `roots`;
    a store that does not exist or cannot be reached, or an unreadable artifact, is skipped (logged)."""

    def artifacts(kind: str) -> list[tuple[dict, dict]]:
        found, seen = [], set()
        for root in roots:
            if "://" not in root and not Path(root.removeprefix("file://")).is_dir():
                continue
            try:
                store = ArtifactStore(root)
                entries = store.entries(kind)
            except (OSError, ValueError) as err:  # unreachable or unauthorised remote store
                log.info("report: skipping artifact store %s (%s)", root, err)
                continue
            for key, _meta, path in (e for e in entries if e[2] not in seen):
                seen.add(path)
                try:
                    found.append((key, store.load(kind, key)[0]))
                except (OSError, CorruptArtifact) as err:
                    log.warning("report: skipping artifact %s (%s)", path, err)
        return found

    return artifacts


def _differences(configs: list[dict]) -> list[str]:
    return [", ".join(fields) for fields in differing_fields([flatten(c) for c in configs])]


def _joined(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
    return pd.concat(frames, ignore_index=True) if frames else None


def _has(summary: pd.DataFrame, column: str) -> bool:
    return f"{column}_mean" in summary and summary[f"{column}_mean"].notna().any()


def write_report(
    out_dirs: list[Path],
    report_dir: Path | None = None,
    target: float = 0.9,
    versus: str | list[str] | None = None,
    over: str | None = None,
    margin: float | None = None,
    metrics: list[str] | tuple[str, ...] = (),
) -> Path:
    """Summarise the results of `out_dirs` (merged) into `report_dir` (default: first dir's report/).
    `metrics`: summarised columns judged with findings too, besides test accuracy.
    `versus`: methods each series is also compared with (`paired_differences`), each comparison a
    finding with a verdict (`statistics.findings`; `margin`: the equivalence margin declared in
    advance); `over`: an axis the series are also averaged over (`mean_over`; with `versus`,
    `mean_over_differences` too)."""
    sources: list[int] = []
    table = load_tables(out_dirs, sources)
    if report_dir is None and "://" in str(out_dirs[0]):
        raise ConfigError(f"{out_dirs[0]} is not a local directory: give the report a local one with --to DIR")
    report_dir = Path(report_dir or Path(out_dirs[0]) / "report")
    settings = {"versus": [versus] if isinstance(versus, str) else list(versus or []), "margin": margin,
                "mean_over": over, "target": target, "metrics": [m for m in metrics if m != METRIC]}  # fmt: skip
    # Imports the runs' plug-ins (their columns are summarised); reads sweep.json and the rows' records.
    origin, origin_note, configs = provenance(out_dirs, table.assign(_source=sources), report_dir, settings)
    # Each raises on a bad --versus, --mean-over or --margin, before anything is written.
    versus = settings["versus"]
    diffs = _joined([statistics.paired_differences(table, v) for v in versus])
    means = statistics.mean_over(table, over) if over else None
    gaps = _joined([statistics.mean_over_differences(table, over, v) for v in versus]) if over else None
    found = statistics.findings(diffs, margin=margin) if versus else None
    if found is not None and gaps is not None:
        found = pd.concat([found, statistics.findings(gaps, margin=margin).assign(over=over)], ignore_index=True)
    if versus:  # the headline: the data each series saves in reaching the target (no margin: log10 units)
        reach = _joined([statistics.headline_differences(table, v, target=target) for v in versus])
        if reach is not None and not reach.empty:
            judged = statistics.findings(reach, metric=statistics.headline_metric(target))
            found = pd.concat([found, judged], ignore_index=True)
    for metric in settings["metrics"]:  # after the test-accuracy findings, which the versus table shows
        if metric not in table or not pd.api.types.is_numeric_dtype(table[metric]):
            raise ConfigError(f"--metric {metric}: not a numeric column of these results; e.g. {METRIC}, val_acc")
        if versus:
            judged = _joined([statistics.paired_differences(table, v, metric=metric) for v in versus])
            found = pd.concat([found, statistics.findings(judged, metric=metric, margin=margin)], ignore_index=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    summary, head = statistics.summarise(table), statistics.headline(table, target=target)
    done = prepare(table)[0] if not summary.empty else None
    context = ReportContext(summary, table, stored_artifacts(artifact_roots(out_dirs)), _differences,
                            previous_tables(out_dirs))  # fmt: skip
    extras = [out for _, extra in REPORTS.items() for out in extra(context)]
    plotted = [column for column in results.plotted_columns(table) if _has(summary, column)]
    profiles = []
    for name, profile, columns in results.profiled_columns(table):
        long = tables.profile_table(summary, table, profile, columns) if not summary.empty else pd.DataFrame()
        if not long.empty:
            profiles.append((name, profile, long))
    parquets = {"summary": summary, "headline": head, "mean_over": means, "versus": diffs, "versus_mean_over": gaps,
                "findings": found,
                **{f"{name}_profile": long for name, _, long in profiles},
                **{extra.name: extra.frame for extra in extras if isinstance(extra, Table)}}  # fmt: skip
    for stem, frame in parquets.items():
        if frame is not None:
            frame.to_parquet(report_dir / f"{stem}.parquet", index=False)
    # The full pivots (a column per series), which summary.md and the page show long.
    pivots = {f"{METRIC}_by_budget": tables.curve_pivot(summary),
              **{f"{c}_by_budget": tables.curve_pivot(summary, c) for c in plotted},
              "versus_by_budget": tables.versus_pivot(diffs, found.iloc[: len(diffs)]) if versus else None}  # fmt: skip
    for stem, frame in pivots.items():
        if frame is not None and not frame.empty:
            frame.to_csv(report_dir / f"{stem}.csv", index=False)
    for file, config in configs:
        (report_dir / file).write_text(json.dumps(config, indent=1, sort_keys=True))

    csv = f"the full pivot (a column per series): {METRIC}_by_budget.csv"
    sections = [
        Section(f"{METRIC} (mean [95% CI] over seeds)", tables.curve_table(summary), page=CURVES, note=csv),
        Section("Headline", tables.headline_table(head), page="Headline", lead=not versus, note=_unreached(head)),
    ]
    if over:
        title = f"{METRIC}, mean over {over} (per seed, then mean [95% CI] over seeds)"
        sections.append(Section(title, tables.curve_table(means), empty=f"No series differ only in {over}.\n",
                                page=title))  # fmt: skip
    if versus:
        names, bound = " / ".join(versus), f"±{margin:g}" if margin else "none declared"
        listed = Section("Every finding", tables.findings_list(found), page="Every finding", lead=True,
                         markdown_too=False, scroll=True)  # fmt: skip
        totals = found["verdict"].value_counts()
        total = ", ".join(f"{totals.get(v, 0)} {v}" for v in statistics.VERDICTS)
        sections[:0] = [Section(
            "Findings", tables.findings_counts(found), page="Findings", lead=True, scroll=True,
            note=f"{len(found)} findings: {total}. Each series minus its {names} partner, paired by seed, at each "
            f"budget: better / worse where the 95% interval excludes 0, equivalent where it lies inside the margin "
            f"({bound}), gated where a quality gate failed, undecided otherwise; and budget_to_{target:g}: per seed, "
            f"the data the series saves in first reaching {target:g} (log10 of the budgets' ratio; no margin; a side "
            "a curve that never reaches it cannot bound stays open). Every finding: findings.md, findings.parquet.",
        ), listed]  # fmt: skip
        (report_dir / "findings.md").write_text(tables.findings_markdown(found))
        title = f"{METRIC}: each series minus the {names} series of the same settings, paired by seed (mean [95% CI])"
        shown = tables.versus_table(diffs, found.iloc[: len(diffs)])
        sections.append(Section(title, shown, empty=f"No series has a {names} partner.\n", page=title))
    if over and versus:
        title = f"{METRIC}: each series minus its {' / '.join(versus)} partner, mean over {over}"
        gap_table = (tables.versus_table(gaps.assign(versus=gaps["versus"].astype(str) + f" (same {over})"))
                     if not gaps.empty else pd.DataFrame())  # fmt: skip
        empty = "No group has a partner at every value."
        title = f"{title} (per seed, then mean [95% CI] over seeds)"
        sections.append(Section(title, gap_table, empty=empty, end="\n", page=title))
    gates = tables.failed_gates(table)
    if not gates.empty:
        note = "These upstream artifacts failed a quality gate; the findings of their trials are gated."
        sections.insert(0, Section("Failed quality gates", gates, note=note, page="Failed quality gates", lead=True))
    for column in plotted:
        wide = tables.curve_table(summary, column)
        title = f"{column} (mean [95% CI] over seeds)"
        sections.append(Section(title, wide, page=title, note=f"the full pivot: {column}_by_budget.csv"))
    for name, _, long in profiles:
        title = f"{name} by depth, at each series' largest budget (mean [95% CI] over seeds)"
        sections.append(Section(title, tables.profile_markdown(long), page=title))
    sections += [Section(t.title, t.shown, t.note, page=t.title) for t in extras if isinstance(t, Table)]
    details = "".join(f"<details><summary>Resolved sweep config ({html.escape(file)})</summary><pre>"
                      f"{html.escape(json.dumps(config, indent=1, sort_keys=True))}</pre></details>"
                      for file, config in configs)  # fmt: skip
    sections.append(Section("Provenance", origin, note=origin_note, page="Provenance", after=details))
    (report_dir / "summary.md").write_text(_notes(summary, table) + "".join(s.markdown() for s in sections))

    static: list[str] = []  # files for papers, linked from the page
    charts: list[dict] = []  # the page's figures: {id, caption, spec | png, rows?}
    if not summary.empty:
        plot_curves(summary, report_dir / "data_efficiency", ylabel="test accuracy", seeds=done)
        static.append("data_efficiency")
        metrics = [c for c in results.summarised_columns(table) if _has(summary, c)]
        data = interactive.curves_data(summary, done, [METRIC, *(m for m in metrics if m != METRIC)],
                                       (over, means) if over and means is not None else None)  # fmt: skip
        charts.append({"id": "curves", "caption": CURVES_CAPTION, "spec": interactive.curves_chart(data, METRIC),
                       "rows": data})  # fmt: skip
    for column in plotted:
        plot_curves(summary, report_dir / column, metric=column, ylabel=column.replace("_", " "), seeds=done)
        static.append(column)
    for name, profile, long in profiles:
        plot_profiles(long, report_dir / f"{name}_profile", profile.xlabel, profile.ylabel)
        static.append(f"{name}_profile")
        caption = f"{name} against depth at each series' largest budget (95% CI)"
        charts.append({"id": f"{name}_profile", "caption": caption, "png": f"{name}_profile.png"})
    for extra in (e for e in extras if isinstance(e, Figure)):
        if extra.figure is not None:
            save(extra.figure, report_dir / extra.name)
            static.append(extra.name)
        chart = {"id": extra.name, "caption": extra.caption}
        chart.update({"spec": extra.vega} if extra.vega is not None else {"png": f"{extra.name}.png"})
        charts.append(chart)
    sources_text = ", ".join(str(Path(d)) for d in out_dirs)
    head_line = _head_line(origin)
    page = _page(report_dir, sources_text, len(table), head_line, sections, charts, static)
    (report_dir / "index.html").write_text(page)
    return report_dir


def _unreached(head: pd.DataFrame) -> str:
    """A note when no series reaches the target accuracy (its budget column then says nothing)."""
    if head.empty or np.isfinite(head["n_to_target"].to_numpy(dtype=float)).any():
        return ""
    best = head["max_budget"].max()
    return (f"No series reaches {head['target'].iloc[0]:g} test accuracy within its budgets (up to {best:g}); "
            "`instill report ... --target T` sets another target.")  # fmt: skip


def _head_line(origin: pd.DataFrame) -> str:
    """The page's first line on what produced it: command, sweep, code version."""
    items = origin.drop_duplicates("item", keep="first").set_index("item")["value"]
    return " · ".join(f"{k}: {items[k]}" for k in ("command", "sweep", "code version", "dates") if k in items)


def _notes(summary: pd.DataFrame, table: pd.DataFrame) -> str:
    """What the intervals are, which series have none or too few seeds for them, and which rows have
    analysis errors."""
    text = (
        f"Intervals are 95% intervals of the mean over seeds: Student t (mean ± t(0.975, k-1) · s/√k) below "
        f"{statistics.BCA_FROM} seeds, from then on the smallest interval holding the t and the BCa bootstrap "
        "intervals; a mean whose t interval reaches past its metric's range (0 or 1 for an accuracy) also "
        "holds the t interval on the logit scale (docs/STATISTICS.md); the budget interval inverts the t "
        "bands of the mean curve.\n"
    )
    few = sorted(set(summary.loc[summary["few_seeds"], "label"])) if "few_seeds" in summary else []
    if few:
        text += (
            f"\nFewer than {statistics.FEW_SEEDS} seeds at some budgets, so intervals there may not hold when "
            f"outcomes are bimodal (a share of failing seeds; docs/STATISTICS.md): {', '.join(few)}.\n"
        )
    single = sorted(set(summary.loc[summary["seeds"] < 2, "label"])) if not summary.empty else []
    if single:
        text += (
            f"\nOne seed only, so no interval (NaN bounds) at some or all budgets: {', '.join(single)}. "
            "Run more seeds for an interval.\n"
        )
    if "analysis_errors" in table:  # older results files have no such column
        errors = results.analysis_errors_line(zip(table["trial"], table["analysis_errors"], strict=True))
        text += f"\n{errors}\n" if errors else ""
    return text


def _page(
    report_dir: Path,
    sources: str,
    n_rows: int,
    head_line: str,
    sections: list[Section],
    charts: list[dict],
    static: list[str],
) -> str:
    """index.html: one file that reads offline (`interactive`: the Vega scripts inside it; the PNGs
    of figures without a Vega-Lite spec inside it as data: URIs); findings and failed gates first,
    then the main figure. Shrinks to links for the PNGs if it would weigh more than MAX_PAGE."""
    shown = [s for s in sections if s.page]
    lead = "\n".join(s.html() for s in shown if s.lead)
    rest = "\n".join(s.html() for s in shown if not s.lead)
    files = ", ".join(f'<a href="{html.escape(n)}.png">{html.escape(n)}.png</a> / '
                     f'<a href="{html.escape(n)}.svg">.svg</a>' for n in static)  # fmt: skip

    def figures(inline: bool) -> str:
        out = []
        for chart in charts:
            body = f'<div class="chart" id="chart-{html.escape(chart["id"])}"></div>'
            if "png" in chart:
                src = chart["png"]
                if inline:
                    src = "data:image/png;base64," + base64.b64encode((report_dir / src).read_bytes()).decode()
                body = f'<img src="{html.escape(src)}" alt="{html.escape(chart["caption"])}">'
            out.append(f"<figure>{body}<figcaption>{html.escape(chart['caption'])}</figcaption></figure>")
        return "\n".join(out)

    specs = [{"id": f"chart-{c['id']}", "spec": c["spec"], "rows": c.get("rows")} for c in charts if "spec" in c]
    payload = interactive.script_json(specs)
    for inline in (True, False):
        text = _PAGE.format(sources=html.escape(sources), n_rows=n_rows, head=html.escape(head_line), lead=lead,
                            figures=figures(inline), files=files, rest=rest, bundle=interactive.bundle(),
                            specs=payload, expand=interactive.EXPAND, n_charts=len(specs))  # fmt: skip
        if len(text.encode()) <= interactive.MAX_PAGE:
            return text
        log.warning(
            "report: index.html would weigh %.1f MB; its PNG figures are linked, not inside it",
            len(text.encode()) / 2**20,
        )
    return text


CURVES_CAPTION = ("Data-efficiency curves: mean over seeds (line), 95% CI (band), one point per seed; hover a point "
                  "for its seed and value, click a legend entry to show that method alone (shift-click: several), "
                  "pick the column drawn in the menu.")  # fmt: skip

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Instill report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.2em 2em; color: #222; background: #fff; }}
h1 {{ margin: 0 0 0.2em 0; font-size: 1.5em; }} h2 {{ font-size: 1.15em; margin: 1.1em 0 0.4em 0; }}
p.origin {{ font-size: 0.85em; color: #444; margin: 0.2em 0 0.6em 0; }}
figure {{ display: inline-block; margin: 0.6em 1em 0.6em 0; vertical-align: top; }} img {{ max-width: 100%; }}
figcaption {{ font-size: 0.85em; color: #444; max-width: 60em; }}
table.t {{ border-collapse: collapse; font-size: 0.85em; }}
table.t td, table.t th {{ padding: 0.2em 0.6em; border-bottom: 1px solid #ddd; text-align: left; }}
div.scroll {{ max-height: 12em; overflow: auto; display: inline-block; border: 1px solid #eee; }}
details pre {{ font-size: 0.8em; max-height: 30em; overflow: auto; background: #f7f7f7; padding: 0.5em; }}
.vega-bind {{ font-size: 0.9em; margin: 0.3em 0; }}
</style></head>
<body>
<h1>Instill report</h1>
<p class="origin">Results from {sources} ({n_rows} rows). {head}</p>
{lead}
<h2>Figures</h2>
{figures}
<p class="origin">Budgets on a log axis; bands are 95% confidence intervals of the mean over seeds (none for a
single seed), kept inside the column's range. A series is one configuration; different configurations are never
averaged. The same figures for papers (matplotlib): {files}.</p>
{rest}
<script>
{bundle}
</script>
<script type="application/json" id="instill-charts">{specs}</script>
<script>
{expand}
(function () {{
  var charts = JSON.parse(document.getElementById("instill-charts").textContent);
  var drawn = 0, failed = 0;
  function done() {{
    document.body.setAttribute("data-charts", charts.length);
    document.body.setAttribute("data-charts-rendered", drawn);
    document.body.setAttribute("data-charts-failed", failed);
  }}
  done();
  charts.forEach(function (c) {{
    if (c.rows) {{ c.spec.datasets = {{rows: instillRows(c.rows)}}; }}
    vegaEmbed("#" + c.id, c.spec, {{actions: false, renderer: "svg"}}).then(function () {{
      drawn += 1; done();
    }}).catch(function (err) {{
      failed += 1; done();
      document.getElementById(c.id).textContent = "This chart could not be drawn: " + err;
    }});
  }});
  window.addEventListener("load", function () {{
    var imgs = Array.prototype.slice.call(document.images);
    document.body.setAttribute("data-images", imgs.length);
    document.body.setAttribute("data-images-loaded",
      imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length);
  }});
}})();
</script>
</body></html>
"""
