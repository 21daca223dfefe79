"""Procedural images per second of the `shapes` generator (tasks/shapes_render.py).

python benchmarks/shapes_throughput.py [--n 20000] [--size 32] [--classes 10] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from tasks.shapes_render import render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--size", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    ids = np.arange(args.n) % args.classes
    for size in args.size:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for mode in ("textured", "silhouette", "texture_only"):
                render(ids[:512], ids[:512], np.random.default_rng(0), size, args.classes, mode=mode)  # warm-up
                start = time.perf_counter()
                render(ids, ids, np.random.default_rng(1), size, args.classes, mode=mode)
                rate = args.n / (time.perf_counter() - start)
                print(f"{size:3d} px, {threads} thread(s), {mode:12s}: {rate:8.0f} images/s")


if __name__ == "__main__":
    main()
