"""The upstream phase: every missing artifact of a sweep computed once, before the trials start.

Artifacts are computed level by level (a kind after the kinds it needs), as Ray tasks with a trial's
resources, at most `concurrency` at a time: exactly-once on any storage, object stores included. A
failure here is reported and left to the trials that need the artifact: they retry it and record it.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import time
from collections.abc import Callable

from common.config import stable_hash
from methods import ARTIFACTS
from methods.artifacts import closure
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import SweepConfig, load_sweep
from orchestrator.trial import TrialSpec, TrialSupervisor, Upstream, kind_uses, near_equal, pick_device, trial_needs


def _compute(sweep_json: str, spec_json: str, kind: str, store_root: str, points_json: str | None = None) -> float:
    """Runs inside a Ray worker: compute one artifact (its own needs are already stored), or with
    `points` the artifacts of the spec's context at each of those values of the kind's shared axes."""
    import torch

    from orchestrator import stop

    sweep = load_sweep(json.loads(sweep_json))
    torch.set_num_threads(max(1, int(sweep.resources.cpu)))
    start = time.perf_counter()
    spec, store = TrialSpec(**json.loads(spec_json)), ArtifactStore(store_root)
    # Checkpointed, and stopped on request (the checkpoint is kept for the next run).
    supervisor = TrialSupervisor(spec.config(sweep), store, should_stop=stop.requested)
    upstream = Upstream(sweep, spec, store, pick_device(sweep), supervisor)
    if points_json is None:
        upstream.get(kind)
    else:
        upstream.compute_shared(kind, json.loads(points_json))
    return time.perf_counter() - start


def _shared_runs(jobs: list[dict], slots: int = 1, limit: int = 1) -> list[dict]:
    """Jobs of a kind with shared paths (`ArtifactKind.shares`) whose keys differ only there merged
    into one run over their points. A kind that packs seeds (`packs_seeds`, its key saying `packed`)
    shares `seed` too, and its runs are packs: `slots` runs of near-equal size, each of at most `limit`
    models. Each run lists the keys it stores (`members`) and its `points` (None: a plain `get`)."""
    runs: dict[tuple[str, str], dict] = {}
    for job in jobs:
        art = ARTIFACTS.get(job["kind"])
        packs = art.packs_seeds and bool(job["key"].get("packed"))
        rest, point = copy.deepcopy(job["key"]), {}
        for path in art.shares:  # a shared path's value sits in the key's `reads`, as the kind read it
            *parents, leaf = path.split(".")
            point[path] = functools.reduce(dict.get, parents, rest["reads"]).pop(leaf)
        if packs:
            point["seed"] = rest.pop("seed")
        run = runs.setdefault(
            (job["kind"], stable_hash(rest)), {**job, "members": [], "points": [] if point else None, "packs": packs}
        )
        run["members"].append(job["key"])
        if point:
            run["points"].append(point)
    out = []
    for run in runs.values():
        n = len(run["members"])
        if not run["packs"] or n == 1:
            out.append(run)
            continue
        start = 0
        for size in near_equal(n, max(min(slots, n), -(-n // max(1, limit)))):
            part = slice(start, start + size)
            out.append({**run, "members": run["members"][part], "points": run["points"][part]})
            start += size
    return out


def _slots(sweep: SweepConfig, concurrency: int, cluster: dict[str, float]) -> int:
    """How many upstream computations run at once: `concurrency` (CPU slots), and with GPUs per
    trial at most as many as the cluster's GPUs hold."""
    if sweep.resources.gpu > 0:
        return max(1, min(concurrency, int(cluster.get("GPU", 0) // sweep.resources.gpu)))
    return concurrency


def _depth(kind: str) -> int:
    needs = ARTIFACTS.get(kind).needs
    return 0 if not needs else 1 + max(_depth(n) for n in needs)


def precompute(
    sweep: SweepConfig,
    store: ArtifactStore,
    specs: list[TrialSpec],
    concurrency: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, str]:
    """Compute the missing upstream artifacts of `specs`, each once. Returns {artifact: error}.
    Once `should_stop()` is True no new computation starts (running ones checkpoint and end)."""
    import ray

    remote = ray.remote(_compute).options(num_cpus=sweep.resources.cpu, num_gpus=sweep.resources.gpu)
    jobs: dict[tuple[str, str], dict] = {}  # (kind, key hash) -> job: one entry per distinct artifact
    for spec in specs:
        up = Upstream(sweep, spec, None, pick_device(sweep))
        for kind in trial_needs(sweep, spec):
            key = up.key(kind)
            uses = kind_uses(spec.config(sweep))
            deps = [(dep, stable_hash(up.key(dep))) for dep in closure(uses(kind), uses)]
            jobs.setdefault((kind, stable_hash(key)), {"kind": kind, "spec": spec, "key": key, "deps": deps})
    # One existence check per distinct artifact (each is a request on an object store), not per trial.
    from orchestrator.worker import pack_limit  # the worker's, for the upstream packs too

    missing = [job for job in jobs.values() if not store.exists(job["kind"], job["key"])]
    missing = _shared_runs(missing, slots=_slots(sweep, concurrency, ray.cluster_resources()), limit=pack_limit(sweep))
    as_json = json.dumps(sweep.canonical())
    failed: dict[tuple[str, str], str] = {}
    errors: dict[str, str] = {}
    for depth in sorted({_depth(job["kind"]) for job in missing}):
        level = sorted((j for j in missing if _depth(j["kind"]) == depth), key=lambda j: (j["kind"], j["spec"].name))
        kinds = sorted({j["kind"] for j in level})
        count = sum(len(j["members"]) for j in level)
        runs = f" in {len(level)} run(s)" if count > len(level) else ""
        print(f"[instill] computing {count} {'/'.join(kinds)} artifact(s){runs} before the trials", file=sys.stderr)
        pending, running = list(level), {}
        while pending or running:
            if should_stop():
                pending.clear()
            while pending and len(running) < concurrency:
                job = pending.pop(0)
                if any(dep in failed for dep in job["deps"]):
                    continue  # what it needs failed: the trials will report it
                spec_json = json.dumps(job["spec"].model_dump())
                points = json.dumps(job["points"]) if job["points"] is not None else None
                running[remote.remote(as_json, spec_json, job["kind"], store.location, points)] = job
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as err:  # reported, then left to the trials (see the module docstring)
                if should_stop():
                    continue  # stopped on request, not a failure: the next run resumes it
                name = f"{job['kind']} for {job['spec'].name}"
                if job.get("packs"):  # one of several packs of this family: name its seeds
                    name += f" (seeds {[p['seed'] for p in job['points']]})"
                errors[name] = str(err).strip().splitlines()[-1]
                for member in job["members"]:
                    failed[(job["kind"], stable_hash(member))] = errors[name]
                print(f"[instill] {name} failed: {errors[name]}", file=sys.stderr)
    return errors
