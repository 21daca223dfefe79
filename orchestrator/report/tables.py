"""The report's tables as people read them: at most `MAX_COLUMNS` (12) columns, a row per series
grouped by the values of the axes the series differ in, a column per budget, cells `mean [95% CI]`
(long where budgets are too many; `fit` makes any table long that would be wider). The full pivots
go to CSV files and the long data to the Parquet files."""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.report.layout import panel_axes
from orchestrator.report.series import _fmt_value, prepare
from orchestrator.report.statistics import METRIC, VERDICTS

MAX_COLUMNS = 12  # no table in summary.md or on index.html is wider; the full pivots are CSV files


def _cell(mean: float, lo: float, hi: float, spec: str = ".3f") -> str:
    """`mean [lo, hi]`; the mean alone where there is no interval (one seed)."""
    return f"{mean:{spec}}" if pd.isna(lo) else f"{mean:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def _wide(frame: pd.DataFrame, columns: list[str], cells: list[str]) -> pd.DataFrame:
    """The full pivot, for the CSV files: rows (task, n_train), one column per distinct `columns`
    entry in order of first appearance, cells from `cells` ("" where a column has no value at a budget)."""
    long = frame.assign(_column=columns, _cell=cells)
    wide = long.pivot_table(index=["task", "n_train"], columns="_column", values="_cell", aggfunc="first")
    wide = wide[[c for c in dict.fromkeys(columns) if c in wide.columns]]
    wide.columns.name = None
    return wide.fillna("").reset_index()


def _ids(frame: pd.DataFrame) -> list[str]:
    """The columns a table's rows are grouped by: the task where there are several, then the axes
    that differ between the series (`layout.panel_axes`)."""
    return [c for c in panel_axes(frame) if c != "task"] if frame["task"].nunique() == 1 else panel_axes(frame)


def by_budget(frame: pd.DataFrame, names: list[str], cells: list[str], name: str = "series") -> pd.DataFrame:
    """Long by series, grouped by axis values: a row per series (`names`) with its axis values, a column
    per budget (`n = 99`), or, where that would be wider than MAX_COLUMNS, a row per series and budget."""
    ids = _ids(frame)
    long = frame[[*ids, "n_train"]].assign(**{name: names, "_cell": cells})
    long = long.sort_values([*ids, name], key=lambda c: c.map(_order), kind="stable")
    for a in ids:
        long[a] = long[a].map(lambda v: "-" if pd.isna(v) else _fmt_value(v))
    budgets = sorted(long["n_train"].unique())
    if len(ids) + 1 + len(budgets) > MAX_COLUMNS:
        out = long.rename(columns={"_cell": "mean [95% CI]"}).sort_values([*ids, name, "n_train"], kind="stable")
        return out.reset_index(drop=True)
    wide = long.pivot_table(index=[*ids, name], columns="n_train", values="_cell", aggfunc="first", sort=False)
    wide = wide.reindex(columns=budgets)
    wide.columns = [f"n = {n:g}" for n in budgets]
    return wide.fillna("").reset_index()


def _order(value):
    """Sort key of a table cell: numbers by value, before text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def fit(frame: pd.DataFrame, limit: int | None = None) -> pd.DataFrame:
    """`frame` as it is where it has at most `limit` (MAX_COLUMNS) columns; otherwise long: its first
    three columns, then one row per remaining column (`column`, `value`), so that no table is wider."""
    limit = limit or MAX_COLUMNS
    if frame.shape[1] <= limit:
        return frame
    ids = [str(c) for c in frame.columns[:3]]
    long = frame.astype({c: object for c in frame.columns}).melt(id_vars=ids, var_name="column", value_name="value")
    order = {c: i for i, c in enumerate(frame.columns[3:])}
    long = long.assign(_row=long.groupby("column").cumcount(), _col=long["column"].map(order))
    return long.sort_values(["_row", "_col"], kind="stable").drop(columns=["_row", "_col"]).reset_index(drop=True)


def _cells(summary: pd.DataFrame, metric: str) -> list[str]:
    cols = [summary[f"{metric}_{s}"] for s in ("mean", "ci_lo", "ci_hi")]
    return ["" if pd.isna(mu) else _cell(mu, lo, hi) for mu, lo, hi in zip(*cols, strict=True)]


def curve_table(summary: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Series as rows grouped by their axis values, budgets as columns (`by_budget`), cells
    `mean [95% CI]` (the mean alone for one seed); series with no value of `metric` are left out."""
    if summary.empty or f"{metric}_mean" not in summary:
        return pd.DataFrame()
    part = summary[summary[f"{metric}_mean"].notna()]
    return by_budget(part, list(part["label"]), _cells(part, metric)) if not part.empty else pd.DataFrame()


