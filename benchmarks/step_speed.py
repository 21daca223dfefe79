"""How fast one training step of a sweep's downstream model runs, against what the CPU's matrix
products allow (the starting point of "Training at the hardware's speed").

One thread. For the sweep's model and batch size (default: the quickstart's), steps/s of:
  - eager: the loop's step as `methods.training.Serial` runs it (AdamW, per-parameter loop on CPU);
  - eager, fused AdamW: the same with `torch.optim.AdamW(fused=True)`;
  - compiled: `torch.compile` over the loss (forward, loss; backward through AOTAutograd) with a
    compiled optimiser step (compile time reported apart);
  - packed (eager): model-steps/s of `methods.packing.calibrate` at K = 1, 2, 4, ... (vmapped);
and the matrix-product rate (GFLOP/s) at the model's linear shapes and at 1024^3, so the step's
achieved GFLOP/s (6 x non-embedding parameters x tokens per step) can be read as a fraction of it.
Timed runs alternate between variants and the best of `--repeats` is kept.

    python benchmarks/step_speed.py [SWEEP.yaml] [--steps 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.nn import functional as F


def _rate(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def matmul_gflops(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * m * k * n * done / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from methods.packing import calibrate
    from methods.training import cross_entropy
    from orchestrator.config import load_sweep_file
    from orchestrator.trial import fresh_model

    torch.set_num_threads(1)
    sweep = load_sweep_file(args.sweep)
    task, cfg = sweep.build_task(), sweep.training
    data = task.downstream_data(0, 1.0)
    idx = torch.arange(min(cfg.batch_size, len(data.train)))
    x, y = data.train.x[idx], data.train.y[idx]

    def build(**adamw):
        model = fresh_model(sweep, task, 0, "init").train()
        return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **adamw)

    def eager_step(model, opt):
        def step():
            loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    variants = {"eager": eager_step(*build()), "eager, fused AdamW": eager_step(*build(fused=True))}
    model, opt = build(foreach=True)
    loss_fn = torch.compile(lambda inputs, labels: F.cross_entropy(model(inputs).float(), labels))
    opt_step = torch.compile(opt.step)

    def compiled():
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()

    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start
    variants["compiled (loss and optimiser step)"] = compiled
    for step in variants.values():
        _rate(step, 5)  # warm-up
    best = dict.fromkeys(variants, 0.0)
    for _ in range(args.repeats):
        for name, step in variants.items():
            best[name] = max(best[name], _rate(step, args.steps))

    probe = fresh_model(sweep, task, 0, "init")
    packed = calibrate(cross_entropy(probe, data), data, cfg, 16, min_seconds=1.0, min_gain=0.0)

    linears = [m for m in probe.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    tokens = x.numel() if x.dtype == torch.long else len(x)
    flop = 6 * weights * tokens
    shapes = sorted({(tokens, m.in_features, m.out_features) for m in linears})
    peak = {s: matmul_gflops(*s) for s in shapes}
    big = matmul_gflops(1024, 1024, 1024)

    print(f"{args.sweep}: {type(probe).__name__}, {weights:,} weights in linear layers, {tokens} tokens per step")
    print(f"machine: {cpu_name()}, torch {torch.__version__}, 1 thread")
    print(f"{'variant':40s} {'steps/s':>9s} {'GFLOP/s':>8s}")
    for name, rate in best.items():
        print(f"{name:40s} {rate:9.1f} {rate * flop / 1e9:8.1f}")
    print(f"compile time (first compiled step): {compile_s:.1f} s")
    for k, rate in packed.rates.items():
        print(f"{f'packed, eager, K = {k}':40s} {rate:9.1f} {rate * flop / 1e9:8.1f}")
    print("matrix products (GFLOP/s): " + ", ".join(f"{m}x{k}x{n}: {g:.0f}" for (m, k, n), g in peak.items())
          + f", 1024^3: {big:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
