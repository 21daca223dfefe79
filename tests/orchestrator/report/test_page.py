"""The report as a reader meets it: tables no wider than 12 columns, one colour per method in every
figure, intervals inside the metric's range, what produced it (provenance), extras' own charts."""

import itertools
import json
import re

import numpy as np
import pandas as pd
import pytest

from orchestrator.report import write_report
from tests.orchestrator.report.synthetic import curves_table, series_rows, write_results


def _many_axes(budgets) -> pd.DataFrame:
    """3 methods x 3 depths x 2 widths x 2 learning rates, at `budgets`, 2 seeds: 36 series."""
    frames = []
    rng = np.random.default_rng(0)
    for method, depth, width, lr in itertools.product(("subtask_induction", "full_transfer", "scratch"), (2, 4, 6),
                                                      (32, 64), (1e-3, 3e-3)):  # fmt: skip
        curve = {n: list(np.clip(0.3 + 0.1 * np.log1p(n) + rng.normal(0, 0.05, 2), 0, 1)) for n in budgets}
        rows = series_rows(method, 0.75 if method == "subtask_induction" else None, curve, n_layers=depth,
                           width=width, lr=lr)  # fmt: skip
        rows["model.width"], rows["model.lr"] = width, lr
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


def _widths(report) -> list[int]:
    md = (report / "summary.md").read_text()
    widths = [line.count("|") - 1 for line in md.splitlines() if line.startswith("|")]
    page = (report / "index.html").read_text()
    for table in re.findall(r"<table.*?</table>", page, re.S):
        header = re.search(r"<tr.*?</tr>", table, re.S).group(0)
        widths.append(header.count("<th"))
    return widths


@pytest.mark.parametrize("budgets", [[0, 10, 100, 1000], list(range(0, 1300, 100))])
def test_no_table_is_wider_than_12_columns_with_many_axes(tmp_path, budgets):
    write_results(tmp_path / "run", _many_axes(budgets))
    report = write_report([tmp_path / "run"], tmp_path / "rep", versus="full_transfer", margin=0.05)
    widths = _widths(report)
    assert widths and max(widths) <= 12, max(widths)
    wide = pd.read_csv(report / "test_acc_by_budget.csv")  # the full pivot: a column per series
    assert wide.shape[1] == 2 + 36
    md = (report / "summary.md").read_text()
    assert "| model.lr | model.n_layers | model.width | series |" in md or "| model.lr | model.n_layers |" in md


def test_tables_are_grouped_by_axis_values(tmp_path):
    table = pd.concat([series_rows(m, None, {10: [0.5, 0.6], 99: [0.7, 0.8]}, n_layers=d)
                       for d in (4, 2) for m in ("scratch", "full_transfer")], ignore_index=True)  # fmt: skip
    write_results(tmp_path / "run", table)
    md = (write_report([tmp_path / "run"], tmp_path / "rep") / "summary.md").read_text()
    rows = [line for line in md.split("## test_acc (mean")[1].split("##")[0].splitlines() if line.startswith("| 2")]
    rows += [line for line in md.split("## test_acc (mean")[1].split("##")[0].splitlines() if line.startswith("| 4")]
    assert len(rows) == 4 and "| model.n_layers | series | n = 10 | n = 99 |" in md


def _page_data(report) -> list[dict]:
    page = (report / "index.html").read_text()
    payload = re.search(r'<script type="application/json" id="instill-charts">(.*?)</script>', page, re.S).group(1)
    return json.loads(payload.replace("<\\/", "</"))


def test_one_colour_per_method_in_every_report_and_every_figure(tmp_path):
    from methods.reports import METHOD_COLOURS, method_colours

    ref = {0: [0.2, 0.3], 99: [0.4, 0.5]}
    a = curves_table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}, "scratch": ref})
    b = curves_table({"scratch": ref, "my_plugin_method": {0: [0.2, 0.3], 99: [0.6, 0.7]}})
    colours = []
    for name, table in (("a", a), ("b", b)):
        write_results(tmp_path / name, table)
        report = write_report([tmp_path / name], tmp_path / f"rep-{name}")
        spec = _page_data(report)[0]["spec"]
        scale = spec["spec"]["layer"][2] if "spec" in spec else spec["layer"][2]
        colour = scale["encoding"]["color"]["scale"]
        colours.append(dict(zip(colour["domain"], colour["range"], strict=True)))
        svg = (report / "data_efficiency.svg").read_text().lower()
        for method, hex_colour in colours[-1].items():
            assert hex_colour in svg, (method, hex_colour)  # the static figure uses the same colour
    assert colours[0]["scratch"] == colours[1]["scratch"] == METHOD_COLOURS["scratch"]
    assert colours[0]["subtask_induction"] == METHOD_COLOURS["subtask_induction"]
    assert colours[1]["my_plugin_method"] == method_colours(["my_plugin_method"])["my_plugin_method"]
    assert len(set(colours[1].values())) == 2


