"""Scale of the grid: a sweep of many tiny trials on one machine.

Runs N tiny trials (a 1-layer, 16-wide transformer on 30-operand modular arithmetic; subtask
induction and scratch x 2 seeds (so 2 source models and 2 masks in the upstream phase) x 50 data
fractions x N / 200 downstream learning rates, an `axes:` path) through `run_sweep` into a fresh
output directory, and prints:
  - wall time against the ideal (every compute time, upstream and trials, over the number of
    trials that run at once), and the overhead ratio wall / ideal (target <= 1.1);
  - the driver's peak RSS (this process, not Ray's workers; target <= 2 GB) and its growth during
    the Tune phase per 1,000 trials;
  - rows written per second;
  - the driver's CPU time in the Tune phase, per trial: on a machine whose cores all run trials,
    the driver's CPU is taken from the trials;
  - the time of each driver phase, also per trial: time per trial that stays flat from N to 4N
    is linear, time per trial that grows with N is not.

    python benchmarks/grid_scale.py [--n 10000] [--epochs 8] [--num-cpus 2] [--out DIR] [--profile FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def tiny_sweep(n: int, epochs: int) -> dict:
    """A sweep of about `n` trials, each a few tens of milliseconds of compute on one core."""
    lrs = [round(1e-3 * (1 + i / 100), 8) for i in range(max(1, round(n / 200)))]
    return {
        "name": "grid-scale",
        "task": {
            "name": "modular_arithmetic",
            "operand_range": 30,
            "n_base": 300,
            "n_subtask": 200,
            "pool_size": 100,
            "n_val": 50,
            "n_test": 50,
        },
        "model": {"name": "gpt", "n_layers": 1, "d_model": 16, "n_heads": 2, "dropout": 0.1},
        "source": {"epochs": 2, "lr": 1e-3},
        "discovery": {"epochs": 2, "batch_size": 100},
        "training": {"epochs": epochs, "lr": 1e-3},
        # Trials alone (not packed): this measures the orchestration of N trials (packing: benchmarks/packing.py).
        "resources": {"cpu": 1, "gpu": 0, "pack": 1},
        "methods": ["subtask_induction", "scratch"],
        "sparsities": [0.5],
        "data_fractions": [(i + 1) / 50 for i in range(50)],  # budgets of 2, 4, ..., 100 samples
        "seeds": [0, 1],
        "axes": {"training.lr": lrs},
    }


class Phases:
    """Wall time and call count of each driver phase, by wrapping what `run_sweep` calls."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.fit_cpu = float("nan")  # the driver's CPU seconds during tuner.fit()

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
                self.calls[phase] = self.calls.get(phase, 0) + 1

        return timed

    def install(self) -> None:
        import orchestrator.callbacks as callbacks
        import orchestrator.sweep as sweep

        sweep.expand = self.wrap("expand", sweep.expand)
        sweep.read_row = self.wrap("skip-check", sweep.read_row)
        sweep.start_ray = self.wrap("ray start", sweep.start_ray)
        sweep.precompute = self.wrap("precompute", sweep.precompute)
        sweep.order_trials = self.wrap("ordering", sweep.order_trials)
        sweep.make_callbacks = self.wrap("callbacks set-up", sweep.make_callbacks)
        callbacks.write_row = self.wrap("row writes", callbacks.write_row)
        make_tuner = self.wrap("tuner set-up", sweep.make_tuner)

        def make_tuner_timed_fit(*args, **kwargs):
            tuner = make_tuner(*args, **kwargs)
            fit = self.wrap("tune fit", tuner.fit)

            def fit_with_cpu():
                before = cpu_seconds()
                try:
                    return fit()
                finally:
                    self.fit_cpu = cpu_seconds() - before

            tuner.fit = fit_with_cpu
            return tuner

        sweep.make_tuner = make_tuner_timed_fit
        sweep.results.collect = self.wrap("collect", sweep.results.collect)
        sweep.results.write = self.wrap("write parquet", sweep.results.write)


def cpu_seconds() -> float:
    """User + system CPU time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RssSampler(threading.Thread):
    """Samples this process's resident set size (Linux /proc) every `period` seconds."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), self.rss()))
            self.stop.wait(self.period)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="number of trials (rounded to a multiple of 200)")
    parser.add_argument("--epochs", type=int, default=8, help="downstream epochs of each trial (its compute)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--out", help="output directory (default: a fresh temporary one, removed after)")
    parser.add_argument("--profile", help="write a cProfile of the driver to this file")
    args = parser.parse_args()

    from orchestrator.config import load_sweep
    from orchestrator.outdir import store_for
    from orchestrator.sweep import run_sweep
    from orchestrator.threads import KIND as THREADS
    from orchestrator.threads import resolve

    sweep = load_sweep(tiny_sweep(args.n, args.epochs))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="instill-grid-"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: the benchmark needs a fresh output directory")
    phases = Phases()
    phases.install()
    sampler = RssSampler()
    sampler.start()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    try:
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        outcome = run_sweep(sweep, out, num_cpus=args.num_cpus)
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        wall = time.perf_counter() - start
        sampler.stop.set()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

        import ray

        cpu = resolve(sweep, store_for(sweep, outcome.out_dir)).resources.cpu  # `cpu: auto`: kept in the store
        slots = int(ray.cluster_resources().get("CPU", 1) // cpu)
        table = outcome.table
        n = len(table)
        upstream = sum(c["seconds"] for c in store_for(sweep, outcome.out_dir).computations() if c["kind"] != THREADS)
        trials = float(table["total_s"].sum())
        ideal = (upstream + trials) / slots
        fixed = phases.seconds.get("ray start", 0.0)
        fit = phases.seconds.get("tune fit", float("nan"))
        rows = phases.calls.get("row writes", 0)
        during = [rss for t, rss in sampler.samples]
        rss_growth = (max(during) - during[0]) if during else 0

        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"trials: {n} ({(table['status'] == 'done').sum()} done), {slots} at once, 1 CPU each")
        print(f"trial compute: mean {trials / n * 1000:.1f} ms, sum {trials:.1f} s; upstream compute {upstream:.1f} s")
        print(f"wall time (incl. Ray start):         {wall:9.1f} s")
        print(f"ideal wall = compute / concurrency:  {ideal:9.1f} s")
        print(f"overhead ratio wall / ideal:         {wall / ideal:9.2f}   (target <= 1.1)")
        print(f"  without Ray's start ({fixed:.1f} s):      {(wall - fixed) / ideal:9.2f}")
        print(f"driver peak RSS:                     {peak / 2**20:9.0f} MiB (target <= 2048)")
        growth = rss_growth / 2**20
        print(f"driver RSS growth over the run:      {growth:9.0f} MiB ({growth / n * 1000:.1f} MiB per 1k trials)")
        print(f"rows written per second (Tune phase): {rows / fit:8.1f}   ({rows} rows in {fit:.1f} s)")
        per_slot = fit * slots / n * 1000
        print(f"Tune wall per trial and slot:        {per_slot:9.1f} ms (of which compute {trials / n * 1000:.1f} ms)")
        drv = phases.fit_cpu
        print(f"driver CPU in Tune phase:            {drv:9.1f} s ({drv / n * 1000:.1f} ms per trial)")
        print("phase                        seconds   ms/trial   calls")
        for phase, seconds in phases.seconds.items():
            print(f"  {phase:24s} {seconds:9.2f} {seconds / n * 1000:10.3f} {phases.calls[phase]:7d}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
