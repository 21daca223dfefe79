"""Validation passes eager against compiled (`methods.training.compiled_eval`), on a sweep's model.

One thread; the sweep's downstream model (default: the quickstart's GPT) on its validation split
(`eval_batch_size` rows a batch), fresh weights. Prints the first compiled pass (the compile, from
Inductor's on-disk cache when it is warm), the time per pass eager and compiled (best of
`--repeats` runs of `--passes` passes each, alternating), the passes a compile needs to pay for
itself, and the loss barrier's cost per point: `evaluate` then `mean_loss` (two forward passes,
as before) against `evaluate_with_loss` (one). Checks that compiled and eager accuracies are equal.

    python benchmarks/eval_speed.py [SWEEP.yaml] [--passes 20] [--repeats 5]
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/eval_speed.py    # a cold compile
"""

from __future__ import annotations

import argparse
import os
import time

from trial_phases import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from methods.training import compiled_eval, evaluate, evaluate_with_loss, mean_loss
    from orchestrator.config import load_sweep_file
    from orchestrator.trial.upstream import fresh_model

    sweep = load_sweep_file(args.sweep)
    task = sweep.build_task()
    model = fresh_model(sweep, task, 0, "init")
    split = task.downstream_data(0, 1.0).val
    size = sweep.training.eval_batch_size
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"model: {type(model).__name__} {sweep.model.model_dump()}, validation split {tuple(split.x.shape)}, "
          f"batch {size}")  # fmt: skip

    eager_acc = evaluate(model, split, size)
    start = time.perf_counter()
    with compiled_eval(True):
        compiled_acc = evaluate(model, split, size)
    first = time.perf_counter() - start
    print(f"first compiled pass (compile included): {first:.2f} s")

    def per_pass(fn, compiled: bool) -> float:
        with compiled_eval(compiled):
            start = time.perf_counter()
            for _ in range(args.passes):
                fn()
            return (time.perf_counter() - start) / args.passes

    variants = {
        "evaluate, eager": (lambda: evaluate(model, split, size), False),
        "evaluate, compiled": (lambda: evaluate(model, split, size), True),
        "evaluate + mean_loss, eager (a barrier point before)": (
            lambda: (evaluate(model, split, size), mean_loss(model, split, size)),
            False,
        ),
        "evaluate_with_loss, eager (a barrier point now)": (lambda: evaluate_with_loss(model, split, size), False),
        "evaluate_with_loss, compiled": (lambda: evaluate_with_loss(model, split, size), True),
    }
    best = {name: float("inf") for name in variants}
    for _ in range(args.repeats):
        for name, (fn, compiled) in variants.items():
            best[name] = min(best[name], per_pass(fn, compiled))
    for name, seconds in best.items():
        print(f"{name:55s} {1000 * seconds:8.2f} ms per pass")
    saved = best["evaluate, eager"] - best["evaluate, compiled"]
    ratio = best["evaluate, eager"] / best["evaluate, compiled"]
    pays = f"{first / saved:.0f} passes" if saved > 0 else "never"
    print(f"compiled / eager: {ratio:.2f}x; the first compiled pass pays for itself after {pays}")
    print(f"accuracies equal compiled and eager: {compiled_acc == eager_acc} ({compiled_acc['y']:.4f})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
