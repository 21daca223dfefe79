"""Where one trial's time goes: its phases, measured inside one process (no Ray).

Runs trials of a sweep (default: the quickstart, `subtask_induction`, seed 0, at budgets 0.033 and
1.0) one after the other with `orchestrator.trial.run_trial`, one thread, from an empty artifact
store (so the first trial also trains the source model and discovers the mask, as the sweep's
upstream phase would), and splits the time of every training run (`methods.training` loop; the
source, discovery, the downstream training) into:

- steps: the engine's optimiser steps (forward, loss, backward, update); the first step of each run
  apart, since with `resources.compile` it holds the compile;
- validation: the objective's scoring after every epoch (and before the first), the selection
  and the best epoch's snapshot (`_Loop._start`, `_Loop._epoch_end`);
- the rest of the loop (batch plans, streams, checkpoints, reports),

and each trial's other stages from its row: build, evaluation on the test split, each analysis.

    python benchmarks/trial_phases.py [SWEEP.yaml] [--method M] [--fractions 0.033 1.0] [--seed 0]
                                      [--set resources.compile=false] [--repeat-first]
                                      [--compile-upstream]

`--repeat-first` runs the first budget again at the end (its upstream then loaded from the store,
and compiled graphs warm in the process). On a loaded machine compare the phases of one run with
each other (shares), not absolute times across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PHASES: dict[tuple[str, str], float] = defaultdict(float)
_LABEL: list[str] = []


def _timed(cls, name: str, phase: str | None) -> None:
    """Wrap `cls.name` so its wall time adds to PHASES[(current loop label, phase)]; phase None:
    the method is `_Loop.run`, which sets the label."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        if phase is None:
            _LABEL.append(self.label)
        label = _LABEL[-1] if _LABEL else "outside"
        what = phase or "loop"
        if phase == "steps" and not getattr(self, "_stepped", False):
            self._stepped, what = True, "first step"
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            PHASES[(label, what)] += time.perf_counter() - start
            if phase is None:
                _LABEL.pop()

    setattr(cls, name, wrapper)


def instrument() -> None:
    from methods import training
    from methods.packing import Vmapped

    _timed(training._Loop, "run", None)
    _timed(training._Loop, "_start", "validation")
    _timed(training._Loop, "_epoch_end", "validation")
    _timed(training.Serial, "step", "steps")
    _timed(Vmapped, "step", "steps")


def cpu_model() -> str:
    with contextlib.suppress(Exception):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--method", default="subtask_induction")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.033, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="PATH=VALUE, as instill run's")
    parser.add_argument("--repeat-first", action="store_true", help="run the first budget again at the end")
    parser.add_argument("--store", help="artifact store folder (default: a new temporary one)")
    parser.add_argument(
        "--compile-upstream",
        action="store_true",
        help="train the upstream artifacts (source, discovery) under resources.compile too (a trial does not)",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from methods.training import compiling
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep_file
    from orchestrator.trial import TrialSpec, run_trial

    instrument()
    sweep = load_sweep_file(args.sweep, args.overrides)
    store = ArtifactStore(Path(args.store or tempfile.mkdtemp(prefix="instill-phases-")))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"sweep {args.sweep}, method {args.method}, seed {args.seed}, compile {sweep.resources.compile}")
    fractions = [*args.fractions, *([args.fractions[0]] if args.repeat_first else [])]
    for fraction in fractions:
        PHASES.clear()
        spec = TrialSpec(method=args.method, data_fraction=fraction, seed=args.seed)
        start = time.perf_counter()
        with compiling(sweep.resources.compile) if args.compile_upstream else contextlib.nullcontext():
            row = run_trial(sweep, spec, store)
        wall = time.perf_counter() - start
        print(
            f"\n## {args.method} at data_fraction {fraction} (n = {row['n_train']}): {wall:.1f} s in all, "
            f"val_acc {row['val_acc']:.4f}, test_acc {row['test_acc']:.4f}, compiled {row.get('compiled')}, "
            f"load {os.getloadavg()[0]:.1f}"
        )
        print("| phase | s | share |")
        print("|---|---|---|")
        lines = []
        for label in dict.fromkeys(label for label, _ in PHASES):
            loop = PHASES[(label, "loop")]
            inner = 0.0
            for what in ("first step", "steps", "validation"):
                value = PHASES.get((label, what), 0.0)
                inner += value
                lines.append((f"{label}: {what}", value))
            lines.append((f"{label}: rest of the loop", loop - inner))
        # the row's own stages, less what the loops above already count
        counted = {f"{label}_s" for label in dict.fromkeys(label for label, _ in PHASES)}
        for key in sorted(k for k in row if k.endswith("_s") and k not in ("total_s", "wait_s")):
            if key in counted:
                outside = row[key] - PHASES[(key[:-2], "loop")]
                if outside > 0.005:
                    lines.append((f"{key[:-2]}: outside the loop (data, model, store)", outside))
            else:
                lines.append((key[:-2], row[key]))
        total = sum(v for _, v in lines)
        for name, value in lines:
            print(f"| {name} | {value:.2f} | {value / total:.1%} |")
        print(f"| (sum) | {total:.2f} | |")


if __name__ == "__main__":
    main()
