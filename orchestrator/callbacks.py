"""Tune callbacks on the driver: rows written the moment a trial ends, and one live progress line.

Tune calls `on_step_end` with every trial it has created, several times per trial: the callbacks here
look only at the unfinished trials (`LiveTrials`) and do the rest per trial event, so a sweep's
bookkeeping stays linear in its trials.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.config import SweepConfig
from orchestrator.ordering import budget_cost, cost
from orchestrator.outdir import mark_running, write_row
from orchestrator.trial import TrialSpec, failed_row, trial_hash


class LiveTrials:
    """The trials Tune has created that have not finished. Tune's list only grows, so each step
    reads its new tail and the trials still live, not the whole sweep."""

    FINISHED = ("TERMINATED", "ERROR")

    def __init__(self):
        self.seen = 0
        self.live: list = []

    def update(self, trials: list) -> list[tuple]:
        """(trial, status) of every live trial of `trials`, in Tune's order."""
        if len(trials) < self.seen:  # a new list (e.g. a restored experiment): start over
            self.seen, self.live = 0, []
        self.live.extend(trials[self.seen :])
        self.seen = len(trials)
        statuses = [(t, t.status) for t in self.live]
        self.live = [t for t, status in statuses if status not in self.FINISHED]
        return [(t, status) for t, status in statuses if status not in self.FINISHED]

    def running(self, trials: list) -> int:
        """How many of `trials` are RUNNING (by Tune's states: with reused actors, start and end
        events do not always pair up)."""
        return sum(status == "RUNNING" for _, status in self.update(trials))


