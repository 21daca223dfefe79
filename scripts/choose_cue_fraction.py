"""Choose the CBFT comparison's cue strength by the rule its sweep file states, from the cue model's
own validation data, before any method is fine-tuned or any test image is scored (issue 21, item 7).

The rule (configs/compare-shapes-cue.yaml): the cue must be the cue model's easiest feature, as the
box is in the paper. For each candidate share p of boxed source images (the paper's 0.6 first, then
0.75 and 0.9), train the cue model as the sweep does (its `source` block, seeds 0-2) and score it on
its own validation images with the box of *another* class (the validation twin of the paper's
randomised-image evaluation, never test images): the share of decisions that follow the box.
p is the smallest candidate at which the mean over seeds is at least one half (the model follows the
box more often than the shape); if none does, the largest. The table goes to `--out` (CSV).

    python scripts/choose_cue_fraction.py configs/compare-shapes-cue.yaml --out docs/compare-shapes-cue/cue_choice.csv
"""

from __future__ import annotations

import argparse
import csv
import time

import torch

from common.seeding import torch_generator
from methods.training import evaluate, train
from orchestrator.config.loading import load_sweep_file
from orchestrator.trial.upstream import fresh_model

CANDIDATES = (0.6, 0.75, 0.9)
SEEDS = (0, 1, 2)
FOLLOWS = 0.5  # the rule's threshold: the box decides at least half of the validation decisions


def box_following(sweep, p: float, seed: int) -> dict:
    """Train the cue model at cue share `p` (the sweep's source settings) and score it on validation."""
    sweep = sweep.with_values({"task.cue.fraction": p})
    task = sweep.build_task()
    data = task.base_data(seed)
    model = fresh_model(sweep, task, seed, "source_init")
    start = time.perf_counter()
    result = train(model, data, sweep.block("source"), torch_generator(seed, "source_train"))
    clean_val = task._split("base_val", sweep.task.n_val, seed)  # the validation images, no box yet
    evals = task._cue_evals(clean_val, seed)  # the test evaluations' construction, on validation images
    model.eval()
    randomised = evaluate(model, evals["randomised_image"])  # y: the box's class, shape: the image's
    return {
        "fraction": p,
        "seed": seed,
        "val_acc": result.best_val_acc,
        "clean_val_acc": evaluate(model, clean_val)["y"],
        "randomised_image_val_acc": randomised["y"],  # follows the box
        "randomised_image_val_shape_acc": randomised["shape"],
        "train_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="the CBFT sweep file (its task must have a cue)")
    parser.add_argument("--out", required=True, help="CSV of every (fraction, seed) row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sweep = load_sweep_file(args.sweep)
    rows = []
    chosen = None
    for p in CANDIDATES:
        rows += [box_following(sweep, p, seed) for seed in SEEDS]
        follows = sum(r["randomised_image_val_acc"] for r in rows[-len(SEEDS) :]) / len(SEEDS)
        print(f"p = {p}: the box decides {follows:.3f} of validation decisions (seeds {SEEDS})", flush=True)
        if follows >= FOLLOWS:
            chosen = p
            break
    chosen = chosen if chosen is not None else CANDIDATES[-1]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"chosen: task.cue.fraction = {chosen}")


if __name__ == "__main__":
    main()
