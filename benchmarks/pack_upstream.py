"""Source models of a sweep's seeds: one after another (serial) against packs (`resources.pack_upstream`).

Trains the sweep's source model for each of its seeds (or `--seeds`) three ways, in this process,
on `--threads` torch threads each, into fresh artifact stores: serially, one after another (what
`pack_upstream: false` does on one slot); as one pack of all the seeds (one slot); and split into
`--slots` packs of near-equal size, timed one after the other (the upstream phase runs them side by
side, one per slot, so its wall time is the longest of them). Prints each time, the ratios, and
whether the packed sources' validation accuracies and kept epochs equal the serial ones and the
sources of the two packings are bit for bit the same.

    python benchmarks/pack_upstream.py configs/quickstart.yaml [--seeds 0 1 2] [--slots 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the sweep's")
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from orchestrator.artifacts import ArtifactStore
    from orchestrator.config import load_sweep, load_sweep_file
    from orchestrator.trial import TrialSpec, Upstream, pick_device

    base = load_sweep_file(args.sweep)
    seeds = args.seeds or list(base.seeds)
    raw = base.canonical()

    def sweep_with(pack_upstream: bool):
        return load_sweep({**raw, "resources": {**raw["resources"], "pack": "auto", "pack_upstream": pack_upstream}})

    serial, packed = sweep_with(False), sweep_with(True)
    point = {axis: values[0] for axis, values in base.grid.items()}

    def spec(seed):
        return TrialSpec(method=base.methods[0], data_fraction=base.data_fractions[0], seed=seed, axes=point)

    device = pick_device(base)
    root = tempfile.mkdtemp(prefix="instill-bench-")

    def stored(sweep, store, seed):
        up = Upstream(sweep, spec(seed), None, device)
        return store.load("source", up.key("source"))

    serial_store, times = ArtifactStore(os.path.join(root, "serial")), []
    for seed in seeds:
        start = time.perf_counter()
        Upstream(serial, spec(seed), serial_store, device).get("source")
        times.append(time.perf_counter() - start)

    one_store = ArtifactStore(os.path.join(root, "one"))
    start = time.perf_counter()
    Upstream(packed, spec(seeds[0]), one_store, device).compute_shared("source", [{"seed": s} for s in seeds])
    one_pack = time.perf_counter() - start

    parts = max(1, min(args.slots, len(seeds)))
    sizes = [len(seeds) // parts + (i < len(seeds) % parts) for i in range(parts)]
    split_store, split_times, at = ArtifactStore(os.path.join(root, "split")), [], 0
    for size in sizes:
        group = seeds[at : at + size]
        at += size
        start = time.perf_counter()
        Upstream(packed, spec(group[0]), split_store, device).compute_shared("source", [{"seed": s} for s in group])
        split_times.append(time.perf_counter() - start)

    same_as_serial, bitwise, metas = True, True, {}
    for seed in seeds:
        (_, serial_meta), (one_tensors, one_meta) = stored(serial, serial_store, seed), stored(packed, one_store, seed)
        split_tensors, _ = stored(packed, split_store, seed)
        metas[seed] = serial_meta, one_meta
        same_as_serial &= (serial_meta["val_acc"], serial_meta["best_epoch"]) == (
            one_meta["val_acc"],
            one_meta["best_epoch"],
        )
        bitwise &= all(torch.equal(one_tensors[n], split_tensors[n]) for n in one_tensors)

    serial_slots = [sum(times[i::parts]) for i in range(parts)]  # seeds dealt to the slots in turn
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"sweep: {args.sweep}, seeds {seeds}, model {base.model.name}, source training {base.source.epochs} epochs")
    print("| seed | serial (s) | serial val acc (epoch) | packed val acc (epoch) |")
    print("|---|---|---|---|")
    for seed, t in zip(seeds, times, strict=True):
        (a, b) = metas[seed]
        print(f"| {seed} | {t:.1f} | {a['val_acc']:.4f} ({a['best_epoch']}) | {b['val_acc']:.4f} ({b['best_epoch']}) |")
    print(f"one slot: serial {sum(times):.1f} s, one pack of {len(seeds)} {one_pack:.1f} s "
          f"({sum(times) / one_pack:.2f}x)")  # fmt: skip
    print(f"{parts} slots: serial {max(serial_slots):.1f} s (longest slot), packs of {sizes} "
          f"{max(split_times):.1f} s (longest: {', '.join(f'{t:.1f}' for t in split_times)}) "
          f"({max(serial_slots) / max(split_times):.2f}x)")  # fmt: skip
    print(f"packed sources' validation accuracy and kept epoch equal the serial ones: {same_as_serial}")
    print(f"packed sources bit for bit the same in one pack and in {parts}: {bitwise}")


if __name__ == "__main__":
    main()