def make_callbacks(
    out_dir: Path,
    sweep: SweepConfig,
    todo: list[TrialSpec],
    done_before: int,
    stopping: Callable[[], bool] = lambda: False,
    queue=None,
):
    """(the Rows callback, every callback to give Tune). Once `stopping()` is True, a trial that ends
    without its final result is not a failure: it gets no row and resumes in the next run."""
    from ray import tune

    from orchestrator.queue import members

    total = len(todo)
    total_cost = sum(cost(s) for s in todo)

    class Rows(tune.Callback):
        """Writes each trial's row on the driver as soon as it arrives. A trial that failed, or whose
        group ended without its row, goes back to the queue; once its tries are spent, its failed row is written."""

        def __init__(self):
            self.done = self.failed = self.running = self.interrupted = 0
            self.cost_done = 0.0
            self.live = LiveTrials()
            self.groups: dict[str, Group] = {}  # Tune trial id -> its group, while it runs

        def on_step_end(self, iteration, trials, **info):
            self.running = self.live.running(trials)

        def _group(self, trial) -> Group:
            if trial.trial_id not in self.groups:
                self.groups[trial.trial_id] = Group(out_dir, sweep, members(trial.config))
            return self.groups[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            # Marked at its start, not its first report: buffered results can come only at its end.
            self._group(trial).mark(0)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "rows_json" not in result:
                return
            group = self._group(trial)
            for row in json.loads(result["rows_json"]):
                group.finished(row)
                if row["status"] == "failed" and not self._retry([group.spec_of(row)], row["error"]):
                    continue  # it runs again
                write_row(out_dir, row)
                self.done += row["status"] == "done"
                self.failed += row["status"] == "failed"
                self.cost_done += budget_cost(row["data_fraction"])
            if result["stage"] == "rows":
                group.mark(int(result["group_next"]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            try:
                # Stopped on request after checkpointing: resumed later.
                stopped = (trial.last_result or {}).get("stage") == "interrupted" or stopping()
                self._end(trial, None if stopped else "trial ended without a final result")
            finally:
                forget_results(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            try:
                # Its worker was lost; on a stop (its worker got the signal too) its trials resume later.
                self._end(trial, None if stopping() else error_text(trial))
            finally:
                forget_results(trial)

        def _retry(self, specs: list[TrialSpec], error: str) -> list[TrialSpec]:
            """Hand failed `specs` back to the queue, which decides whether they run again (the one
            place retries are decided); returns those whose tries are spent."""
            if queue is None or not specs:
                return specs
            spent = [TrialSpec(**s) for s in queue.requeue([s.model_dump() for s in specs])]
            if len(spent) < len(specs):
                print(f"[instill] {len(specs) - len(spent)} trial(s) queued again after: {error}", file=sys.stderr)
            return spent

        def _end(self, trial, error: str | None) -> None:
            """The group is over: its trials without a row go back to the queue while they have tries
            left, then fail with `error`; or (None: a stop) stay pending."""
            group = self.groups.pop(trial.trial_id, None) or Group(out_dir, sweep, members(trial.config))
            group.mark(None)
            unfinished = group.unfinished() if error is None else self._retry(group.unfinished(), error)
            for spec in unfinished:
                if error is None:
                    self.interrupted += 1
                else:
                    write_row(out_dir, failed_row(sweep, spec, error))
                    self.failed += 1
                    self.cost_done += cost(spec)

    class Progress(tune.Callback):
        """One live summary line: done, running, pending, failed, elapsed, ETA."""

        def __init__(self, rows: Rows):
            self.rows = rows
            self.start = time.monotonic()
            self.last_print = 0.0

        def line(self) -> str:
            r = self.rows
            finished = r.done + r.failed
            running = min(r.running, total - finished)  # Tune's states lag completions by a step
            pending = total - finished - running
            elapsed = time.monotonic() - self.start
            # Largest budgets run first, so a plain count would overstate the time left.
            eta = "?" if finished == 0 else hms(elapsed / r.cost_done * (total_cost - r.cost_done))
            return (
                f"[instill] {done_before + r.done}/{done_before + total} done, {running} running, "
                f"{pending} pending, {r.failed} failed | elapsed {hms(elapsed)} | ETA {eta}"
            )

        def on_step_end(self, iteration, trials, **info):
            if time.monotonic() - self.last_print >= (1.0 if sys.stderr.isatty() else 30.0):
                self._print()

        def on_trial_complete(self, iteration, trials, trial, **info):
            # At most one line a second: a sweep of tiny trials finishes dozens a second.
            if time.monotonic() - self.last_print >= 1.0:
                self._print()

        on_trial_error = on_trial_complete

        def on_experiment_end(self, trials, **info):
            self._print(final=True)

        def _print(self, final: bool = False):
            self.last_print = time.monotonic()
            stream = sys.stderr  # looked up at print time: the Tuner pickles its callbacks
            tty = stream.isatty()
            stream.write(("\r\033[K" if tty else "") + self.line() + ("\n" if final or not tty else ""))
            stream.flush()

    rows = Rows()
    return rows, [rows, Progress(rows)]


class Group:
    """The trials of one Tune trial, as the driver follows them: which have sent their row, and
    which one is marked running in OUT."""

    def __init__(self, out_dir, sweep: SweepConfig, specs: list[dict]):
        self.out_dir, self.sweep = out_dir, sweep
        self.specs = [TrialSpec(**s) for s in specs]
        self.hashes: dict[int, str] = {}  # index -> trial hash, computed only where needed
        self.finished_hashes: set[str] = set()
        self.marked: int | None = None

    def hash(self, index: int) -> str:
        if index not in self.hashes:
            self.hashes[index] = trial_hash(self.sweep, self.specs[index])
        return self.hashes[index]

    def mark(self, index: int | None) -> None:
        """Mark trial `index` as the one running (None: none), unmarking the one marked before."""
        if index == self.marked:
            return
        if self.marked is not None:
            mark_running(self.out_dir, self.hash(self.marked), running=False)
        self.marked = index if index is not None and index < len(self.specs) else None
        if self.marked is not None:
            mark_running(self.out_dir, self.hash(self.marked))

    def finished(self, row: dict) -> None:
        self.finished_hashes.add(row["trial_hash"])

    def spec_of(self, row: dict) -> TrialSpec:
        return next(s for i, s in enumerate(self.specs) if self.hash(i) == row["trial_hash"])

    def unfinished(self) -> list[TrialSpec]:
        if len(self.finished_hashes) == len(self.specs):
            return []
        return [s for i, s in enumerate(self.specs) if self.hash(i) not in self.finished_hashes]


def forget_results(trial) -> None:
    """Drop what Tune keeps in memory about a finished trial's results (its last result and the
    statistics of every metric: the driver would grow with the grid), once its row is written.
    A patch of a Ray internal, written against Ray 2.60.0 (`Trial.run_metadata`, a
    `_TrainingRunMetadata`): no public API drops them. tests/orchestrator/test_ray_internals.py fails if it changes."""
    meta = getattr(trial, "run_metadata", None)
    if meta is None:  # a stand-in trial (tests)
        return
    last = meta.last_result or {}
    meta.last_result = {k: last[k] for k in ("stage", "trial_id", "training_iteration", "done") if k in last}
    meta.metric_analysis = {}
    meta.metric_n_steps = {}
    meta.invalidate_cache()


def error_text(trial) -> str:
    """Why a Tune trial ended in error: `orchestrator.worker_loss.WORKER_DIED` where its worker died,
    else the last line of its error file (a traceback's last line names the exception and its message)."""
    from ray import cloudpickle

    from orchestrator.worker_loss import death_message

    pickled = getattr(trial, "pickled_error_file", None)
    if pickled and os.path.exists(pickled):
        try:
            with open(pickled, "rb") as f:
                died = death_message(cloudpickle.load(f))
        except Exception:  # unreadable: the text below still tells
            died = None
        if died:
            return died
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text = Path(path).read_text().strip().splitlines()
        return text[-1] if text else "unknown error"
    return str(getattr(trial, "error_msg", None) or "unknown error")


def hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))
