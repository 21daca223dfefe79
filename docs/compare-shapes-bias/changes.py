"""What the rerun of configs/compare-shapes-bias.yaml changed, paired by seed (docs/COMPARISON.md,
"A biased feature: OccamNets"): for each bias feature, model and budget, the mean test accuracy of
the earlier run's rows and of the rerun's, their difference paired by seed with the report's 95%
interval (`orchestrator.report.statistics.interval`), and how many seeds gave bit-identical test
accuracies. The earlier rows (commit 1e38b95) predate the OccamNets changes of d0d0320; the ResNet,
which those changes do not touch, shows what else moved between the two commits.

    python docs/compare-shapes-bias/changes.py docs/compare-shapes-bias/results_1e38b95.parquet \
        docs/compare-shapes-bias/results.parquet > docs/compare-shapes-bias/changes.md
"""

import json
import sys

import numpy as np
import pandas as pd

from orchestrator.report.statistics import interval

KEYS = ["task.bias.feature", "model.name", "n_train", "seed"]


def main(before_path: str, after_path: str, metric: str = "test_acc") -> None:
    before, after = (pd.read_parquet(p) for p in (before_path, after_path))
    width = lambda t: t["config_json"].map(lambda text: json.loads(text)["model"]["width"])  # noqa: E731
    after = after[width(after).isin(set(width(before)))]  # the rerun's rows at the earlier rows' width
    before, after = (t[t["status"] == "done"].set_index(KEYS)[metric] for t in (before, after))
    both = pd.concat({"before": before, "after": after}, axis=1, join="inner").reset_index()
    print(f"| bias | model | n | seeds | before | after | after minus before [95% CI] | bit-identical ({metric}) |")
    print("|---|---|---|---|---|---|---|---|")
    for (feature, model, n), cell in both.groupby(KEYS[:-1], sort=True):
        diff = (cell["after"] - cell["before"]).to_numpy(dtype=float)
        lo, hi = interval(diff) if len(diff) > 1 else (np.nan, np.nan)
        same = int((cell["after"] == cell["before"]).sum())
        print(
            f"| {feature} | {model} | {n} | {len(cell)} | {cell['before'].mean():.3f} | {cell['after'].mean():.3f} "
            f"| {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {same} of {len(cell)} |"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
