"""`resources.cpu: auto`: how many CPUs (torch threads) each trial gets, measured on the machine.

A node of C CPUs can run C trials of 1 thread, C/2 trials of 2 threads, and so on. Which gives the
most model-steps per second depends on the model (a tiny one is bound by per-operation overhead,
which threads do not share out; a wide one by arithmetic or memory, which they may), the batch
shape and the CPU, so it is measured, not assumed: for each t = 1, 2, 4, ... up to C, C // t
processes of t threads each train a fresh copy of the sweep's model (eager AdamW steps on its
training batch shape) at the same time for `WINDOW_S` seconds, and the node's rate is the sum of
theirs. The choice is the smallest t within `MARGIN` of the fastest: fewer threads run more trials
at once and keep numbers closest to one thread's (a trial's numbers are bit-identical only at the
same thread count: rows carry `threads`).

The measurement runs as one Ray task holding a whole node (the largest), so on a cluster it
measures a worker, and is kept in the artifact store under the node's CPU model and count, the
torch version, the task and the model and the training batch size: a resumed or extended sweep
keeps its thread count, and its numbers, without measuring again. Trials given a GPU take 1 CPU
each (not measured: the GPU paces them). Where the measurement fails, trials take 1 CPU, with a
warning naming why.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

from orchestrator.config import SweepConfig, load_sweep

MARGIN = 1.05  # more threads per trial only for at least 5% more model-steps/s on the node
WINDOW_S = 2.0  # seconds each option trains, all its processes at once
WARMUP_STEPS = 5
KIND = "threads"  # the artifact store's kind for measurements


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def options(cpus: int) -> list[int]:
    """Threads per trial tried on a node of `cpus` CPUs: 1, 2, 4, ... up to `cpus`."""
    out, t = [], 1
    while t <= max(1, cpus):
        out.append(t)
        t *= 2
    return out


def choose(rates: dict[int, float], margin: float = MARGIN) -> int:
    """The fewest threads per trial whose node rate is within `margin` of the fastest option's."""
    best = max(rates.values())
    return min(t for t, rate in rates.items() if rate * margin >= best)


def key(sweep: SweepConfig, cpus: int) -> dict[str, Any]:
    """What a measurement depends on: the node, torch, and the shapes one training step computes."""
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpus": cpus,
        "torch": torch.__version__,
        "task": sweep.task.canonical(),
        "model": sweep.model.canonical(),
        "batch_size": sweep.training.batch_size,
        "window_s": WINDOW_S,
    }


def measure(sweep_json: str, cpus: int, window_s: float = WINDOW_S) -> dict[str, Any]:
    """Model-steps/s of the whole node for each option (`options(cpus)`), and the choice."""
    rates: dict[int, float] = {}
    for threads in options(cpus):
        done = _together(sweep_json, threads, cpus // threads, window_s)
        rates[threads] = sum(d["steps"] / d["seconds"] for d in done)
    return {"rates": rates, "threads": choose(rates), "measured_at": time.time()}


def _together(sweep_json: str, threads: int, n: int, window_s: float) -> list[dict[str, float]]:
    """`n` processes of `threads` threads each, started together once all have warmed up."""
    command = [sys.executable, "-m", "orchestrator.threads", str(threads), str(window_s)]
    with tempfile.TemporaryFile("w+") as errors:
        procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
                 for _ in range(n)]  # fmt: skip
        try:
            for p in procs:
                p.stdin.write(sweep_json + "\n")
                p.stdin.flush()
            ready = [p.stdout.readline().strip() == "ready" for p in procs]  # each has built its model, warmed up
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            done = [
                json.loads(p.stdout.readline() or "null") if ok else None for p, ok in zip(procs, ready, strict=True)
            ]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        if any(d is None for d in done):
            errors.seek(0)
            raise RuntimeError(f"a measuring process failed: {errors.read().strip()[-2000:]}")
    return done


def resolve(sweep: SweepConfig, store) -> SweepConfig:
    """`sweep` with `resources.cpu` a number: unchanged where it is one, else measured (or kept)."""
    if sweep.resources.cpu != "auto":
        return sweep
    chosen, how = 1, "trials given a GPU take 1 CPU each"
    if sweep.resources.gpu == 0:
        import ray

        cpus = int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1))
        try:
            on_node = ray.remote(num_cpus=cpus)(_on_node)
            meta, computed = ray.get(on_node.remote(json.dumps(sweep.canonical()), cpus, store))
            chosen = int(meta["threads"])
            rates = ", ".join(f"{t} thread(s) x {cpus // int(t)}: {r:.0f}" for t, r in meta["rates"].items())
            how = "measured" if computed else "kept from an earlier measurement in the artifact store"
            how = f"{how}; model-steps/s of a {cpus}-CPU node ({meta['cpu_model']}): {rates}"
        except Exception as error:  # a failed measurement never stops a sweep
            warnings.warn(f"resources.cpu: auto could not measure ({error}); trials take 1 CPU each", stacklevel=2)
            chosen, how = 1, "the measurement failed"
    print(f"[instill] resources.cpu: auto -> {chosen} CPU(s) per trial ({how})", file=sys.stderr)
    raw = sweep.canonical()  # validated afresh, as a worker loads it (no cached variant keeps "auto")
    return load_sweep({**raw, "resources": {**raw["resources"], "cpu": float(chosen)}})


def _on_node(sweep_json: str, cpus: int, store) -> tuple[dict[str, Any], bool]:
    """On the node that measures (a Ray task holding all its CPUs): its stored measurement, or a
    new one; and whether it was measured now."""
    found = key(load_sweep(json.loads(sweep_json)), cpus)
    fetched = store.get_or_compute(
        KIND, found, lambda: ({}, {**measure(sweep_json, cpus), "cpu_model": found["cpu_model"]})
    )
    return fetched.meta, fetched.computed


def _measure_here(threads: int, window_s: float) -> None:
    """One measuring process: build the model from the sweep on stdin, warm up, say ready, wait for
    go, train for `window_s`, print the steps and seconds."""
    import torch
    import torch.nn.functional as F

    from orchestrator.trial import fresh_model

    torch.set_num_threads(threads)
    sweep = load_sweep(json.loads(sys.stdin.readline()))
    task, cfg = sweep.build_task(), sweep.training
    data = task.downstream_data(0, 1.0)
    idx = torch.arange(min(cfg.batch_size, len(data.train)))
    x, y = data.train.x[idx], data.train.y[idx]
    model = fresh_model(sweep, task, 0, "init").train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    def step() -> None:
        if getattr(model, "own_loss", False):
            loss = model(x, targets=y)[0]
        else:
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARMUP_STEPS):
        step()
    print("ready", flush=True)
    sys.stdin.readline()  # go
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < window_s:
        step()
        steps += 1
    print(json.dumps({"steps": steps, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    _measure_here(int(sys.argv[1]), float(sys.argv[2]))
