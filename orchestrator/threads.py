"""`resources.cpu: auto`: how many CPUs (torch threads) each trial gets, measured on the machine.

A node of C CPUs can run C trials of 1 thread, C/2 trials of 2 threads, and so on. Which gives the
most model-steps per second depends on the model (a tiny one is bound by per-operation overhead,
which threads do not share out; a wide one by arithmetic or memory, which they may), the batch
shape and the CPU, so it is measured, not assumed: for each t = 1, 2, 4, ... up to C, C // t
processes of t threads each (at most `resources.max_concurrent`) train a fresh copy of the sweep's
model (its default objective, eager AdamW steps on its training batch shape) at the same time
for `WINDOW_S` seconds, and the node's rate is the sum of theirs. The choice is the smallest t
within `MARGIN` of the fastest: fewer threads run more trials at once and keep numbers closest to
one thread's (a trial's numbers are bit-identical only at the
same thread count: rows carry `threads`).

The measurement runs as one Ray task holding a whole node (the largest), so on a cluster it
measures a worker, and is kept in the artifact store under the node's CPU model and count,
`max_concurrent`, the torch version, the task and the model and the training batch size: a resumed
or extended sweep keeps its thread count, and its numbers, without measuring again. Trials given a
GPU take 1 CPU each (not measured: the GPU paces them). Where the measurement fails or takes longer
than `TIMEOUT_S`, trials take 1 CPU, with a warning naming why. Opt-in (the default `cpu` is 1): a
choice made from timings can differ between two fresh runs, and so can their numbers.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

from orchestrator.config import SweepConfig, load_sweep
from orchestrator.outdir import cpu_model

MARGIN = 1.05  # more threads per trial only for at least 5% more model-steps/s on the node
WINDOW_S = 2.0  # seconds each option trains, all its processes at once
WARMUP_STEPS = 5
KIND = "threads"  # the artifact store's kind for measurements
TIMEOUT_S = 600.0  # the most a measurement may take, node scheduling included


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
    """What a measurement depends on: the node, torch, the trials allowed at once, and the shapes one
    training step computes."""
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpus": cpus,
        "max_concurrent": sweep.resources.max_concurrent,
        "torch": torch.__version__,
        "task": sweep.task.canonical(),
        "model": sweep.model.canonical(),
        "batch_size": sweep.training.batch_size,
        "window_s": WINDOW_S,
    }


def measure(
    sweep_json: str, cpus: int, window_s: float = WINDOW_S, max_concurrent: int | None = None
) -> dict[str, Any]:
    """Model-steps/s of the whole node for each option (`options(cpus)`: as many trials as fit, at
    most `max_concurrent`), the choice, and each process's start and end (`spans`)."""
    rates: dict[int, float] = {}
    spans: dict[int, list[tuple[float, float]]] = {}
    for threads in options(cpus):
        n = min(cpus // threads, max_concurrent or cpus)
        done = _together(sweep_json, threads, n, window_s)
        rates[threads] = sum(d["steps"] / d["seconds"] for d in done)
        spans[threads] = [(d["start"], d["end"]) for d in done]
    return {"rates": rates, "threads": choose(rates), "spans": spans, "measured_at": time.time()}


def _together(sweep_json: str, threads: int, n: int, window_s: float) -> list[dict[str, float]]:
    """`n` processes of `threads` threads each, started together once all have warmed up."""
    command = [sys.executable, "-m", "orchestrator.threads", str(threads), str(window_s)]
    with tempfile.TemporaryFile("w+") as errors:
        procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
                 for _ in range(n)]  # fmt: skip
        try:
            done: list[dict[str, float] | None] = [None] * n
            with contextlib.suppress(BrokenPipeError):  # a process that died says why on stderr
                for p in procs:
                    p.stdin.write(sweep_json + "\n")
                    p.stdin.flush()
                if all(p.stdout.readline().strip() == "ready" for p in procs):  # each built its model, warmed up
                    for p in procs:  # then all start at once
                        p.stdin.write("go\n")
                        p.stdin.flush()
                    done = [json.loads(p.stdout.readline() or "null") for p in procs]
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

        cpus = int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0))
        try:
            if cpus < 1:
                raise RuntimeError("no node with CPUs is up yet")
            on_node = ray.remote(num_cpus=cpus)(_on_node).remote(json.dumps(sweep.canonical()), cpus, store)
            try:
                meta, computed = ray.get(on_node, timeout=TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(on_node, force=True)
                raise RuntimeError(
                    f"no answer in {TIMEOUT_S:.0f} s (no node free, or a measuring process hung)"
                ) from None
            rates = {int(t): float(r) for t, r in meta["rates"].items()}
            chosen = choose(rates)  # from the stored rates: the rule is this code's
            listed = ", ".join(f"{t} thread(s) x {min(cpus // t, sweep.resources.max_concurrent or cpus)}: {r:.0f}"
                               for t, r in rates.items())  # fmt: skip
            how = "measured" if computed else "kept from an earlier measurement in the artifact store"
            how = f"{how}; model-steps/s of a {cpus}-CPU node ({meta['cpu_model']}): {listed}"
        except Exception as error:  # a failed measurement never stops a sweep
            warnings.warn(f"resources.cpu: auto could not measure ({error}); trials take 1 CPU each", stacklevel=2)
            chosen, how = 1, "the measurement failed"
    print(f"[instill] resources.cpu: auto -> {chosen} CPU(s) per trial ({how})", file=sys.stderr)
    raw = sweep.canonical()  # validated afresh, as a worker loads it (no cached variant keeps "auto")
    return load_sweep({**raw, "resources": {**raw["resources"], "cpu": float(chosen)}})


def _on_node(sweep_json: str, cpus: int, store) -> tuple[dict[str, Any], bool]:
    """On the node that measures (a Ray task holding all its CPUs): its stored measurement, or a
    new one; and whether it was measured now."""
    sweep = load_sweep(json.loads(sweep_json))
    found = key(sweep, cpus)

    def measured() -> tuple[dict, dict[str, Any]]:
        return {}, {
            **measure(sweep_json, cpus, max_concurrent=sweep.resources.max_concurrent),
            "cpu_model": found["cpu_model"],
        }

    fetched = store.get_or_compute(KIND, found, measured)
    return fetched.meta, fetched.computed


def _measure_here(threads: int, window_s: float) -> None:
    """One measuring process: build the model from the sweep on stdin, warm up, say ready, wait for
    go, train for `window_s`, print the steps and seconds."""
    import torch

    from methods.training import cross_entropy
    from orchestrator.trial import fresh_model

    torch.set_num_threads(threads)
    sweep = load_sweep(json.loads(sys.stdin.readline()))
    task, cfg = sweep.build_task(), sweep.training
    data = task.downstream_data(0, 1.0)
    batch = {"train": data.train.take(torch.arange(min(cfg.batch_size, len(data.train))))}
    model = fresh_model(sweep, task, 0, "init").train()
    objective = cross_entropy(model, data)  # the default objective (a model's own loss where it has one)
    opt = torch.optim.AdamW(objective.params, lr=cfg.lr)

    def step() -> None:
        loss, _ = objective.loss(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARMUP_STEPS):
        step()
    print("ready", flush=True)
    sys.stdin.readline()  # go
    wall, start, steps = time.time(), time.perf_counter(), 0
    while time.perf_counter() - start < window_s:
        step()
        steps += 1
    seconds = time.perf_counter() - start
    print(json.dumps({"steps": steps, "seconds": seconds, "start": wall, "end": wall + seconds}), flush=True)


if __name__ == "__main__":
    _measure_here(int(sys.argv[1]), float(sys.argv[2]))
