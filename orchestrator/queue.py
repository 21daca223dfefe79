"""The trial queue Tune draws from: our trials in order, in groups, until done or stopped.

A Tune `Searcher` rather than a `grid_search` over every trial: Tune holds no search space of
thousands of configurations in its experiment state, creates each Tune trial only when it can
start it, and launches nothing more once the sweep is asked to stop (`should_stop`).

Each Tune trial runs a *group* of our trials, one after another in one worker
(`orchestrator.worker`), each still writing its own row as it ends. A Tune trial costs its slot
some 60-130 ms beyond its compute (a placement group, an actor reset, trial directories, loggers:
docs/PERFORMANCE.md, "Grid scale"), which is nothing next to a trial of minutes and doubles the
wall time of a grid of 50 ms trials. `resources.group: auto` (the default) sizes groups from the
compute time the finished trials report: one trial per group until the first rows arrive, then as
many trials as make about `GROUP_TARGET_S` seconds of compute, never so many that fewer than
`GROUPS_PER_SLOT` groups per slot would be left (the sweep's tail stays balanced). A trial that
takes longer than `GROUP_TARGET_S` runs alone, as without groups. `resources.group: N` groups N
trials; 1 gives every trial its own Tune trial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher

from orchestrator.ordering import cost
from orchestrator.trial import TrialSpec

GROUP_TARGET_S = 4.0  # compute per group under `auto`: Tune's per-trial cost is then a few per cent
GROUPS_PER_SLOT = 4  # under `auto`, groups per slot that must remain for the rest of the sweep
MAX_GROUP = 1000  # trials per group at most (the group's config travels with its Tune trial)


class TrialQueue(Searcher):
    """Hands out `specs` in order, in groups sized by `group` ('auto' or a number of trials), as
    Tune trial configs (`members` reads them); FINISHED when all are handed out or `should_stop()`
    is True."""

    def __init__(
        self,
        specs: list[TrialSpec],
        group: int | str = "auto",
        concurrency: int = 1,
        should_stop: Callable[[], bool] = lambda: False,
    ):
        super().__init__()
        self.specs = [s.model_dump() for s in specs]
        self.costs = [cost(s) for s in specs]
        self.cost_left = sum(self.costs)
        self.group, self.concurrency = group, max(1, concurrency)
        self.next = 0
        self.should_stop = should_stop
        self.compute_s = self.cost_done = 0.0  # reported by finished trials, for `auto`

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.should_stop() or self.next >= len(self.specs):
            return Searcher.FINISHED
        end = self.next + self.group_size()
        chosen = self.specs[self.next : end]
        self.cost_left -= sum(self.costs[self.next : end])
        self.next = end
        return {"spec": chosen[0]} if len(chosen) == 1 else {"specs": chosen}

    def group_size(self) -> int:
        """How many of the next trials form the next group."""
        if self.group != "auto":
            return int(self.group)
        if self.cost_done <= 0:  # nothing measured yet
            return 1
        seconds_per_cost = self.compute_s / self.cost_done
        budget = min(
            GROUP_TARGET_S / max(seconds_per_cost, 1e-9), self.cost_left / (self.concurrency * GROUPS_PER_SLOT)
        )
        size, total = 0, 0.0
        while self.next + size < len(self.specs) and size < MAX_GROUP:
            total += self.costs[self.next + size]
            if size > 0 and total > budget:
                break
            size += 1
        return max(1, size)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # The worker's row batches carry the compute time and cost of the trials they hold.
        if result.get("rows_cost"):
            self.compute_s += float(result.get("rows_compute_s", 0.0))
            self.cost_done += float(result["rows_cost"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its Tuner (for Tuner.restore, which we do not use): leave out the driver's
        # stop flag, which holds threads and locks.
        state = dict(self.__dict__)
        state["should_stop"] = _never
        return state

    # Our resume is by rows (a new run skips finished trials), not by Tune's experiment state.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            f.write(f"{self.next}\n")

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.next = int(f.read().strip() or 0)


def members(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials (spec dicts) of a Tune trial's config: `{"spec": ...}` for a trial alone (Tune
    and the trackers show its grid point as parameters, `spec/method`, ...), `{"specs": [...]}` for
    a group."""
    return [config["spec"]] if "spec" in config else list(config["specs"])


def _never() -> bool:
    return False
