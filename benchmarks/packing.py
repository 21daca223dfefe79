"""Packed against serial trials: one sweep (default: the quickstart) run twice on the local Ray, on
the same machine, in one invocation: `resources.pack: 1, compile: false` (every model trains alone,
eagerly), then the defaults, `resources.pack: auto, compile: auto` (trials of one budget and setting
train as packs of models, their steps compiled where `methods.training.compiles` says it pays).

Both runs share one artifact store, filled before either is timed, so they time the same work: the
trials (training, evaluation, analyses). Prints, for each: the wall time of the trial phase, trials
per hour, the compute the rows report (a pack's training counted once), and the ratio of the two;
then how far the packed run's series means are from the serial run's (a packed model follows its
serial run within float rounding, dropout included, so they differ at most where rounding moves an
argmax).

    python benchmarks/packing.py [SWEEP.yaml] [--num-cpus N] [--keep DIR]
    python benchmarks/packing.py configs/arithmetic-paper.yaml --gpu     # on a GPU machine

With `--gpu`, three runs: one trial per GPU (`gpu: 1`, `pack: 1`), four per GPU (`gpu: 0.25`,
`pack: 1`, Ray's fractional GPUs), and packed (`gpu: 1`, `pack: auto`); the ratio printed is
packed against one trial per GPU (the issue's target: at least 50).

`benchmarks/packing_fit.py` measures the training loop alone: model-steps/s against K.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def timed_fit(phases: dict[str, float]):
    """Wraps `orchestrator.sweep.make_tuner` so that the wall time of `tuner.fit()` lands in `phases`."""
    import orchestrator.sweep as sweep_module

    make_tuner = sweep_module.make_tuner

    @functools.wraps(make_tuner)
    def make(*args, **kwargs):
        tuner = make_tuner(*args, **kwargs)
        fit = tuner.fit

        def timed():
            start = time.perf_counter()
            try:
                return fit()
            finally:
                phases["fit"] = time.perf_counter() - start

        tuner.fit = timed
        return tuner

    sweep_module.make_tuner = make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--keep", help="keep the output directories under DIR (default: removed)")
    parser.add_argument("--gpu", action="store_true", help="one trial per GPU, four per GPU, packed")
    args = parser.parse_args()

    import torch

    from orchestrator.config import load_sweep
    from orchestrator.outdir import store_for
    from orchestrator.ray_session import concurrency, start_ray
    from orchestrator.sweep import run_sweep
    from orchestrator.threads import resolve
    from orchestrator.trial import expand
    from orchestrator.upstream import precompute

    raw = yaml.safe_load(Path(args.sweep).read_text())
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="instill-packing-"))
    root.mkdir(parents=True, exist_ok=True)
    raw.setdefault("storage", {})["artifacts"] = str(root / "artifacts")
    variants = {"serial": (0, 1, False), "packed": (0, "auto", "auto")}
    if args.gpu:
        variants = {"serial": (1, 1, False), "gpu/4": (0.25, 1, False), "packed": (1, "auto", "auto")}
    sweeps = {}
    for name, (gpu, pack, compile) in variants.items():
        raw.setdefault("resources", {}).update(gpu=gpu, pack=pack, compile=compile)
        sweeps[name] = load_sweep(raw)
    try:
        start_ray(num_cpus=args.num_cpus, num_gpus=torch.cuda.device_count() if args.gpu else None)
        first = resolve(sweeps["serial"], store_for(sweeps["serial"], root / "serial"))  # `cpu: auto`: measured once
        slots = concurrency(first.resources.cpu, first.resources.max_concurrent)
        start = time.perf_counter()
        precompute(first, store_for(first, root / "serial"), expand(first), slots)
        print(f"upstream (source models, masks), shared by both runs: {time.perf_counter() - start:.1f} s")

        phases: dict[str, float] = {}
        timed_fit(phases)
        figures = {}
        for name, sweep in sweeps.items():
            outcome = run_sweep(sweep, root / name)
            table = outcome.table
            assert (table["status"] == "done").all(), table.loc[table["status"] != "done", ["trial", "error"]]
            figures[name] = {"fit": phases["fit"], "n": len(table), "table": table}

        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {slots} slots")
        print("run      trials  trial phase   trials/hour   compute in rows   packs (models: trials; 'alone': serial)")
        for name, f in figures.items():
            table = f["table"]
            sizes = table.loc[table["packed"], "pack"].value_counts().sort_index()
            packs = ", ".join(
                [f"{int(k)}: {int(v)}" for k, v in sizes.items()] + [f"alone: {int((~table['packed']).sum())}"]
            )
            print(
                f"{name:8s} {f['n']:6d} {f['fit']:10.1f} s {f['n'] / f['fit'] * 3600:12.0f} "
                f"{table['total_s'].sum():14.1f} s   {packs}"
            )
        ratio = figures["serial"]["fit"] / figures["packed"]["fit"]
        target = ">= 50 against one trial per GPU" if args.gpu else ">= 2.5 on 2 CPU cores"
        print(f"packed / serial trials per hour: {ratio:.2f}  (target {target})")
        if args.gpu:
            print(f"device: {torch.cuda.get_device_name(0)}")

        keys = ["method", *(c for c in figures["serial"]["table"] if "." in c), "data_fraction"]  # axes: dotted
        means = {
            name: f["table"].groupby(keys, dropna=False)[["test_acc", "val_acc"]].mean()
            for name, f in figures.items()
            if name in ("serial", "packed")
        }
        gap = (means["packed"] - means["serial"]).abs()
        print(
            f"largest gap of a series mean over seeds (packed - serial): test_acc {gap['test_acc'].max():.4f}, "
            f"val_acc {gap['val_acc'].max():.4f}"
        )
        print(gap.round(4).to_string())
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
