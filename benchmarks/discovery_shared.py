"""Mask discovery at a sweep's sparsities: one run per sparsity against one shared run (`discover_many`).

Takes the sweep's source model for one seed (from `--out`'s artifact store when that sweep ran
there, else trained here first and not timed), runs discovery alone at each of the sweep's
sparsities, then once for all of them, and prints both times, their ratio, and whether every
sparsity's mask, accuracy and kept epoch came out bit for bit the same.

    python benchmarks/discovery_shared.py configs/arithmetic-paper-cpu.yaml --out runs/paper-cpu [--seed 0]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep")
    parser.add_argument("--out", help="the sweep's output directory, whose artifact store may hold its sources")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from common.seeding import torch_generator
    from methods import get_method
    from methods.discovery import discover, discover_many
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep_file
    from orchestrator.trial import TrialSpec, Upstream, pick_device

    sweep = load_sweep_file(args.sweep)
    root = os.path.join(args.out, "artifacts") if args.out else tempfile.mkdtemp(prefix="instill-bench-")
    point = {axis: values[0] for axis, values in sweep.grid.items()}
    method = next(m for m in sweep.methods if "mask" in get_method(m).needs)
    spec = TrialSpec(method=method, data_fraction=sweep.data_fractions[0], seed=args.seed, axes=point)
    up = Upstream(sweep, spec, ArtifactStore(root), pick_device(sweep))
    source = up.get("source")
    data, cfg = up.task.subtask_data(args.seed), up.sweep.block("discovery")
    sparsities = tuple(sweep.axes["mask.sparsity"])

    def gen():
        return torch_generator(args.seed, "discovery")

    alone, times = [], []
    for sparsity in sparsities:
        start = time.perf_counter()
        alone.append(discover(copy.deepcopy(source), data, cfg, sparsity, gen()))
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    shared = discover_many(copy.deepcopy(source), data, cfg, sparsities, gen())
    together = time.perf_counter() - start

    same = all(
        a.subtask_acc == s.subtask_acc and a.best_epoch == s.best_epoch and a.history == s.history
        and all(torch.equal(a.mask[n], s.mask[n]) for n in a.mask)
        for a, s in zip(alone, shared, strict=True)
    )  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)")
    origin = "trained here" if up.columns["source_computed"] else "loaded"
    print(f"sweep: {args.sweep}, seed {args.seed}, point {point}, source {origin}")
    print(f"discovery: {cfg.method}, {cfg.epochs} epochs, {len(data.train)} subtask samples")
    print("| sparsity | alone (s) | subtask acc | kept epoch |")
    print("|---|---|---|---|")
    for sparsity, t, a in zip(sparsities, times, alone, strict=True):
        print(f"| {sparsity} | {t:.1f} | {a.subtask_acc:.3f} | {a.best_epoch} |")
    print(f"one run per sparsity: {sum(times):.1f} s; one shared run: {together:.1f} s; "
          f"ratio {sum(times) / together:.2f}x")  # fmt: skip
    print(f"bit for bit the same masks, accuracies, epochs and histories: {same}")


if __name__ == "__main__":
    main()