def curve_pivot(summary: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """The full pivot (budgets as rows, a column per series), for `<metric>_by_budget.csv`."""
    if summary.empty or f"{metric}_mean" not in summary:
        return pd.DataFrame()
    return _wide(summary, list(summary["label"]), _cells(summary, metric))


def _versus_cells(diffs: pd.DataFrame, found: pd.DataFrame | None) -> list[str]:
    cells = [_cell(*t, "+.3f") for t in diffs[["diff_mean", "diff_ci_lo", "diff_ci_hi"]].itertuples(index=False)]
    if found is not None:
        cells = [f"{cell} {verdict}" for cell, verdict in zip(cells, found["verdict"], strict=True)]
    return cells


def versus_table(diffs: pd.DataFrame, found: pd.DataFrame | None = None) -> pd.DataFrame:
    """A row per comparison (`label − versus`) grouped by axis values, budgets as columns, cells
    `mean [95% CI]`, followed by the finding's verdict when `found` (`statistics.findings` of
    `diffs`, row for row) is given."""
    if diffs is None or diffs.empty:
        return pd.DataFrame()
    names = [f"{a} − {b}" for a, b in zip(diffs["label"], diffs["versus"], strict=True)]
    return by_budget(diffs, names, _versus_cells(diffs, found), name="comparison")


def versus_pivot(diffs: pd.DataFrame, found: pd.DataFrame | None = None) -> pd.DataFrame:
    """The full pivot of `versus_table` (budgets as rows), for the CSV file."""
    if diffs is None or diffs.empty:
        return pd.DataFrame()
    names = [f"{a} − {b}" for a, b in zip(diffs["label"], diffs["versus"], strict=True)]
    return _wide(diffs, names, _versus_cells(diffs, found))


def findings_list(found: pd.DataFrame) -> pd.DataFrame:
    """Every finding, for the page: comparison, budget, difference [95% CI], seeds, verdict."""
    if found is None or found.empty:
        return pd.DataFrame()
    over = found["over"] if "over" in found else pd.Series([None] * len(found), index=found.index)
    return pd.DataFrame({
        "comparison": _pair(found) + over.map(lambda o: f" (mean over {o})" if isinstance(o, str) else ""),
        "n": found["n_train"].map(lambda n: f"{n:g}"),
        "difference [95% CI]": [_cell(d, lo, hi, "+.3f") for d, lo, hi in
                                zip(found["diff"], found["ci_lo"], found["ci_hi"], strict=True)],
        "seeds": found["seeds"], "verdict": found["verdict"],
    })  # fmt: skip


def _pair(found: pd.DataFrame) -> pd.Series:
    """`label − versus`, with the judged column where it is not test accuracy."""
    metric = found["metric"] if "metric" in found else pd.Series([METRIC] * len(found), index=found.index)
    return found["label"] + " − " + found["versus"] + metric.map(lambda m: "" if m == METRIC else f", {m}")


def findings_counts(found: pd.DataFrame) -> pd.DataFrame:
    """Per comparison (`label − versus`): how many budgets got each verdict."""
    if found is None or found.empty:
        return pd.DataFrame()
    pair = _pair(found)
    counts = pd.crosstab(pair, found["verdict"]).reindex(columns=list(VERDICTS), fill_value=0)
    return counts.rename_axis(None, axis=1).reset_index(names="comparison")


def findings_markdown(found: pd.DataFrame) -> str:
    """findings.md: one line per finding under the anchor documents cite (`orchestrator.claims`)."""
    lines = ["# Findings", "", "Each series minus its partner, paired by seed: mean [95% CI], seeds, verdict.", ""]
    for row in found.itertuples(index=False):
        over = f", mean over {row.over}" if isinstance(getattr(row, "over", None), str) else ""
        cell = _cell(row.diff, row.ci_lo, row.ci_hi, "+.3f")
        judged = "" if getattr(row, "metric", METRIC) == METRIC else f", {row.metric}"
        censored = getattr(row, "censored", 0)
        bound = f" ({censored:g} of them only a bound: a curve outside the budgets)" if censored > 0 else ""
        lines.append(f'- <a id="{row.id}"></a>**{row.verdict}**: {row.label} − {row.versus}{judged}, '
                     f"n = {row.n_train:g}{over}: {cell}, {row.seeds} seeds{bound}")  # fmt: skip
    return "\n".join(lines) + "\n"


def failed_gates(table: pd.DataFrame) -> pd.DataFrame:
    """Per failed quality gate (`gates_failed` of the rows): how many trials it gates, and one of them."""
    if "gates_failed" not in table:
        return pd.DataFrame()
    rows = table[table["gates_failed"].fillna("") != ""]
    gates = rows.assign(gate=rows["gates_failed"].str.split(",")).explode("gate")
    out = gates.groupby("gate").agg(trials=("trial", "nunique"), example=("trial", "first"))
    return out.reset_index()


def headline_table(head: pd.DataFrame) -> pd.DataFrame:
    """Per series: budget to the target [95% CI], curve area, and the data saved against its reference."""
    if head.empty:
        return head

    def n_text(row):
        if not np.isfinite(row["n_to_target"]):
            return f"not reached (> {row['max_budget']:.0f})"
        if np.isnan(row["n_to_target_ci_lo"]):
            return f"{row['n_to_target']:.0f} [no CI: one seed]"
        return f"{row['n_to_target']:.0f} [{_fmt_n(row['n_to_target_ci_lo'])}, {_fmt_n(row['n_to_target_ci_hi'])}]"

    def ratio_text(row):
        if not np.isfinite(row["ratio_vs_reference"]):
            return ""
        return (">" if row["ratio_is_lower_bound"] else "") + f"{row['ratio_vs_reference']:.1f}x"

    refs = sorted({str(label).split(" [")[0] for label in head["reference_label"].dropna()}) or ["reference"]
    return pd.DataFrame({"task": head["task"], "series": head["label"], "seeds": head["seeds"],
                         f"n to {head['target'].iloc[0]:g} [95% CI]": head.apply(n_text, axis=1),
                         "area (log budget)": head["area"].map(lambda v: f"{v:.3f}"),
                         f"data saved vs {', '.join(refs)}": head.apply(ratio_text, axis=1)})  # fmt: skip


def _fmt_n(v: float) -> str:
    return "inf" if not np.isfinite(v) else f"{v:.0f}"


def profile_table(summary: pd.DataFrame, table: pd.DataFrame, profile, columns: list[str]) -> pd.DataFrame:
    """A column family drawn as profiles (see `methods.analysis.Profile`), long: per series at its
    largest budget, per line and position, the mean and 95% CI over seeds, with the position's
    depth (its index in the model's order, 0 = input side) and the relative depth in [0, 1]."""
    done, _ = prepare(table)
    rows = []
    for series, group in summary.groupby("series", sort=False):
        top = group.loc[group["n_train"].idxmax()]
        orders = done.loc[done["series"] == series, profile.order].dropna() if profile.order in done else []
        order = str(orders.iloc[0]).split(",") if len(orders) else []
        for col in columns:
            if f"{col}_mean" not in top or pd.isna(top[f"{col}_mean"]):
                continue
            position, line = profile.split(col)
            if position not in order:
                continue
            depth = order.index(position)
            rows.append({"task": top["task"], "label": top["label"], "method": top["method"], "series": series,
                         "n_train": top["n_train"],
                         "seeds": top["seeds"], "line": line, "position": position, "depth": depth,
                         "relative_depth": depth / max(len(order) - 1, 1), "mean": top[f"{col}_mean"],
                         "ci_lo": top[f"{col}_ci_lo"], "ci_hi": top[f"{col}_ci_hi"]})  # fmt: skip
    return pd.DataFrame(rows)


def profile_markdown(long: pd.DataFrame) -> pd.DataFrame:
    """Rows: series and line; columns: positions in depth order; cells: mean [95% CI]."""
    positions = list(dict.fromkeys(long.sort_values(["depth"], kind="stable")["position"]))
    text = [_cell(m, lo, hi) for m, lo, hi in zip(long["mean"], long["ci_lo"], long["ci_hi"], strict=True)]
    cells = long.assign(cell=text)
    wide = cells.pivot_table(index=["label", "n_train", "line"], columns="position", values="cell", aggfunc="first")
    return wide.reindex(columns=positions).reset_index().rename(columns={"label": "series", "line": "feature"})
