"""What runs inside a Ray worker for one Tune trial: a group of our trials, one after another
(`orchestrator.queue` sizes the groups), each row sent to the driver as the trial ends.

A group of one trial reports a result after every stage and epoch (the live curves); a group of
several short trials reports epochs at most once every `REPORT_EVERY_S` and no stages. Finished rows
travel in batches (`"stage": "rows"`, and `"done"` with the last), each with the compute time and
cost of its trials, from which the queue sizes the next groups.

A trial that raises gets a failed row and the group goes on (retries are the driver's,
`orchestrator.queue`). A stop request ends the group after the running trial's checkpoint
(`"stage": "interrupted"`): the unfinished trials get no row and run in the next run.
"""

from __future__ import annotations

import functools
import json
import time
import traceback
from typing import Any

from methods import get_method
from methods.training import Interrupted
from orchestrator import stop
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import SweepConfig, load_sweep
from orchestrator.ordering import cost
from orchestrator.queue import members
from orchestrator.trial import TrialSpec, failed_row, pick_device, run_pack, run_trial

REPORT_EVERY_S = 1.0


@functools.lru_cache(maxsize=4)
def sweep_of(sweep_json: str) -> SweepConfig:
    """The validated sweep, once per worker process (validation grows with the grid's axes)."""
    return load_sweep(json.loads(sweep_json))


def trainable(config: dict[str, Any], sweep_json: str, store_root: str) -> None:
    import torch
    from ray import tune

    sweep = sweep_of(sweep_json)
    specs = [TrialSpec(**s) for s in members(config)]
    torch.set_num_threads(max(1, int(sweep.resources.cpu)))
    if sweep.resources.gpu > 0 and torch.cuda.is_available() and sweep.resources.gpu < 1:
        # Fractional GPUs only steer Ray's scheduling; cap memory so packed trials cannot starve each other.
        torch.cuda.set_per_process_memory_fraction(sweep.resources.gpu)
    Group(sweep, specs, ArtifactStore(store_root), tune.report).run()


class Group:
    """Runs `specs` in order and sends their rows through `send` (Tune's report)."""

    def __init__(self, sweep: SweepConfig, specs: list[TrialSpec], store: ArtifactStore, send):
        self.sweep, self.specs, self.store, self.send = sweep, specs, store, send
        self.alone = len(specs) == 1
        self.rows: list[tuple[TrialSpec, dict[str, Any]]] = []  # finished, not yet sent
        self.started = 0  # index of the trial running now
        self.last_rows = self.last_epoch = time.monotonic()

    def run(self) -> None:
        limit = pack_limit(self.sweep)
        # A lone packable trial trains as a pack of one: its numbers do not depend on its company.
        packable = [s for s in self.specs if get_method(s.method).packable] if limit > 1 else []
        if packable:
            try:
                self.run_packed(packable, limit)
            except Interrupted as stopped:
                print(f"[{packable[0].name}+{len(packable) - 1}] {stopped}; they run again in the next run", flush=True)
                self.flush("interrupted")
                return
            if len(packable) < len(self.specs) and stop.requested():
                self.flush("interrupted")
                return
        # Indices into the whole group: the driver marks trial `group_next` of its list as running.
        alone = [(i, s) for i, s in enumerate(self.specs) if s not in packable]
        for n, (index, spec) in enumerate(alone):
            self.started = index
            try:
                row = self.run_one(spec)
            except Interrupted as stopped:
                print(f"[{spec.name}] {stopped}; resumes from its checkpoint in the next run", flush=True)
                self.flush("interrupted")
                return
            log(spec, row["status"], row)
            self.rows.append((spec, row))
            if time.monotonic() - self.last_rows >= REPORT_EVERY_S and n + 1 < len(alone):
                self.started = alone[n + 1][0]
                self.flush("rows")
        self.flush("done")

    def run_packed(self, specs: list[TrialSpec], limit: int) -> None:
        """Train `specs` in packs (`run_pack`); a trial that fails in its pack gets a failed row."""
        outcomes = run_pack(
            self.sweep,
            specs,
            self.store,
            limit,
            should_stop=stop.requested,
            calibrate_k=self.sweep.resources.pack == "auto" and pick_device(self.sweep).type == "cuda",
            report=self.report,
        )
        for spec, outcome in zip(specs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                print(f"[{spec.name}] failed in its pack: {outcome!r}", flush=True)
                outcome = failed_row(self.sweep, spec, outcome)
            log(spec, outcome["status"], outcome)
            self.rows.append((spec, outcome))

    def run_one(self, spec: TrialSpec) -> dict[str, Any]:
        """The trial's row: done, or failed with its error."""
        try:
            return run_trial(
                self.sweep, spec, self.store, report=lambda m: self.report(spec, m), should_stop=stop.requested
            )
        except Interrupted:
            raise
        except Exception as error:  # recorded in the row; the group goes on
            print(f"[{spec.name}] failed:", flush=True)
            traceback.print_exc()
            return failed_row(self.sweep, spec, error)

    def report(self, spec: TrialSpec, metrics: dict[str, Any]) -> None:
        stage = metrics["stage"]
        if stage != "epoch":
            # A trial alone logs and reports every stage; one in a group only its end (`run`).
            if self.alone and stage != "done":  # the row goes in the group's next batch
                log(spec, stage, metrics)
                self.send(metrics)
            return
        now = time.monotonic()
        if self.alone or now - self.last_epoch >= REPORT_EVERY_S:
            self.last_epoch = now
            self.send(metrics)

    def flush(self, stage: str) -> None:
        batch, self.rows = self.rows, []
        done = [(spec, row) for spec, row in batch if row["status"] == "done"]
        result: dict[str, Any] = {
            "stage": stage,
            "rows_json": json.dumps([row for _, row in batch]),
            "rows_compute_s": sum(row["total_s"] for _, row in done),
            "rows_cost": sum(cost(spec) for spec, _ in done),
            "group_next": self.started,  # the index of the trial that runs next (for `instill status`)
        }
        if self.alone and done:
            result["val_acc"] = done[0][1]["val_acc"]
        self.last_rows = time.monotonic()
        self.send(result)


def log(spec: TrialSpec, stage: str, metrics: dict[str, Any]) -> None:
    """A line in the Tune trial's own log file (RunConfig(log_to_file=True)), not the console."""
    timing = {k: round(v, 2) for k, v in metrics.items() if k.endswith("_s")}
    print(f"[{spec.name}] stage {stage} {timing}", flush=True)


# Under `resources.pack: auto`, the most models in a pack: on CPU a fixed K (packs beyond 16 gain
# little, benchmarks/packing_fit.py); on a GPU the worker measures K up to this bound.
AUTO_PACK = {"cpu": 16, "cuda": 64}


def pack_limit(sweep: SweepConfig) -> int:
    """The most models this worker trains as one pack (1: no packing)."""
    if sweep.resources.pack != "auto":
        return int(sweep.resources.pack)
    return AUTO_PACK.get(pick_device(sweep).type, 1)
