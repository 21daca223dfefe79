"""The trial queue Tune draws from: our trials in order, one at a time, until done or stopped.

A Tune `Searcher` rather than a `grid_search` over every trial: Tune holds no search space of
thousands of configurations in its experiment state, creates each trial only when it can start it,
and launches nothing more once the sweep is asked to stop (`should_stop`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher


class TrialQueue(Searcher):
    """Hands out `configs` in order; FINISHED when all are handed out or `should_stop()` is True."""

    def __init__(self, configs: list[dict[str, Any]], should_stop: Callable[[], bool] = lambda: False):
        super().__init__()
        self.configs = configs
        self.next = 0
        self.should_stop = should_stop

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.should_stop() or self.next >= len(self.configs):
            return Searcher.FINISHED
        config = self.configs[self.next]
        self.next += 1
        return config

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


def _never() -> bool:
    return False
