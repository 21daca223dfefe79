"""Summaries and plots of one or more result directories.

`write_report([OUT, ...])` writes OUT/report/: `summary.parquet` (per task x method x sparsity x
budget: seeds, mean, std and a 95% bootstrap CI of test accuracy), `summary.md` (the same as a
table), and data-efficiency curves as PNG and SVG (log budget axis, one line per method, CI band,
one panel per sparsity; methods without a mask appear in every panel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator import results

METRIC = "test_acc"


def bootstrap_ci(values: np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; (nan, nan) for no values, (v, v) for one."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(n_boot, len(values)), replace=True).mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def summarise(table: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Per (task, method, sparsity, n_train): seeds, mean, std and 95% CI of `metric` over done trials."""
    done = table[table["status"] == "done"].copy()
    done["sparsity"] = pd.to_numeric(done["sparsity"], errors="coerce")
    keys = ["task", "method", "sparsity", "n_train"]
    out = []
    for key, group in done.groupby(keys, dropna=False, sort=True):
        values = pd.to_numeric(group[metric], errors="coerce").to_numpy()
        lo, hi = bootstrap_ci(values)
        out.append(
            {
                **dict(zip(keys, key, strict=True)),
                "seeds": int(np.isfinite(values).sum()),
                f"{metric}_mean": float(np.nanmean(values)),
                f"{metric}_std": float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0,
                f"{metric}_ci_lo": lo,
                f"{metric}_ci_hi": hi,
            }
        )
    return pd.DataFrame(out)


def _markdown(summary: pd.DataFrame, metric: str = METRIC) -> str:
    """Budgets as rows, methods (with sparsity) as columns, cells `mean ± std`."""
    if summary.empty:
        return "(no finished trials)\n"
    label = summary.apply(
        lambda r: r["method"] if pd.isna(r["sparsity"]) else f"{r['method']} @{r['sparsity']:g}", axis=1
    )
    cell = summary.apply(
        lambda r: (
            f"{r[f'{metric}_mean']:.3f} ± {r[f'{metric}_std']:.3f}" if r["seeds"] > 1 else f"{r[f'{metric}_mean']:.3f}"
        ),
        axis=1,
    )
    wide = pd.DataFrame({"n_train": summary["n_train"], "label": label, "cell": cell})
    wide = wide.pivot_table(index="n_train", columns="label", values="cell", aggfunc="first").fillna("")
    header = "| n_train | " + " | ".join(wide.columns) + " |"
    lines = [f"{metric} (mean ± std over seeds)", "", header, "|" + "---|" * (len(wide.columns) + 1)]
    for n, row in wide.iterrows():
        lines.append(f"| {int(n)} | " + " | ".join(row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(summary: pd.DataFrame, path_stem: Path, metric: str = METRIC) -> list[Path]:
    """Data-efficiency curves, one panel per sparsity; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masked = summary[summary["sparsity"].notna()]
    panels = sorted(masked["sparsity"].unique()) or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False, sharey=True)
    methods = sorted(summary["method"].unique())
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, sparsity in zip(axes[0], panels, strict=True):
        part = summary[summary["sparsity"].isna() | (summary["sparsity"] == sparsity)]
        for method, group in part.groupby("method"):
            group = group.sort_values("n_train")
            x = group["n_train"].to_numpy(dtype=float)
            ax.plot(x, group[f"{metric}_mean"], marker="o", ms=3, label=method, color=colours[method])
            ax.fill_between(x, group[f"{metric}_ci_lo"], group[f"{metric}_ci_hi"], alpha=0.2, color=colours[method])
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("disambiguating training samples (n)")
        ax.set_title("no mask" if sparsity is None else f"mask sparsity {sparsity:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    written = []
    for ext in ("png", "svg"):
        file = path_stem.with_suffix(f".{ext}")
        fig.savefig(file, dpi=130)
        written.append(file)
    plt.close(fig)
    return written


def write_report(out_dirs: list[Path], report_dir: Path | None = None) -> Path:
    """Summarise the results of `out_dirs` (merged) into `report_dir` (default: first dir's report/)."""
    tables = []
    for out in out_dirs:
        path = Path(out) / "results.parquet"
        if not path.exists():
            from orchestrator.config import ConfigError

            raise ConfigError(f"{path}: missing; run `instill run SWEEP --out {out}` first")
        tables.append(results.read(path))
    table = pd.concat(tables, ignore_index=True)
    report_dir = Path(report_dir or Path(out_dirs[0]) / "report")
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(table)
    summary.to_parquet(report_dir / "summary.parquet", index=False)
    (report_dir / "summary.md").write_text(_markdown(summary))
    if not summary.empty:
        plot_curves(summary, report_dir / "data_efficiency")
    return report_dir
