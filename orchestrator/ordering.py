"""The order in which a sweep's trials are handed to Tune."""

from __future__ import annotations

from collections import deque

from orchestrator.config import SweepConfig
from orchestrator.trial import TrialSpec, upstream_keys

COST_FIXED = 0.1  # the part of a trial's cost that does not grow with its budget (evaluation, set-up)


def cost(spec: TrialSpec) -> float:
    """Relative cost of a trial (for the ETA and trial groups): training time grows with the budget."""
    return budget_cost(spec.data_fraction)


def budget_cost(data_fraction: float) -> float:
    """`cost` of a trial with this data fraction (e.g. read from its row)."""
    return data_fraction + COST_FIXED


def order_trials(sweep: SweepConfig, specs: list[TrialSpec], concurrency: int) -> list[TrialSpec]:
    """Order trials so that trials running side by side rarely need the same missing artifact:
    largest budget first (a short tail), in waves of `concurrency` where no two trials would compute
    the same upstream artifact. A trial left out of a wave keeps its place at the head of the queue;
    it is passed over at most once per artifact it needs, so the order is linear in the trials."""
    pending = deque(sorted(specs, key=lambda s: -s.data_fraction))
    needs = {id(s): frozenset(upstream_keys(sweep, s)) for s in pending}
    ready: set[tuple[str, str]] = set()
    ordered: list[TrialSpec] = []
    while pending:
        wave, claimed, passed_over = [], set(), []
        while pending and len(wave) < max(1, concurrency):
            spec = pending.popleft()
            missing = needs[id(spec)] - ready
            if missing & claimed:
                passed_over.append(spec)
                continue
            wave.append(spec)
            claimed |= missing
        pending.extendleft(reversed(passed_over))
        ordered += wave
        ready |= claimed
    return ordered
