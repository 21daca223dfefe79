"""`write_report`: the report's files, and summary.md and index.html rendered from one list of
sections; with them what the registered report extras (`methods.reports`) return."""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from methods import ANALYSES
from methods.reports import REPORTS, Figure, ReportContext, Table
from orchestrator import results
from orchestrator.artifacts import ArtifactStore, CorruptArtifact
from orchestrator.config import ConfigError
from orchestrator.outdir import as_outdir, read_sweep
from orchestrator.report import statistics, tables
from orchestrator.report.figures import plot_curves, plot_profiles, save
from orchestrator.report.series import differing_fields, flatten
from orchestrator.report.statistics import METRIC

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

    def markdown(self) -> str:
        body = self.empty if self.table.empty else _markdown(self.table)
        note = f"{self.note}\n\n" if self.note else ""
        return f"\n## {self.title}\n\n{note}{body}{self.end}"

    def html(self) -> str:
        note = f"<p>{html.escape(self.note)}</p>\n" if self.note else ""
        empty = "<p>(no finished trials)</p>"
        table = empty if self.table.empty else self.table.to_html(index=False, border=0, classes="t")
        return f"<h2>{html.escape(self.page)}</h2>\n{note}{table}"


def _markdown(frame: pd.DataFrame) -> str:
    cols = [str(c) for c in frame.columns]
    rows = ["| " + " | ".join(str(v) for v in row.tolist()) + " |" for _, row in frame.iterrows()]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *rows]) + "\n"


def load_tables(out_dirs: list) -> pd.DataFrame:
    """The results of `out_dirs` (paths or URIs), merged."""
    frames = []
    for location in out_dirs:
        out = as_outdir(location)
        if not out.exists("results.parquet"):
            raise ConfigError(f"{out.join('results.parquet')}: missing; run `instill run SWEEP --out {out}` first")
        frames.append(pq.read_table(out.path("results.parquet"), filesystem=out.fs).to_pandas())
    return pd.concat(frames, ignore_index=True)


def artifact_roots(out_dirs: list) -> list[str]:
    """Each output directory's artifact store: sweep.json's storage.artifacts, else OUT/artifacts."""
    roots = []
    for location in out_dirs:
        out = as_outdir(location)
        text = out.read_text("sweep.json")
        config = (json.loads(text).get("config") or {}) if text else {}
        roots.append(str((config.get("storage") or {}).get("artifacts") or out.join("artifacts")))
    return list(dict.fromkeys(roots))


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


