"""How fast one training step of a sweep's downstream model runs, against what the CPU's matrix
products allow ("Training at the hardware's speed").

One thread. For the sweep's model and batch size (default: the quickstart's), on the same batch,
steps/s and achieved GFLOP/s (6 x weights in linear layers x tokens per step) of:
  - eager: the loop's serial engine (`methods.training.Serial(compile=False)`), AdamW as the loop
    builds it (per-parameter loop on CPU);
  - eager, fused AdamW: the same step with `torch.optim.AdamW(fused=True)`;
  - compiled loss, compiled optimiser step: `torch.compile` of the loss and of a foreach AdamW's
    `step` (the alternative to the fused optimiser the compiled engine takes);
  - compiled loss, fused AdamW: the compiled engine for a loss that does not allow the whole step
    (`Serial(compile=True)` on a loss without `through_module`: the loss through `torch.compile`,
    its backward through AOTAutograd, the fused optimiser);
  - compiled whole step: the compiled engine (`Serial(compile=True)`) on the sweep's cross-entropy
    objective: forward, backward (`torch.func.grad`) and torch's AdamW update as one graph
    (`methods.training.whole_step`); its compile time (the first step, in this process) is reported
    apart and also spread over one run of the sweep's trial (`amortised`), with the number of steps
    at which compiling pays for itself (`break-even`);
  - packed, eager and compiled: model-steps/s of the vmapped engine (`methods.packing.Vmapped`,
    compile False / True: the vmapped loss through `torch.compile`, the fused optimiser) at each
    K of `--ks` (each compiled K is a graph of its own: its compile time is reported apart);
beside the matrix-product rate at the model's linear shapes and at 1024^3. Timed runs alternate
between the variants and the best of `--repeats` is kept: on a shared machine, compare figures of
one run only (the load average is printed with them).

    python benchmarks/step_speed.py [SWEEP.yaml] [--steps 100] [--repeats 5] [--ks 4 16]

A cold compile (no Inductor cache on disk, as in a fresh container):
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/step_speed.py
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
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
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16], help="pack sizes measured")
    args = parser.parse_args()

    from methods.packing import Vmapped
    from methods.training import Serial, cross_entropy
    from orchestrator.config import load_sweep_file
    from orchestrator.trial import fresh_model

    torch.set_num_threads(1)
    sweep = load_sweep_file(args.sweep)
    task, cfg = sweep.build_task(), sweep.training
    data = task.downstream_data(0, 1.0)
    idx = torch.arange(min(cfg.batch_size, len(data.train)))
    x, y = data.train.x[idx], data.train.y[idx]
    load = os.getloadavg()[0]

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

    held = []  # the engines' open `running` contexts

    def engine_step(compile: bool, whole: bool = True):
        """The loop's serial engine, as `fit` runs it, stepping on the fixed batch (`whole`: False
        hides from the engine that the loss reads its tensors through the module only)."""
        model = fresh_model(sweep, task, 0, "init").train()
        engine = Serial(compile=compile)
        objective = cross_entropy(model, data)
        if not whole:
            objective = dataclasses.replace(objective, loss=lambda batch, step, loss=objective.loss: loss(batch, step))
        held.append(engine.running([objective], [data], cfg, False))
        held[-1].__enter__()  # open for the benchmark's life (held: a dropped context would close)
        engine.seed([0], [0])
        assert engine.compiled is compile and (engine.whole is not None) is (compile and whole)
        counter = iter(range(10**9))
        return lambda: engine.step([{"train": idx}], next(counter))

    def pack_step(compile: bool, k: int):
        """The vmapped engine as `fit_many` runs it, K models stepping on the fixed batch."""
        objectives = [cross_entropy(fresh_model(sweep, task, seed, "init").train(), data) for seed in range(k)]
        engine = Vmapped(compile=compile)
        held.append(engine.running(objectives, [data] * k, cfg, False))
        held[-1].__enter__()
        engine.seed(list(range(k)), list(range(k)))
        assert engine.compiled is compile
        counter = iter(range(10**9))
        return lambda: engine.step([{"train": idx}] * k, next(counter))

    variants = {"eager (the loop's serial engine)": engine_step(False)}
    variants["eager, fused AdamW"] = eager_step(*build(fused=True))
    model, opt = build(foreach=True)
    loss_fn = torch.compile(lambda inputs, labels: F.cross_entropy(model(inputs).float(), labels))
    opt_step = torch.compile(opt.step)

    def compiled_opt():
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()

    start = time.perf_counter()
    compiled_opt()
    compile_opt_s = time.perf_counter() - start
    variants["compiled loss, compiled AdamW step"] = compiled_opt
    loss_only = engine_step(True, whole=False)
    start = time.perf_counter()
    loss_only()
    compile_loss_s = time.perf_counter() - start
    variants["compiled loss, fused AdamW"] = loss_only
    compiled = engine_step(True)
    start = time.perf_counter()
    compiled()
    compile_s = time.perf_counter() - start
    variants["compiled whole step (the serial engine)"] = compiled
    pack_compile_s = {}
    for k in args.ks:
        variants[f"packed, eager, K = {k}"] = pack_step(False, k)
        step = pack_step(True, k)
        start = time.perf_counter()
        step()
        pack_compile_s[k] = time.perf_counter() - start
        variants[f"packed, compiled, K = {k}"] = step
    per_step = {name: int(name.rsplit("= ", 1)[1]) if "K =" in name else 1 for name in variants}  # models per step
    for step in variants.values():
        _rate(step, 5)  # warm-up
    best = dict.fromkeys(variants, 0.0)
    for _ in range(args.repeats):
        for name, step in variants.items():
            best[name] = max(best[name], _rate(step, args.steps))

    probe = fresh_model(sweep, task, 0, "init")

    linears = [m for m in probe.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    tokens = x.numel() if x.dtype == torch.long else len(x)
    flop = 6 * weights * tokens
    shapes = sorted({(tokens, m.in_features, m.out_features) for m in linears})
    peak = {s: matmul_gflops(*s) for s in shapes}
    big = matmul_gflops(1024, 1024, 1024)
    # The rate the model's matrix products allow: every linear layer's FLOP at its shape's rate.
    allowed = sum(m.weight.numel() for m in linears) / sum(
        m.weight.numel() / peak[(tokens, m.in_features, m.out_features)] for m in linears
    )
    eager_rate = best["eager (the loop's serial engine)"]
    compiled_rate = best["compiled whole step (the serial engine)"]
    batches = math.ceil(len(data.train) / cfg.batch_size)
    trial_steps = cfg.max_epochs(batches) * batches
    saved = 1 / eager_rate - 1 / compiled_rate

    print(f"{args.sweep}: {type(probe).__name__}, {weights:,} weights in linear layers, {tokens} tokens per step")
    print(f"machine: {cpu_name()}, torch {torch.__version__}, 1 thread; load average at start {load:.2f}, "
          f"at end {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'variant':45s} {'model-steps/s':>13s} {'GFLOP/s':>8s} {'of matmul':>9s}")
    for name, rate in best.items():
        gflops = rate * per_step[name] * flop / 1e9
        print(f"{name:45s} {rate * per_step[name]:13.1f} {gflops:8.1f} {gflops / allowed:9.0%}")
    amortised = trial_steps / (trial_steps / compiled_rate + compile_s)
    name = f"whole step, amortised over {trial_steps} steps"
    print(f"{name:45s} {amortised:13.1f} {amortised * flop / 1e9:8.1f} {amortised * flop / 1e9 / allowed:9.0%}")
    packs = ", ".join(f"packed K = {k} {s:.1f} s" for k, s in pack_compile_s.items())
    print(f"compile time (first step in this process): whole step {compile_s:.1f} s, compiled loss "
          f"{compile_loss_s:.1f} s, compiled loss and AdamW step {compile_opt_s:.1f} s, {packs}")  # fmt: skip
    if saved > 0:
        print(f"break-even: compiling pays after {compile_s / saved:.0f} steps ({saved * 1e3:.2f} ms saved per step)")
    else:
        print("break-even: never (the compiled step is not faster here)")
    print("matrix products (GFLOP/s): " + ", ".join(f"{m}x{k}x{n}: {g:.0f}" for (m, k, n), g in peak.items())
          + f", 1024^3: {big:.0f}; the model's layers together: {allowed:.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
