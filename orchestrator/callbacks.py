"""Tune callbacks on the driver: rows written the moment a trial ends, and one live progress line.

Tune calls `on_step_end` with every trial it has created, once per event it handles (several per
trial): anything that scans that list costs O(trials) per step and O(trials^2) per sweep. The
callbacks here look only at the trials not yet finished (`LiveTrials`), and do the rest of their
bookkeeping per trial event, so a sweep of 10,000 trials costs 10 times one of 1,000.
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
from orchestrator.outdir import mark_running, write_row
from orchestrator.trial import TrialSpec, failed_row, trial_hash


def cost(spec: TrialSpec) -> float:
    """Relative cost of a trial for the ETA: training time grows with the budget; 0.1 stands for the
    fixed part (evaluation, set-up)."""
    return spec.data_fraction + 0.1


class LiveTrials:
    """The trials Tune has created that have not finished, from the list Tune passes each step.

    Tune's list only grows (new trials are appended), so each step reads the new tail and the trials
    still live: the work per step is bounded by the live and pending trials, not by the sweep.
    """

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
        """How many of `trials` are RUNNING (Tune's own states: with reused actors, a trial's
        start and end events do not always pair up)."""
        return sum(status == "RUNNING" for _, status in self.update(trials))


def make_callbacks(
    out_dir: Path,
    sweep: SweepConfig,
    todo: list[TrialSpec],
    done_before: int,
    stopping: Callable[[], bool] = lambda: False,
):
    """(the Rows callback, every callback to give Tune). Once `stopping()` is True (a graceful
    stop), a trial that ends without its final result is not a failure: it gets no row and resumes
    from its checkpoint in the next run."""
    from ray import tune

    total = len(todo)
    total_cost = sum(cost(s) for s in todo)

    class Rows(tune.Callback):
        """Writes each trial's row on the driver as soon as it finishes or finally fails."""

        def __init__(self):
            self.done = self.failed = self.running = self.interrupted = 0
            self.cost_done = 0.0
            self.live = LiveTrials()
            self.hashes: dict[str, str] = {}  # Tune trial id -> trial hash, while the trial runs

        def on_step_end(self, iteration, trials, **info):
            self.running = self.live.running(trials)

        def _hash(self, trial, spec: TrialSpec) -> str:
            # The identity hash builds the trial's effective config: once per trial, not per event.
            if trial.trial_id not in self.hashes:
                self.hashes[trial.trial_id] = trial_hash(sweep, spec)
            return self.hashes[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            # Marked when Tune starts it on an actor (new or reused), for `status`: not at its first
            # report, which buffered results (orchestrator.tuner) can hold back until the trial ends.
            mark_running(out_dir, self._hash(trial, TrialSpec(**trial.config["spec"])))

        def _finish(self, trial) -> TrialSpec:
            spec = TrialSpec(**trial.config["spec"])
            self.cost_done += cost(spec)
            mark_running(out_dir, self._hash(trial, spec), running=False)
            self.hashes.pop(trial.trial_id, None)
            return spec

        def on_trial_complete(self, iteration, trials, trial, **info):
            try:
                self._complete(trial)
            finally:
                forget_results(trial)

        def _complete(self, trial):
            spec = self._finish(trial)
            last = trial.last_result or {}
            if last.get("stage") == "interrupted" or (stopping() and last.get("stage") != "done"):
                self.interrupted += 1  # stopped on request after checkpointing: no row, resumed later
                return
            if last.get("stage") != "done":
                write_row(out_dir, failed_row(sweep, spec, "trial ended without a final result"))
                self.failed += 1
                return
            write_row(out_dir, json.loads(last["row_json"]))
            self.done += 1

        def on_trial_error(self, iteration, trials, trial, **info):
            try:
                self._error(trial)
            finally:
                forget_results(trial)

        def _error(self, trial):
            spec = self._finish(trial)
            if stopping():  # e.g. its worker got the signal too: resumed from its checkpoint next run
                self.interrupted += 1
                return
            write_row(out_dir, failed_row(sweep, spec, error_text(trial)))
            self.failed += 1

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
            now = time.monotonic()
            if now - self.last_print >= (1.0 if sys.stderr.isatty() else 30.0):
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
            end = "\n" if (final or not tty) else ""
            prefix = "\r\033[K" if tty else ""
            stream.write(prefix + self.line() + end)
            stream.flush()

    rows = Rows()
    return rows, [rows, Progress(rows)]


def forget_results(trial) -> None:
    """Drop what Tune keeps in memory about a finished trial's results, once its row is written.

    Tune holds every trial to the end of the experiment, with its last result (our final row, as
    JSON) and running statistics of every metric it reported (each epoch's keys): about 0.25 MB a
    trial, linear growth of the driver over a grid of thousands. Its logs on disk keep everything."""
    meta = getattr(trial, "run_metadata", None)
    if meta is None:
        return
    last = meta.last_result or {}
    meta.last_result = {k: last[k] for k in ("stage", "trial_id", "training_iteration", "done") if k in last}
    meta.metric_analysis = {}
    meta.metric_n_steps = {}
    meta.invalidate_cache()


def error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text = Path(path).read_text().strip().splitlines()
        # The last line of a traceback names the exception and its message.
        return text[-1] if text else "unknown error"
    return str(getattr(trial, "error_msg", None) or "unknown error")


def hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))
