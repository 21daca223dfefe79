"""How long `instill report` takes, and how much index.html weighs, on a paper-sized sweep.

Builds a synthetic results file in the current schema (config_json, series, axis columns, timing and
version columns): 27 series (9 method settings x 3 depths: subtask_induction and sampled_subnetwork at
sparsities 0.5 / 0.75 / 0.9, full_transfer, naive_finetune, scratch; depths 2 / 4 / 6) x 5 budgets x
10 seeds = 1350 finished trials, with test/val/subtask accuracy and two analysis-like columns. Then
writes its report as the paper's command does (`--versus full_transfer --versus scratch --margin 0.03
--mean-over model.n_layers`) and prints the render time (issue 23's target: at most 2 minutes), the
page's size (limit 5 MB) and the widest table.

    python benchmarks/report_scale.py [--seeds 10] [--budgets 0 10 100 1000 2500] [--out /tmp/report-scale]

The Vega bundle is cached after its first build (`orchestrator.report.interactive.bundle`); the
first run on a machine adds its build (seconds), printed separately.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import stable_hash  # noqa: E402
from orchestrator import results  # noqa: E402

SETTINGS = [("subtask_induction", s) for s in (0.5, 0.75, 0.9)] + [("sampled_subnetwork", s) for s in (0.5, 0.75, 0.9)]
SETTINGS += [("full_transfer", None), ("naive_finetune", None), ("scratch", None)]
DEPTHS = (2, 4, 6)


def synthetic(seeds: int, budgets: list[int], rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    versions = json.dumps({"python": "3.11.7", "torch": "2.4.0", "ray": "2.50.0", "instill": "0.1.0"})
    start = 1.8e9
    for (method, sparsity), depth in ((s, d) for s in SETTINGS for d in DEPTHS):
        skill = {"scratch": 0.0, "full_transfer": 0.6, "naive_finetune": 0.5}.get(method, 0.4 + 0.2 * (sparsity or 0))
        for n in budgets:
            for seed in range(seeds):
                config = {"method": method, "task": {"name": "modular_arithmetic"},
                          "model": {"name": "hf_gpt2", "n_layers": depth}, "training": {"lr": 1e-3}}  # fmt: skip
                if sparsity is not None:
                    config["mask"] = {"sparsity": sparsity}
                acc = 0.3 + 0.69 / (1 + np.exp(-(np.log10(1 + n) - 2.6 + skill)))
                acc = float(np.clip(acc + rng.normal(0, 0.04), 0, 1))
                rows.append({
                    "trial": f"{method}-{sparsity}-{depth}-{n}-{seed}", "task": "modular_arithmetic",
                    "model": "hf_gpt2", "method": method, "mask.sparsity": sparsity, "model.n_layers": depth,
                    "data_fraction": n / 3000, "n_train": n, "seed": seed, "status": "done", "test_acc": acc,
                    "val_acc": float(np.clip(acc + rng.normal(0, 0.01), 0, 1)),
                    "subtask_acc": 0.99 if sparsity is not None else None,
                    "config_json": json.dumps({**config, "seed": seed, "data_fraction": n / 3000}, sort_keys=True),
                    "series": stable_hash(config), "code_version": "git 0123456789ab", "versions": versions,
                    "started_at": start, "finished_at": start + 20.0, "total_s": 20.0, "device": "cpu",
                    "worker": "node:1",
                })  # fmt: skip
                start += 20.0
    return results.frame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 10, 100, 1000, 2500])
    parser.add_argument("--out", type=Path, default=Path("/tmp/report-scale"))
    args = parser.parse_args()
    from orchestrator.report import write_report
    from orchestrator.report.interactive import bundle

    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "run").mkdir(parents=True)
    table = synthetic(args.seeds, args.budgets, np.random.default_rng(0))
    results.write(table, args.out / "run" / "results.parquet")
    t0 = time.perf_counter()
    bundle()
    t1 = time.perf_counter()
    report = write_report([args.out / "run"], args.out / "report", versus=["full_transfer", "scratch"], margin=0.03,
                          over="model.n_layers")  # fmt: skip
    t2 = time.perf_counter()
    page = (report / "index.html").read_text()
    md = (report / "summary.md").read_text()
    widths = [line.count("|") - 1 for line in md.splitlines() if line.startswith("|")]
    widths += [t.split("</tr>")[0].count("<th") for t in re.findall(r"<table.*?</table>", page, re.S)]
    print(f"sweep: {table['series'].nunique()} series x {len(args.budgets)} budgets x {args.seeds} seeds "
          f"= {len(table)} trials")  # fmt: skip
    print(f"Vega bundle (built once per vl-convert version, then cached): {t1 - t0:.1f} s")
    print(f"report render: {t2 - t1:.1f} s (target <= 120 s)")
    print(f"index.html: {len(page.encode()) / 2**20:.2f} MB (limit 5 MB); widest table: {max(widths)} columns")


if __name__ == "__main__":
    main()
