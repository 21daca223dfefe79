"""Model-steps/s of packed training (`methods.packing.fit_packed`) against K separate `fit`s.

The quickstart's downstream model (or the sweep given) on its downstream data, K fresh models of K
seeds, trained for the same epochs both ways (per-epoch validation included, as in a trial), with
1 and 2 torch threads. Prints the machine, a table of model-steps/s (serial, packed, their ratio)
against K, and what the packed run would cost if attention ran CPU's fused kernel (which has no
vmap batching rule, so vmap loops over the models) instead of the math kernel `fit_packed` picks.

    python benchmarks/packing_fit.py [SWEEP.yaml] [--ks 1 4 8 16 32] [--threads 1 2] [--epochs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=1.0, help="data fraction of the downstream pool")
    parser.add_argument("--attention-k", type=int, default=16, help="K of the attention-kernel comparison (0: skip)")
    args = parser.parse_args()

    from common.seeding import torch_generator
    from methods import packing
    from methods.training import cross_entropy, fit
    from orchestrator.config import load_sweep_file
    from orchestrator.trial import fresh_model

    sweep = load_sweep_file(args.sweep)
    cfg = sweep.training.model_copy(update={"epochs": args.epochs, "patience": None, "target_val_acc": None})
    task = sweep.build_task()
    datas = {k: task.downstream_data(k, args.fraction) for k in range(max(args.ks))}

    def members(k: int, overrides: dict | None = None):
        s = sweep.model_copy(update={"model": sweep.model.model_copy(update=overrides)}) if overrides else sweep
        models = [fresh_model(s, task, seed, "init") for seed in range(k)]
        return models, [datas[seed] for seed in range(k)], [torch_generator(seed, "bench") for seed in range(k)]

    def serial(k: int) -> float:
        models, ds, gens = members(k)
        start = time.perf_counter()
        steps = sum(fit(cross_entropy(m, d), d, cfg, g).steps for m, d, g in zip(models, ds, gens, strict=True))
        return steps / (time.perf_counter() - start)

    def packed(k: int, overrides: dict | None = None) -> float:
        models, ds, gens = members(k, overrides)
        objectives = [cross_entropy(m, d) for m, d in zip(models, ds, strict=True)]
        start = time.perf_counter()
        results = packing.fit_packed(objectives, ds, cfg, gens)
        return sum(r.steps for r in results) / (time.perf_counter() - start)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = _cpu_model() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"load average at start: {load:.2f}")
    m = sweep.model
    print(
        f"model: {m.name}, {m.n_layers} layers x {m.d_model} wide, dropout {m.dropout}; "
        f"{len(datas[0].train)} training rows, batch {cfg.batch_size}, {args.epochs} epoch(s) per model"
    )
    packed(2)  # warm-up: imports, allocator, vmap's first trace
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s)")
        print(f"{'K':>4} {'serial steps/s':>15} {'packed steps/s':>15} {'ms/model-step':>14} {'packed/serial':>14}")
        for k in args.ks:
            s, p = serial(k), packed(k)
            print(f"{k:>4} {s:>15.0f} {p:>15.0f} {1e3 / p:>14.2f} {p / s:>13.2f}x")
    if args.attention_k:
        torch.set_num_threads(1)
        k = args.attention_k
        # Without dropout, CPU attention picks the fused kernel; under vmap that kernel runs once per model.
        math_kernel = packed(k, {"dropout": 0.0})
        with _fused_attention(packing):
            fused = packed(k, {"dropout": 0.0})
        print(f"\nattention, K={k}, dropout 0, 1 thread: math kernel {math_kernel:.0f} model-steps/s, ", end="")
        print(f"fused kernel (vmap loops) {fused:.0f} model-steps/s ({math_kernel / fused:.2f}x)")


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


@contextlib.contextmanager
def _fused_attention(packing):
    """Let `fit_packed` use whatever attention kernel torch picks (on CPU: the fused one)."""
    saved = packing.sdpa_kernel
    packing.sdpa_kernel = lambda backends: contextlib.nullcontext()
    try:
        yield
    finally:
        packing.sdpa_kernel = saved


if __name__ == "__main__":
    main()