def test_intervals_stay_inside_the_metrics_range_in_both_figures(tmp_path):
    # Two seeds far apart: the t interval of the mean spans far beyond [0, 1] unless clipped.
    write_results(tmp_path / "run", curves_table({"scratch": {10: [0.05, 0.95], 99: [0.1, 1.0]}}))
    report = write_report([tmp_path / "run"], tmp_path / "rep")
    rows = _page_data(report)[0]["rows"]
    test_acc = rows["metrics"].index("test_acc")
    bounds = [v for r in rows["means"] if r[1] == test_acc for v in r[4:6]]
    assert bounds and min(bounds) >= 0 and max(bounds) <= 1 and min(bounds) == 0 and max(bounds) == 1
    from orchestrator.report.figures import _limits

    low, high = _limits([np.array([-0.3, 0.5, 1.3])], "test_acc")  # the static figure's y range
    assert -0.021 <= low < 0 and 1 < high <= 1.021
    assert _limits([np.array([-3.0, 5.0])], "lmc_barrier")[0] < -3  # a column without a range keeps its own


def test_provenance_names_command_code_machine_and_rebuild_command(tmp_path, monkeypatch):
    from orchestrator.config import load_sweep
    from orchestrator.outdir import prepare_out_dir
    from tests.conftest import tiny_raw

    table = curves_table({"scratch": {0: [0.2, 0.3], 99: [0.4, 0.5]}})
    table["code_version"] = "git 0123456789ab-dirty"
    table["versions"] = json.dumps({"python": "3.11.7", "torch": "2.4.0", "ray": "2.50.0", "instill": "0.1.0"})
    table["started_at"] = 1_800_000_000.0 + np.arange(len(table)) * 60
    table["finished_at"] = table["started_at"] + 30
    table["total_s"] = 30.0
    table["device"], table["worker"] = "cpu", "node-a:123"
    write_results(tmp_path / "old", table)
    report = write_report([tmp_path / "old"], tmp_path / "rep")
    md = (report / "summary.md").read_text()
    section = md.split("## Provenance")[1]
    assert "| command | not recorded |" in section  # an older run recorded no command
    assert "git 0123456789ab-dirty (4 rows); uncommitted changes: yes" in section
    assert "python 3.11.7, torch 2.4.0, ray 2.50.0, instill 0.1.0" in section
    assert "2.0 min of trial time" in section and "0-1 (2 seeds)" in section and "node-a (4 trials)" in section
    assert f"instill report {tmp_path / 'old'} --to {tmp_path / 'rep'} --target 0.9" in section

    # A run records its command and machine in sweep.json, and the report shows them.
    monkeypatch.setattr("sys.argv", ["/x/.venv/bin/instill", "run", "sweep.yaml", "--out", "runs/x"])
    prepare_out_dir(load_sweep(tiny_raw(name="prov")), tmp_path / "old", force=True)
    report = write_report([tmp_path / "old"], tmp_path / "rep")
    section = (report / "summary.md").read_text().split("## Provenance")[1]
    assert "| command | instill run sweep.yaml --out runs/x (in " in section
    assert "| machine | driver: " in section and "CPUs), GPUs: " in section
    assert (
        "resolved config: sweep_config.json" in section
        and json.loads((report / "sweep_config.json").read_text())["name"]
    )
    page = (report / "index.html").read_text()
    assert page.index("instill run sweep.yaml") < page.index("<h2>")  # named on the first line


def test_an_extra_may_give_an_interactive_chart_beside_its_static_figure(tmp_path):
    from methods.reports import REPORTS, Figure, pyplot, register_report

    @register_report("probe_vega")
    def _probe(ctx):
        fig, ax = pyplot().subplots()
        ax.plot([0, 1], [0, 1])
        spec = {"data": {"values": [{"x": 1, "y": 2}]}, "mark": "point",
                "encoding": {"x": {"field": "x", "type": "quantitative"}}}  # fmt: skip
        return [Figure("probe_vega", "Probe chart", fig, vega=spec), Figure("probe_png", "Probe png", fig)]

    try:
        write_results(tmp_path / "run", curves_table({"scratch": {0: [0.2, 0.25], 99: [0.4, 0.5]}}))
        report = write_report([tmp_path / "run"])
    finally:
        del REPORTS._items["probe_vega"]
    charts = {c["id"]: c for c in _page_data(report)}
    assert charts["chart-probe_vega"]["spec"]["mark"] == "point"
    assert (report / "probe_vega.svg").exists() and (report / "probe_png.png").exists()
    page = (report / "index.html").read_text()
    assert 'id="chart-probe_vega"' in page and 'src="data:image/png;base64,' in page  # the PNG inside the page


def test_the_mask_extra_draws_sparsity_against_subtask_accuracy_as_an_interactive_chart(tmp_path):
    write_results(tmp_path / "run", curves_table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.75))
    report = write_report([tmp_path / "run"], tmp_path / "rep")
    charts = {c["id"]: c["spec"] for c in _page_data(report)}
    values = charts["chart-sparsity_vs_subtask"]["data"]["values"]
    assert values == [{"line": "subtask_induction", "sparsity": 0.75, "subtask_acc": 0.99}]
    assert (report / "sparsity_vs_subtask.png").exists()  # the static figure stays, for papers


def test_the_headline_says_when_no_series_reaches_the_target(tmp_path):
    write_results(tmp_path / "run", curves_table({"scratch": {10: [0.2, 0.3], 99: [0.4, 0.5]}}))
    md = (write_report([tmp_path / "run"], tmp_path / "rep") / "summary.md").read_text()
    assert "No series reaches 0.9 test accuracy within its budgets (up to 99)" in md
    md = (write_report([tmp_path / "run"], tmp_path / "rep", target=0.4) / "summary.md").read_text()
    assert "No series reaches" not in md
