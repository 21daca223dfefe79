"""The trial queue Tune draws from: our trials in order, in groups, until done or stopped.

A Tune `Searcher` rather than a `grid_search`: Tune holds no search space of thousands of
configurations, creates each Tune trial only when it can start it, and launches nothing once the
sweep is stopping. Each Tune trial runs a *group* of our trials (`orchestrator.worker`), paying
Tune's per-trial overhead once per group. `resources.group: auto` sizes groups from the compute time
finished trials report: about `GROUP_TARGET_S` seconds each, leaving at least `GROUPS_PER_SLOT`
groups per slot; `resources.group: N` groups N trials.

Retries are decided here and nowhere else: the driver hands back failed trials and the unfinished
trials of a lost worker (`requeue`); each goes out again, first, at most `retries` times.
FINISHED comes only once every trial is handed out and no group is live.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from ray.tune.search import Searcher

from orchestrator.ordering import cost
from orchestrator.trial import TrialSpec

GROUP_TARGET_S = 4.0  # compute per group under `auto`: Tune's per-trial cost is then a few per cent
GROUPS_PER_SLOT = 4  # under `auto`, groups per slot that must remain for the rest of the sweep
MAX_GROUP = 1000  # trials per group at most (the group's config travels with its Tune trial)


class TrialQueue(Searcher):
    """Hands out `specs` in order, in groups sized by `group` ('auto' or a number of trials), as
    Tune trial configs (`members` reads them); FINISHED when all are handed out or `should_stop()`.
    Trials with the same `pack_keys` entry (not None) go out together as one group of up to `pack`
    trials, whatever `group` says: they train as one packed model (`orchestrator.trial.run_pack`)."""

    def __init__(
        self,
        specs: list[TrialSpec],
        group: int | str = "auto",
        concurrency: int = 1,
        should_stop: Callable[[], bool] = lambda: False,
        pack_keys: list[Hashable | None] | None = None,
        pack: int = 1,
        retries: int = 0,
    ):
        super().__init__()
        self.specs = [s.model_dump() for s in specs]
        self.index = {_key(s): i for i, s in enumerate(self.specs)}
        self.retries = retries
        self.requeued = [0] * len(specs)
        self.live: set[str] = set()  # Tune trial ids handed a group and not yet complete
        self.costs = [cost(s) for s in specs]
        self.cost_left = sum(self.costs)
        self.group, self.concurrency = group, max(1, concurrency)
        self.should_stop = should_stop
        self.compute_s = self.cost_done = 0.0  # reported by finished trials, for `auto`
        self.keys = pack_keys if pack_keys is not None and pack > 1 else [None] * len(specs)
        self.pack = pack
        self.buckets: dict[Hashable, deque[int]] = {}
        for i, key in enumerate(self.keys):
            if key is not None:
                self.buckets.setdefault(key, deque()).append(i)
        self.taken = [False] * len(specs)
        self.returned: deque[list[int]] = deque()  # groups handed back, to go out again first
        self.next = 0  # no trial before it is left

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        while self.next < len(self.specs) and self.taken[self.next]:
            self.next += 1
        if self.should_stop():
            return Searcher.FINISHED
        if self.returned:
            chosen = self.returned.popleft()
        elif self.next >= len(self.specs):
            # Tune asks no more once told FINISHED: wait while a live group may hand trials back.
            return None if self.live else Searcher.FINISHED
        else:
            chosen = self._pack(self.keys[self.next]) if self.keys[self.next] is not None else self._group()
            for i in chosen:
                self.taken[i] = True
                self.cost_left -= self.costs[i]
        self.live.add(trial_id)
        members = [self.specs[i] for i in chosen]
        return {"spec": members[0]} if len(members) == 1 else {"specs": members}

    def requeue(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hand `specs` (failed, or of a group whose worker was lost) out again, each at most
        `retries` times in all. Returns those that are not: their tries are spent."""
        spent, back = [], []
        for spec in specs:
            i = self.index.get(_key(spec))
            if i is None or self.requeued[i] >= self.retries:
                spent.append(spec)
            else:
                self.requeued[i] += 1
                back.append(i)
        if back:
            self.returned.append(back)
        return spent

    def _pack(self, key: Hashable) -> list[int]:
        bucket = self.buckets[key]
        chosen = []
        while bucket and len(chosen) < self.pack:
            i = bucket.popleft()
            if not self.taken[i]:
                chosen.append(i)
        return chosen

    def _group(self) -> list[int]:
        """The next trials in order (not packable ones), as many as `group_size` allows."""
        budget = self.group_budget()
        chosen, total, i = [], 0.0, self.next
        while i < len(self.specs) and len(chosen) < MAX_GROUP:
            if not self.taken[i]:
                if self.keys[i] is not None and chosen:
                    break  # a packable trial starts its own pack
                full = len(chosen) >= int(self.group) if budget is None else total + self.costs[i] > budget
                if chosen and full:
                    break
                chosen.append(i)
                total += self.costs[i]
            i += 1
        return chosen

    def group_budget(self) -> float | None:
        """The most cost a group may hold under `auto` (None: a fixed number of trials, `group`)."""
        if self.group != "auto":
            return None
        if self.cost_done <= 0:  # nothing measured yet: trials alone
            return 0.0
        seconds_per_cost = self.compute_s / self.cost_done
        target = GROUP_TARGET_S / max(seconds_per_cost, 1e-9)
        return min(target, self.cost_left / (self.concurrency * GROUPS_PER_SLOT))

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # The worker's row batches carry the compute time and cost of the trials they hold.
        if result.get("rows_cost"):
            self.compute_s += float(result.get("rows_compute_s", 0.0))
            self.cost_done += float(result["rows_cost"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its Tuner: leave out the driver's stop flag, which holds threads and locks.
        return {**self.__dict__, "should_stop": _never}

    # Our resume is by rows (a new run skips finished trials), not by Tune's experiment state.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            f.write(f"{self.next}\n")

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.next = int(f.read().strip() or 0)


def _key(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def members(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The trials (spec dicts) of a Tune trial's config: `{"spec": ...}` for a trial alone (Tune and
    the trackers show its grid point as parameters), `{"specs": [...]}` for a group."""
    return [config["spec"]] if "spec" in config else list(config["specs"])


def _never() -> bool:
    return False
