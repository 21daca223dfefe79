"""The order in which a sweep's trials are handed to Tune."""

from __future__ import annotations

from orchestrator.config import SweepConfig
from orchestrator.trial import TrialSpec, upstream_keys


def order_trials(sweep: SweepConfig, specs: list[TrialSpec], concurrency: int) -> list[TrialSpec]:
    """Order trials so that trials running side by side rarely need the same missing artifact.

    Trials are taken largest budget first (the long ones start early, so the sweep's tail is
    short), then arranged in waves of `concurrency` where no two trials of a wave would compute
    the same upstream artifact: the second would only wait on the first's lock.
    """
    pending = sorted(specs, key=lambda s: -s.data_fraction)
    needs = {id(s): set(upstream_keys(sweep, s)) for s in pending}
    ready: set[tuple[str, str]] = set()
    ordered: list[TrialSpec] = []
    while pending:
        wave, claimed = [], set()
        for spec in pending:
            missing = needs[id(spec)] - ready
            if missing & claimed:
                continue
            wave.append(spec)
            claimed |= missing
            if len(wave) == concurrency:
                break
        for spec in wave:
            pending.remove(spec)
        ordered += wave
        ready |= claimed
    return ordered
