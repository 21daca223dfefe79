"""The report's files: summary.md, index.html (in a real browser), figures and Parquet tables."""

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.report import write_report
from tests.orchestrator.report.synthetic import curves_table, series_rows, write_results


def test_report_merges_directories_and_writes_every_file(tmp_path):
    a = curves_table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.75)
    b = curves_table({"scratch": {0: [0.2, 0.25], 99: [0.4, 0.5]}})
    write_results(tmp_path / "a", a)
    write_results(tmp_path / "b", b)
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    for name in (
        "summary.parquet",
        "headline.parquet",
        "summary.md",
        "index.html",
        "data_efficiency.png",
        "data_efficiency.svg",
        "sparsity_vs_subtask.png",
    ):
        assert (report / name).exists(), name
    assert set(pd.read_parquet(report / "summary.parquet")["method"]) == {"subtask_induction", "scratch"}
    assert "subtask_induction @0.75" in (report / "summary.md").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _requests_from_the_page(netlog) -> list[str]:
    """The URLs that a page opened from file:// asked for, from Chromium's --log-net-log (the
    browser's own background requests have no file:// site and are not counted)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"] if e["type"] == start
            and "site=file://" in e["params"].get("site_for_cookies", "")
            and not e["params"]["url"].startswith(("file:", "data:"))]  # fmt: skip


def _dump_dom(url, profile, netlog):
    # The proxy goes nowhere: a page that needed the network would not draw; the net log records any try.
    argv = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--proxy-server=http://127.0.0.1:9",
            f"--log-net-log={netlog}", "--virtual-time-budget=15000", "--dump-dom", url]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=180).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_index_html_draws_its_charts_in_a_real_browser_with_no_network(tmp_path):
    """Opened as a person would, offline: every chart drawn by the page's own scripts (one point per
    seed, findings above the chart), no request leaving the machine, and a screenshot with ink."""
    from PIL import Image

    control = tmp_path / "control.html"  # the check can fail: a page that loads from the network
    control.write_text('<html><body><img src="http://192.0.2.1/x.png"><script src="https://example.invalid/a.js">'
                       "</script></body></html>")  # fmt: skip
    _dump_dom(control.as_uri(), tmp_path / "p0", tmp_path / "control.json")
    assert len(_requests_from_the_page(tmp_path / "control.json")) == 2

    table = pd.concat([series_rows("subtask_induction", 0.75, {0: [0.3, 0.35, 0.3], 99: [0.9, 0.92, 0.91]}, n_layers=d)
                       for d in (2, 4)] + [series_rows("scratch", None, {0: [0.2, 0.25, 0.3], 99: [0.4, 0.5, 0.45]},
                                                       n_layers=d) for d in (2, 4)], ignore_index=True)  # fmt: skip
    write_results(tmp_path / "run", table)
    report = write_report([tmp_path / "run"], versus="scratch")
    page = (report / "index.html").read_text()
    assert len(page.encode()) <= 5 * 2**20
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)  # nothing to fetch
    dom = _dump_dom((report / "index.html").as_uri(), tmp_path / "p1", tmp_path / "net.json")
    drawn = 'data-charts="1"' in dom and 'data-charts-rendered="1"' in dom and 'data-charts-failed="0"' in dom
    assert drawn, dom[-800:]
    assert dom.count('aria-roledescription="circle"') == len(table)  # one point per seed, budget and series
    assert dom.count('aria-roledescription="line mark"') == 4  # two panels (depths), two methods in each
    assert "model.n_layers = 2" in dom and "model.n_layers = 4" in dom
    assert 'class="vega-bind"' in dom and '<option value="val_acc">' in dom  # the column menu
    assert '<option value="one panel">' in dom  # the layout menu
    assert dom.index("Every finding") < dom.index('id="chart-curves"')
    assert _requests_from_the_page(tmp_path / "net.json") == []
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p2'}", "--window-size=1200,1400",
                    "--virtual-time-budget=15000", f"--screenshot={shot}", (report / "index.html").as_uri()],
                   capture_output=True, timeout=180, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.01, "too little ink: text and figures did not render"


def test_summary_md_says_when_a_series_has_no_interval(tmp_path):
    write_results(tmp_path / "run", curves_table({"scratch": {0: [0.2], 99: [0.95]}}))
    md = (write_report([tmp_path / "run"]) / "summary.md").read_text()
    assert "Student t" in md and "One seed only, so no interval (NaN bounds)" in md
    assert "[no CI: one seed]" in md


def test_representation_r2_profile_is_drawn_against_depth_at_the_largest_budget(tmp_path):
    from orchestrator.report import t_interval

    layers = ["embed", "block0", "final"]  # the model's order: not alphabetical
    table = curves_table({"scratch": {10: [0.2, 0.3, 0.25], 99: [0.5, 0.6, 0.55]}})
    config = json.dumps({"analyses": [{"name": "representation_r2"}]})
    table["config_json"] = config
    table["representation_r2_layers"] = ",".join(layers)
    values = {}
    for depth, layer in enumerate(layers):
        for feature in ("a", "ab_mod_p"):
            col = f"representation_r2_{layer}_{feature}"
            # known answer: R² of feature a falls with depth, of ab mod p rises; the small budget differs
            base = (0.9 - 0.3 * depth) if feature == "a" else (0.1 + 0.3 * depth)
            table[col] = [
                base + 0.01 * seed + (0.5 if n == 10 else 0)
                for n, seed in zip(table["n_train"], table["seed"], strict=True)
            ]
            values[(layer, feature)] = [base + 0.01 * s for s in range(3)]
    write_results(tmp_path / "run", table)
    report = write_report([tmp_path / "run"])
    long = pd.read_parquet(report / "representation_r2_profile.parquet")
    assert set(long["n_train"]) == {99} and len(long) == 6
    assert list(long[long["line"] == "a"].sort_values("depth")["position"]) == layers
    for (layer, feature), vals in values.items():
        row = long[(long["position"] == layer) & (long["line"] == feature)].iloc[0]
        assert row["mean"] == pytest.approx(np.mean(vals))
        lo, hi = t_interval(np.array(vals))
        assert (row["ci_lo"], row["ci_hi"]) == pytest.approx((lo, hi))
        assert row["depth"] == layers.index(layer)
    md = (report / "summary.md").read_text()
    assert "## representation_r2 by depth" in md
    section = md.split("## representation_r2 by depth")[1]
    assert section.index("embed") < section.index("block0") < section.index("final")  # columns in depth order
    assert (report / "representation_r2_profile.svg").exists()
    assert "representation_r2_profile.svg" in (report / "index.html").read_text()


def test_no_profile_without_the_analysis(tmp_path):
    write_results(tmp_path / "run", curves_table({"scratch": {10: [0.2, 0.3], 99: [0.5, 0.6]}}))
    report = write_report([tmp_path / "run"])
    assert not (report / "representation_r2_profile.parquet").exists()


def test_report_versus_writes_the_paired_table(tmp_path, capsys):
    table = pd.concat([series_rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}),
                       series_rows("full_transfer", None, {99: [0.4, 0.45, 0.65]})], ignore_index=True)  # fmt: skip
    (tmp_path / "run").mkdir()
    table.to_parquet(tmp_path / "run" / "results.parquet")
    assert main(["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--versus", "full_transfer"]) == 0
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "minus the full_transfer series of the same settings, paired by seed" in text
    assert "subtask_induction @0.75 − full_transfer" in text and "+0.100 [" in text
    assert len(pd.read_parquet(tmp_path / "rep" / "versus.parquet")) == 1
    assert main(["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--versus", "scratch"]) == 2
    assert "no finished trial ran 'scratch'" in capsys.readouterr().err


def test_findings_come_first_with_their_verdicts_and_cited_anchors(tmp_path):
    """`--versus` and `--margin`: findings.parquet and findings.md (anchors for `check-claims`), the
    verdict counts first in summary.md and on index.html, each paired cell with its verdict."""
    table = pd.concat([series_rows("subtask_induction", 0.75, {99: [0.9, 0.92, 0.91], 300: [0.5, 0.6, 0.7]}),
                       series_rows("full_transfer", None, {99: [0.5, 0.52, 0.5], 300: [0.5, 0.6, 0.7]})],
                      ignore_index=True)  # fmt: skip
    write_results(tmp_path / "run", table)
    argv = ["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--versus", "full_transfer"]
    assert main([*argv, "--margin", "0.03"]) == 0
    every = pd.read_parquet(tmp_path / "rep" / "findings.parquet")
    found = every[every["metric"] == "test_acc"].set_index("n_train")
    assert list(found["verdict"]) == ["better", "equivalent"] and set(found["margin"]) == {0.03}
    # The headline: subtask induction is at 0.9 by n = 99 in every seed, full transfer never by 300.
    (reach,) = every[every["metric"] == "budget_to_0.9"].itertuples()
    assert reach.verdict == "better" and reach.ci_hi == float("inf") and reach.n_train == 300
    assert reach.id == "budget_to_0.9-subtask_induction-0.75-vs-full_transfer-n300"
    md = (tmp_path / "rep" / "findings.md").read_text()
    assert f'<a id="{found.loc[99, "id"]}"></a>**better**' in md
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert text.index("## Findings") < text.index("## test_acc (mean") and "(±0.03)" in text
    assert "+0.403 [" in text and "] better" in text
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.index("Findings") < page.index('id="chart-curves"')
    assert "Fewer than 15 seeds at some budgets" in text and "subtask_induction @0.75" in text
    assert main([*argv, "--margin", "0"]) == 2  # a margin must be positive


def test_findings_judge_other_columns_on_request(tmp_path):
    """`--metric COLUMN`: that column's paired differences are findings too, with their own ids (the
    test-accuracy findings keep theirs); a column the results lack is a clear error (exit 2)."""
    si = series_rows("subtask_induction", 0.75, {99: [0.9, 0.92, 0.91]})
    ft = series_rows("full_transfer", None, {99: [0.5, 0.52, 0.5]})
    si["splits_randomised_image_acc"], ft["splits_randomised_image_acc"] = [0.2, 0.25, 0.22], [0.6, 0.62, 0.61]
    write_results(tmp_path / "run", pd.concat([si, ft], ignore_index=True))
    argv = ["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--versus", "full_transfer"]
    assert main([*argv, "--metric", "splits_randomised_image_acc", "--margin", "0.03"]) == 0
    found = pd.read_parquet(tmp_path / "rep" / "findings.parquet").set_index("metric")
    assert list(found.index) == ["test_acc", "splits_randomised_image_acc"]  # one budget: no headline finding
    assert list(found["verdict"]) == ["better", "worse"]
    assert found.loc["test_acc", "id"] == "subtask_induction-0.75-vs-full_transfer-n99"
    assert found.loc["splits_randomised_image_acc", "id"] == (
        "splits_randomised_image_acc-subtask_induction-0.75-vs-full_transfer-n99"
    )
    md = (tmp_path / "rep" / "findings.md").read_text()
    assert "**worse**: subtask_induction @0.75 − full_transfer, splits_randomised_image_acc, n = 99" in md
    assert main([*argv, "--metric", "splits_nope_acc"]) == 2


def test_the_sweeps_report_block_sets_what_the_report_compares(tmp_path):
    table = pd.concat([series_rows("subtask_induction", 0.75, {99: [0.9, 0.92, 0.91]}),
                       series_rows("full_transfer", None, {99: [0.5, 0.52, 0.5]})], ignore_index=True)  # fmt: skip
    write_results(tmp_path / "run", table)
    config = {"report": {"versus": ["full_transfer"], "margin": 0.05}}
    (tmp_path / "run" / "sweep.json").write_text(json.dumps({"config": config}))
    assert main(["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep")]) == 0
    found = pd.read_parquet(tmp_path / "rep" / "findings.parquet")
    assert set(found.loc[found["metric"] == "test_acc", "margin"]) == {0.05}
    assert main(["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--margin", "0.02"]) == 0
    assert set(pd.read_parquet(tmp_path / "rep" / "findings.parquet")["margin"]) == {0.02}  # the option wins


def test_failed_quality_gates_head_the_report(tmp_path):
    table = curves_table({"subtask_induction": {99: [0.5, 0.6, 0.7]}, "scratch": {99: [0.4, 0.5, 0.6]}})
    table["gates_failed"] = np.where(table["method"] == "scratch", "", "source.learnt,mask.computes_subtask")
    write_results(tmp_path / "run", table)
    write_report([tmp_path / "run"], tmp_path / "rep", versus="scratch")
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert text.index("## Failed quality gates") < text.index("## Findings") < text.index("## test_acc (mean")
    assert "| source.learnt | 3 |" in text
    assert list(pd.read_parquet(tmp_path / "rep" / "findings.parquet")["verdict"]) == ["gated"]


def test_report_versus_and_mean_over_write_the_mean_gap(tmp_path):
    runs = [series_rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, n_layers=2),
            series_rows("full_transfer", None, {99: [0.4, 0.5, 0.6]}, n_layers=2),
            series_rows("subtask_induction", 0.75, {99: [0.3, 0.4, 0.5]}, n_layers=4),
            series_rows("full_transfer", None, {99: [0.3, 0.4, 0.5]}, n_layers=4)]  # fmt: skip
    table = pd.concat(runs, ignore_index=True)
    (tmp_path / "run").mkdir()
    table.to_parquet(tmp_path / "run" / "results.parquet")
    argv = ["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--versus", "full_transfer"]
    assert main([*argv, "--mean-over", "model.n_layers"]) == 0
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "minus its full_transfer partner, mean over model.n_layers" in text and "+0.050 [" in text
    assert len(pd.read_parquet(tmp_path / "rep" / "versus_mean_over.parquet")) == 1


def test_report_mean_over_writes_its_table(tmp_path):
    shallow = series_rows("subtask_induction", 0.75, {99: [0.5, 0.6, 0.7]}, n_layers=2)
    deep = series_rows("subtask_induction", 0.75, {99: [0.3, 0.4, 0.5]}, n_layers=4)
    table = pd.concat([shallow, deep], ignore_index=True)
    (tmp_path / "run").mkdir()
    table.to_parquet(tmp_path / "run" / "results.parquet")
    assert main(["report", str(tmp_path / "run"), "--to", str(tmp_path / "rep"), "--mean-over", "model.n_layers"]) == 0
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "mean over model.n_layers (per seed, then mean [95% CI] over seeds)" in text
    assert "0.500 [" in text  # (0.4 + 0.5 + 0.6) / 3
    assert len(pd.read_parquet(tmp_path / "rep" / "mean_over.parquet")) == 1


def test_a_registered_report_extra_adds_its_table_and_figure(tmp_path):
    """Extras are plug-ins (`methods.reports`): the report runs each and writes what it returns."""
    from methods.reports import REPORTS, Figure, Table, pyplot, register_report

    seen = []

    @register_report("probe_extra")
    def _probe(ctx):
        seen.append((sorted(ctx.summary["label"].unique()), ctx.artifacts("no_such_kind")))
        frame = pd.DataFrame({"series": ctx.summary["label"].unique(), "value": 1.0})
        fig, ax = pyplot().subplots()
        ax.plot([0, 1], [0, 1])
        return [Table("probe_extra", "Probe table", frame, frame, "a note"), Figure("probe_extra", "Probe figure", fig)]

    try:
        write_results(tmp_path / "run", curves_table({"scratch": {0: [0.2, 0.25], 99: [0.4, 0.5]}}))
        report = write_report([tmp_path / "run"])
    finally:
        del REPORTS._items["probe_extra"]
    assert seen == [(["scratch"], [])]
    assert list(pd.read_parquet(report / "probe_extra.parquet")["series"]) == ["scratch"]
    assert "## Probe table\n\na note" in (report / "summary.md").read_text()
    page = (report / "index.html").read_text()
    assert "Probe table" in page and "probe_extra.svg" in page and (report / "probe_extra.png").exists()