def _provenance(out_dirs: list, table: pd.DataFrame) -> Section | None:
    """Each output directory's `--set` overrides and plug-ins (imported here from where its run found
    them), with a warning for each plug-in that cannot be imported and each analysis that ran but is
    not registered here: their columns stay in results.parquet, unsummarised. None if nothing to say."""
    rows, problems = [], []
    for location in out_dirs:
        record, failed = read_sweep(location)
        record = record or {}
        found = record.get("plugin_paths", {})
        plugins = [f"{m} ({found.get(m, 'Python path')})" for m in (record.get("config") or {}).get("plugins", [])]
        overrides = " ".join(record.get("overrides", []))
        rows.append({"results": str(location), "--set": overrides, "plug-ins": ", ".join(plugins)})
        problems += [f"{location}: {problem}" for problem in failed]
    configs = table["config_json"].dropna().unique() if "config_json" in table else []
    ran = {a["name"] for text in configs for a in json.loads(text).get("analyses", [])}
    if missing := sorted(ran - set(ANALYSES.names())):
        problems.append(f"analyses {', '.join(missing)} ran but no plug-in imported here registers them")
    if not problems and not any(row["--set"] or row["plug-ins"] for row in rows):
        return None
    note = "".join(f"Warning: {p}. " for p in problems)
    note += "Their columns are in results.parquet but not summarised." if problems else ""
    return Section("Provenance", pd.DataFrame(rows), note=note.strip(), page="Provenance")


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
) -> Path:
    """Summarise the results of `out_dirs` (merged) into `report_dir` (default: first dir's report/).
    `versus`: methods each series is also compared with (`paired_differences`), each comparison a
    finding with a verdict (`statistics.findings`; `margin`: the equivalence margin declared in
    advance); `over`: an axis the series are also averaged over (`mean_over`; with `versus`,
    `mean_over_differences` too)."""
    table = load_tables(out_dirs)
    provenance = _provenance(out_dirs, table)  # imports the runs' plug-ins: their columns are summarised
    # Each raises on a bad --versus, --mean-over or --margin, before anything is written.
    versus = [versus] if isinstance(versus, str) else list(versus or [])
    diffs = _joined([statistics.paired_differences(table, v) for v in versus])
    means = statistics.mean_over(table, over) if over else None
    gaps = _joined([statistics.mean_over_differences(table, over, v) for v in versus]) if over else None
    found = statistics.findings(diffs, margin=margin) if versus else None
    if found is not None and gaps is not None:
        found = pd.concat([found, statistics.findings(gaps, margin=margin).assign(over=over)], ignore_index=True)
    if report_dir is None and "://" in str(out_dirs[0]):
        raise ConfigError(f"{out_dirs[0]} is not a local directory: give the report a local one with --to DIR")
    report_dir = Path(report_dir or Path(out_dirs[0]) / "report")
    report_dir.mkdir(parents=True, exist_ok=True)
    summary, head = statistics.summarise(table), statistics.headline(table, target=target)
    context = ReportContext(summary, table, stored_artifacts(artifact_roots(out_dirs)), _differences)
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

    sections = [
        Section(f"{METRIC} (mean [95% CI] over seeds)", tables.curve_table(summary), page=CURVES),
        Section("Headline", tables.headline_table(head), page="Headline", lead=True),
    ]
    if over:
        title = f"{METRIC}, mean over {over} (per seed, then mean [95% CI] over seeds)"
        sections.append(Section(title, tables.curve_table(means), empty=f"No series differ only in {over}.\n"))
    if versus:
        names, bound = " / ".join(versus), f"±{margin:g}" if margin else "none declared"
        sections.insert(0, Section(
            "Findings", tables.findings_counts(found), page="Findings", lead=True,
            note=f"Each series minus its {names} partner, paired by seed, at each budget: better / worse where the "
            f"95% interval excludes 0, equivalent where it lies inside the margin ({bound}), gated where a quality "
            "gate failed, undecided otherwise. Every finding: findings.md, findings.parquet.",
        ))  # fmt: skip
        (report_dir / "findings.md").write_text(tables.findings_markdown(found))
        title = f"{METRIC}: each series minus the {names} series of the same settings, paired by seed (mean [95% CI])"
        shown = tables.versus_table(diffs, found.iloc[: len(diffs)])
        sections.append(Section(title, shown, empty=f"No series has a {names} partner.\n"))
    if over and versus:
        title = f"{METRIC}: each series minus its {' / '.join(versus)} partner, mean over {over}"
        gap_table = tables.versus_table(gaps.assign(versus=gaps["versus"].astype(str) + f" (same {over})"))
        empty = "No group has a partner at every value."
        sections.append(Section(f"{title} (per seed, then mean [95% CI] over seeds)", gap_table, empty=empty, end="\n"))
    gates = tables.failed_gates(table)
    if not gates.empty:
        note = "These upstream artifacts failed a quality gate; the findings of their trials are gated."
        sections.insert(0, Section("Failed quality gates", gates, note=note, page="Failed quality gates", lead=True))
    for column in plotted:
        wide = tables.non_empty(tables.curve_table(summary, column))
        sections.append(Section(f"{column} (mean [95% CI] over seeds)", wide))
    for name, _, long in profiles:
        title = f"{name} by depth, at each series' largest budget (mean [95% CI] over seeds)"
        sections.append(Section(title, tables.profile_markdown(long)))
    sections += [Section(t.title, t.shown, t.note, page=t.title) for t in extras if isinstance(t, Table)]
    sections += [provenance] if provenance is not None else []
    (report_dir / "summary.md").write_text(_notes(summary, table) + "".join(s.markdown() for s in sections))

    figures: list[tuple[str, str]] = []  # (file, caption)
    if not summary.empty:
        plot_curves(summary, report_dir / "data_efficiency", ylabel="test accuracy")
        figures.append(("data_efficiency.svg", "Data-efficiency curves (mean, 95% CI over seeds)"))
    for column in plotted:
        plot_curves(summary, report_dir / column, metric=column, ylabel=column.replace("_", " "))
        figures.append((f"{column}.svg", f"{column} against budget (mean, 95% CI over seeds)"))
    for name, profile, long in profiles:
        plot_profiles(long, report_dir / f"{name}_profile", profile.xlabel, profile.ylabel)
        figures.append((f"{name}_profile.svg", f"{name} against depth at each series' largest budget (95% CI)"))
    for extra in (e for e in extras if isinstance(e, Figure)):
        save(extra.figure, report_dir / extra.name)
        figures.append((f"{extra.name}.svg", extra.caption))
    sources = ", ".join(str(Path(d)) for d in out_dirs)
    (report_dir / "index.html").write_text(_page(sources, len(table), sections, figures))
    return report_dir


def _notes(summary: pd.DataFrame, table: pd.DataFrame) -> str:
    """What the intervals are, which series have none or too few seeds for them, and which rows have
    analysis errors."""
    text = (
        f"Intervals are 95% intervals of the mean over seeds: Student t (mean ± t(0.975, k-1) · s/√k) below "
        f"{statistics.BCA_FROM} seeds, from then on the smallest interval holding the t and the BCa bootstrap "
        "intervals (docs/STATISTICS.md); the budget interval inverts the t bands of the mean curve.\n"
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


def _page(sources: str, n_rows: int, sections: list[Section], figures: list[tuple[str, str]]) -> str:
    """index.html: offline, one page; the figures load from files beside it."""
    shown = [s for s in sections if s.page]
    lead = "\n".join(s.html() for s in shown if s.lead)
    rest = "\n".join(s.html() for s in shown if not s.lead)
    figs = "\n".join(
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}'
        f"</figcaption></figure>"
        for src, cap in figures
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Instill report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fff; }}
figure {{ display: inline-block; margin: 1em 1em 1em 0; }} img {{ max-width: 100%; }}
table.t {{ border-collapse: collapse; font-size: 0.9em; }}
table.t td, table.t th {{ padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; text-align: left; }}
</style></head>
<body>
<h1>Instill report</h1>
<p>Results from {html.escape(sources)} ({n_rows} rows). Budgets on a log axis; bands are 95% confidence
intervals of the mean over seeds (Student t below 10 seeds; none for a single seed). A series is one configuration;
different configurations are never averaged.</p>
{lead}
<h2>Figures</h2>
{figs}
{rest}
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-figures", imgs.length);
  document.body.setAttribute("data-figures-loaded",
    imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length);
}});
</script>
</body></html>
"""
