"""The compact tables of docs/REPRODUCTION.md, printed from an `instill report` directory.

The report's own summary.md has one column per series, which is too wide to read at three depths
or seven variants. This prints the same numbers regrouped: one table per setting in brackets
(`[model.n_layers=2]`, `[variant=torch_init]`), series as columns, budgets as rows; the mean over
an axis and the paired gaps when the report has them (`--mean-over`, `--versus`); and the masks'
subtask accuracy. Nothing is computed here but the layout: every cell is a report value.

    python scripts/repro_tables.py docs/paper-depth2 [--metric test_acc] [--paper]
    python scripts/repro_tables.py docs/shapes-limits-report --at 1000 --columns val_acc shape_bias_val

`--at N --columns ...`: instead, one row per series at budget N with those columns.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

# The sparsity column of a summary (the axis path; older reports named it `sparsity`).
SPARSITY = "mask.sparsity"

# METHOD.md's table (mean of six depths, one seed each), at the paper's budgets.
PAPER = {
    "subtask_induction": {10: 0.36, 100: 0.62, 250: 0.82, 1000: 0.98, 2500: 1.0},
    "full_transfer": {10: 0.42, 100: 0.58, 250: 0.72, 1000: 0.97, 2500: 1.0},
    "sampled_subnetwork": {10: 0.39, 100: 0.42, 250: 0.45, 1000: 0.69, 2500: 0.95},
    "scratch": {10: 0.31, 100: 0.38, 250: 0.44, 1000: 0.51, 2500: 0.61},
}


def split_label(label: str) -> tuple[str, str]:
    """('subtask_induction @0.8', 'model.n_layers=2') from 'subtask_induction @0.8 [model.n_layers=2]'."""
    match = re.match(r"^(.*?)(?: \[(.*)\])?$", label)
    return match.group(1), match.group(2) or ""


def cell(mean, lo, hi, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if pd.isna(mean):
        return ""
    if pd.isna(lo):
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def wide(frame: pd.DataFrame, value: str, columns: str = "series") -> pd.DataFrame:
    out = frame.pivot_table(index="n_train", columns=columns, values=value, aggfunc="first")
    out = out[sorted(out.columns, key=_order)].fillna("")
    out.columns.name = None
    return out.reset_index().rename(columns={"n_train": "n"})


def _order(series: str) -> tuple:
    method, _, sparsity = series.partition(" @")
    rank = ["subtask_induction", "full_transfer", "sampled_subnetwork", "scratch"]
    return (rank.index(method) if method in rank else len(rank), method, sparsity)


def levels(summary: pd.DataFrame, metric: str) -> None:
    frame = summary.assign(
        series=[split_label(x)[0] for x in summary["label"]],
        group=[split_label(x)[1] for x in summary["label"]],
        value=[cell(m, lo, hi) for m, lo, hi in zip(summary[f"{metric}_mean"], summary[f"{metric}_ci_lo"],
                                                   summary[f"{metric}_ci_hi"], strict=True)],
    )  # fmt: skip
    frame = frame[frame[f"{metric}_mean"].notna()]
    for group, part in frame.groupby("group", sort=True):
        print(f"\n#### {metric}, {group or 'all'} (mean [95% CI] over seeds)\n")
        print(markdown(wide(part, "value")))


def mean_over(report: Path, metric: str, paper: bool) -> None:
    path = report / "mean_over.parquet"
    if not path.exists():
        return
    means = pd.read_parquet(path)
    means = means.assign(
        series=[split_label(x)[0] for x in means["label"]],
        value=[cell(m, lo, hi) for m, lo, hi in zip(means[f"{metric}_mean"], means[f"{metric}_ci_lo"],
                                                   means[f"{metric}_ci_hi"], strict=True)],
    )  # fmt: skip
    print(f"\n#### {metric}, {split_label(means['label'].iloc[0])[1]} (per seed, then mean [95% CI] over seeds)\n")
    table = wide(means, "value")
    if paper:
        for method, values in PAPER.items():
            table.insert(len(table.columns), f"{method} (paper)", [values.get(n, "") for n in table["n"]])
    print(markdown(table))


def gaps(report: Path) -> None:
    """One table per partner (`--versus`): budgets x settings as rows (each setting, then the mean
    over the axis), series as columns."""
    parts = []
    for name in ("versus.parquet", "versus_mean_over.parquet"):
        if (report / name).exists():
            parts.append(pd.read_parquet(report / name))
    if not parts:
        return
    diffs = pd.concat(parts, ignore_index=True)
    diffs = diffs.assign(
        partner=[v.split(" [")[0].split(" (")[0].split(" @")[0] for v in diffs["versus"]],
        series=[split_label(x)[0] for x in diffs["label"]],
        setting=[split_label(x)[1] or "all" for x in diffs["label"]],
        value=[cell(m, lo, hi, signed=True) for m, lo, hi in zip(diffs["diff_mean"], diffs["diff_ci_lo"],
                                                                diffs["diff_ci_hi"], strict=True)],
    )  # fmt: skip
    for versus, part in diffs.groupby("partner", sort=False):
        table = part.pivot_table(index=["n_train", "setting"], columns="series", values="value", aggfunc="first")
        table = table[sorted(table.columns, key=_order)].fillna("")
        table = table.loc[sorted(table.index, key=lambda i: (i[0], i[1].startswith("mean over"), i[1]))]
        table.columns.name = None
        print(f"\n#### Paired gap to {versus} of the same settings and sparsity (mean [95% CI] over seeds)\n")
        print(markdown(table.reset_index().rename(columns={"n_train": "n"})))


def masks(summary: pd.DataFrame) -> None:
    if "subtask_acc_mean" not in summary or summary["subtask_acc_mean"].isna().all():
        return
    frame = summary[summary["subtask_acc_mean"].notna()].copy()
    frame["group"] = [split_label(x)[1] for x in frame["label"]]
    frame = frame[frame["method"] == frame["method"].iloc[0]].sort_values("n_train").groupby("label").tail(1)
    sparsity = SPARSITY if SPARSITY in frame else "sparsity"
    rows = [
        {
            "setting": g or "all",
            "sparsity": s,
            "seeds": int(r["seeds"]),
            "subtask acc (chance 1/7)": cell(r["subtask_acc_mean"], r["subtask_acc_ci_lo"], r["subtask_acc_ci_hi"]),
            "natural density": cell(r["natural_density_mean"], r["natural_density_ci_lo"], r["natural_density_ci_hi"]),
        }
        for (g, s), r in frame.set_index(["group", sparsity]).sort_index().iterrows()
    ]
    print("\n#### Discovered masks (mean [95% CI] over seeds)\n")
    print(markdown(pd.DataFrame(rows)))


def at_budget(summary: pd.DataFrame, n: int, columns: list[str]) -> None:
    frame = summary[summary["n_train"] == n].sort_values("label")
    rows = [
        {"series": r["label"], "seeds": int(r["seeds"]),
         **{c: cell(r[f"{c}_mean"], r[f"{c}_ci_lo"], r[f"{c}_ci_hi"]) for c in columns}}
        for _, r in frame.iterrows()
    ]  # fmt: skip
    print(f"\n#### At n = {n} (mean [95% CI] over seeds)\n")
    print(markdown(pd.DataFrame(rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--metric", default="test_acc")
    parser.add_argument("--paper", action="store_true", help="add METHOD.md's numbers beside the mean over depths")
    parser.add_argument("--at", type=int, help="one row per series at this budget (with --columns)")
    parser.add_argument("--columns", nargs="+", default=["test_acc"])
    args = parser.parse_args()
    summary = pd.read_parquet(args.report / "summary.parquet")
    if args.at is not None:
        at_budget(summary, args.at, args.columns)
        return
    levels(summary, args.metric)
    mean_over(args.report, args.metric, args.paper)
    gaps(args.report)
    masks(summary)


if __name__ == "__main__":
    main()
