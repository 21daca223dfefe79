"""Training steps/s of Instill's loop against a plain PyTorch loop on the same model and batches.

Instill's `methods.training.train` adds per-epoch validation, best-epoch state copies, a seeded
dropout stream and a NaN check; this measures what that costs. Both loops run the quickstart's model
(or the sweep given) on its downstream data, one thread, for the same number of optimiser steps.

    python benchmarks/train_throughput.py [SWEEP.yaml] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch.nn import functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=1.0, help="data fraction of the downstream pool")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each loop; best is kept")
    args = parser.parse_args()

    from common.seeding import torch_generator
    from methods import train
    from methods.training import batches
    from orchestrator.config import load_sweep_file
    from orchestrator.trial import fresh_model

    torch.set_num_threads(1)
    sweep = load_sweep_file(args.sweep)
    cfg = sweep.training.model_copy(update={"epochs": args.epochs, "patience": None, "target_val_acc": None})
    task = sweep.build_task()
    data = task.downstream_data(0, args.fraction)

    def instill_loop() -> tuple[int, float]:
        model = fresh_model(sweep, task, 0, "init")
        start = time.perf_counter()
        result = train(model, data, cfg, torch_generator(0, "bench"))
        return result.steps, time.perf_counter() - start

    def plain_loop() -> tuple[int, float]:
        model = fresh_model(sweep, task, 0, "init")
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch_generator(0, "bench")
        steps = 0
        start = time.perf_counter()
        model.train()
        for _ in range(cfg.epochs):
            for idx in batches(len(data.train), cfg.batch_size, gen):
                loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
        return steps, time.perf_counter() - start

    plain_loop()  # warm-up: first-call allocations would otherwise count against whichever runs first
    runs = {"plain": [], "instill": []}
    for _ in range(args.repeats):  # alternate, keep the best of each
        runs["plain"].append(plain_loop())
        runs["instill"].append(instill_loop())
    steps, plain_s = min(runs["plain"], key=lambda r: r[1])
    isteps, instill_s = min(runs["instill"], key=lambda r: r[1])
    plain_rate, instill_rate = steps / plain_s, isteps / instill_s

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    print(f"model: {sweep.model.name} {sweep.model.canonical()}, batch {cfg.batch_size}, {len(data.train)} samples")
    print(f"plain PyTorch loop: {steps} steps in {plain_s:.2f} s = {plain_rate:.1f} steps/s")
    print(f"Instill train():    {isteps} steps in {instill_s:.2f} s = {instill_rate:.1f} steps/s")
    print(f"Instill / plain:    {instill_rate / plain_rate:.3f} (includes {args.epochs} validation passes)")


if __name__ == "__main__":
    main()
