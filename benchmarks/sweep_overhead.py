"""Sweep overhead and artifact reuse.

Runs a sweep from scratch (fresh output directory, empty artifact store) on the local Ray and
prints:
  - wall time against the sum of trial compute times divided by concurrency (the ideal wall time
    with zero scheduling overhead); the ratio's target is at most 1.2;
  - the number of source trainings and mask discoveries against the distinct keys of the grid.

    python benchmarks/sweep_overhead.py [SWEEP.yaml] [--out DIR] [--num-cpus N]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--out", help="output directory (default: a fresh temporary one, removed after)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep_file
    from orchestrator.outdir import store_for
    from orchestrator.sweep import run_sweep
    from orchestrator.threads import KIND as THREADS
    from orchestrator.threads import resolve
    from orchestrator.trial import expand, upstream_keys

    sweep = load_sweep_file(args.sweep)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="instill-bench-"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: the benchmark needs a fresh output directory")
    try:
        start = time.perf_counter()
        outcome = run_sweep(sweep, out, num_cpus=args.num_cpus)
        wall = time.perf_counter() - start

        import ray

        store: ArtifactStore = store_for(sweep, outcome.out_dir)
        cpu = resolve(sweep, store).resources.cpu  # `cpu: auto`: the run's measurement, kept in the store
        slots = int(ray.cluster_resources().get("CPU", 1) // cpu)
        if sweep.resources.max_concurrent:
            slots = min(slots, sweep.resources.max_concurrent)
        table = outcome.table
        done = [c for c in store.computations() if c["kind"] != THREADS]
        upstream = sum(c["seconds"] for c in done)  # source training and discovery, before the trials
        trials = float(table["total_s"].sum())
        compute = upstream + trials
        waits = float(table["wait_s"].sum())
        ideal = compute / slots
        keys = {k for spec in expand(sweep) for k in upstream_keys(sweep, spec)}

        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}")
        print(f"sweep: {args.sweep} ({len(table)} trials, {slots} at once, {cpu:g} CPU each)")
        print(f"wall time (incl. Ray start):           {wall:8.1f} s")
        print(f"upstream compute (artifacts):          {upstream:8.1f} s")
        print(f"trial compute (transfer, train, eval): {trials:8.1f} s")
        print(f"sum of compute times:                  {compute:8.1f} s")
        print(f"  of which lock waits (not counted):   {waits:8.1f} s")
        print(f"ideal wall = compute / concurrency:    {ideal:8.1f} s")
        print(f"overhead ratio wall / ideal:           {wall / ideal:8.2f}   (target <= 1.2)")
        for kind in sorted({k[0] for k in keys}):
            computed = sum(c["kind"] == kind for c in done)
            distinct = sum(k[0] == kind for k in keys)
            print(f"{kind:6s} computations: {computed}, distinct keys: {distinct}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
