"""The report's tables as people read them: budgets as rows, series as columns, cells `mean [95% CI]`
(long format stays in the Parquet files)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.report.series import prepare
from orchestrator.report.statistics import METRIC, VERDICTS


def _cell(mean: float, lo: float, hi: float, spec: str = ".3f") -> str:
    """`mean [lo, hi]`; the mean alone where there is no interval (one seed)."""
    return f"{mean:{spec}}" if pd.isna(lo) else f"{mean:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def _wide(frame: pd.DataFrame, columns: list[str], cells: list[str]) -> pd.DataFrame:
    """Rows (task, n_train), one column per distinct `columns` entry in order of first appearance,
    cells from `cells` ("" where a column has no value at a budget)."""
    long = frame.assign(_column=columns, _cell=cells)
    wide = long.pivot_table(index=["task", "n_train"], columns="_column", values="_cell", aggfunc="first")
    wide = wide[[c for c in dict.fromkeys(columns) if c in wide.columns]]
    wide.columns.name = None
    return wide.fillna("").reset_index()


def curve_table(summary: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Budgets as rows, series (by label) as columns, cells `mean [95% CI]` (the mean alone for one
    seed; empty where the series has no value, e.g. an ablation of a model without a transplant)."""
    if summary.empty or f"{metric}_mean" not in summary:
        return pd.DataFrame()
    cols = [summary[f"{metric}_{s}"] for s in ("mean", "ci_lo", "ci_hi")]
    cells = ["" if pd.isna(mu) else _cell(mu, lo, hi) for mu, lo, hi in zip(*cols, strict=True)]
    return _wide(summary, list(summary["label"]), cells)


def non_empty(wide: pd.DataFrame) -> pd.DataFrame:
    """`wide` without the series columns that have no value at any budget."""
    keep = [c for c in wide.columns if c in ("task", "n_train") or (wide[c] != "").any()]
    return wide[keep]


def versus_table(diffs: pd.DataFrame, found: pd.DataFrame | None = None) -> pd.DataFrame:
    """Budgets as rows, series (`label − versus`) as columns, cells `mean [95% CI]`, followed by the
    finding's verdict when `found` (`statistics.findings` of `diffs`, row for row) is given."""
    if diffs is None or diffs.empty:
        return pd.DataFrame()
    columns = [f"{a} − {b}" for a, b in zip(diffs["label"], diffs["versus"], strict=True)]
    cells = [_cell(*t, "+.3f") for t in diffs[["diff_mean", "diff_ci_lo", "diff_ci_hi"]].itertuples(index=False)]
    if found is not None:
        cells = [f"{cell} {verdict}" for cell, verdict in zip(cells, found["verdict"], strict=True)]
    return _wide(diffs, columns, cells)


def findings_counts(found: pd.DataFrame) -> pd.DataFrame:
    """Per comparison (`label − versus`): how many budgets got each verdict."""
    if found is None or found.empty:
        return pd.DataFrame()
    pair = found["label"] + " − " + found["versus"]
    counts = pd.crosstab(pair, found["verdict"]).reindex(columns=list(VERDICTS), fill_value=0)
    return counts.rename_axis(None, axis=1).reset_index(names="comparison")


def findings_markdown(found: pd.DataFrame) -> str:
    """findings.md: one line per finding under the anchor documents cite (`orchestrator.claims`)."""
    lines = ["# Findings", "", "Each series minus its partner, paired by seed: mean [95% CI], seeds, verdict.", ""]
    for row in found.itertuples(index=False):
        over = f", mean over {row.over}" if isinstance(getattr(row, "over", None), str) else ""
        cell = _cell(row.diff, row.ci_lo, row.ci_hi, "+.3f")
        lines.append(f'- <a id="{row.id}"></a>**{row.verdict}**: {row.label} − {row.versus}, '
                     f"n = {row.n_train:g}{over}: {cell}, {row.seeds} seeds")  # fmt: skip
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
            rows.append({"task": top["task"], "label": top["label"], "series": series, "n_train": top["n_train"],
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
