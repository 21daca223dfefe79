"""Nothing the driver does per trial may grow with the number of trials (benchmarks/grid_scale.py
measures the whole sweep). Checked by counting operations at n and 4n trials, not by timing."""

from __future__ import annotations

import itertools
from collections import deque
from types import SimpleNamespace

import pytest

import orchestrator.ordering as ordering
from orchestrator.callbacks import LiveTrials
from orchestrator.ordering import order_trials
from orchestrator.trial import expand, upstream_keys

# --- order_trials ---------------------------------------------------------------------------


class CountingDeque(deque):
    pops = 0

    def popleft(self):
        CountingDeque.pops += 1
        return super().popleft()


def fake_specs(n: int, artifacts: int) -> list[SimpleNamespace]:
    """n trials over 10 budgets; trial i needs artifact i % artifacts (like a source per seed)."""
    return [
        SimpleNamespace(name=f"t{i}", data_fraction=(i % 10 + 1) / 10, keys=[("source", f"k{i % artifacts}")])
        for i in range(n)
    ]


def queue_reads(monkeypatch, n: int, artifacts: int, concurrency: int) -> int:
    monkeypatch.setattr(ordering, "deque", CountingDeque)
    monkeypatch.setattr(ordering, "upstream_keys", lambda sweep, spec: spec.keys)
    CountingDeque.pops = 0
    ordered = order_trials(None, fake_specs(n, artifacts), concurrency)
    assert sorted(s.name for s in ordered) == sorted(f"t{i}" for i in range(n))
    return CountingDeque.pops


@pytest.mark.parametrize("artifacts,concurrency", [(2, 16), (50, 8), (1, 1), (500, 4)])
def test_ordering_reads_each_trial_a_bounded_number_of_times(monkeypatch, artifacts, concurrency):
    small, large = (queue_reads(monkeypatch, n, artifacts, concurrency) for n in (1000, 4000))
    # A trial is passed over at most once per artifact it needs (one here): at most 2 reads each.
    assert 1000 <= small <= 2 * 1000 and 4000 <= large <= 2 * 4000
    assert large <= 4.5 * small


def test_ordering_keeps_its_properties(tiny):
    methods = ["subtask_induction", "scratch"]
    sweep = tiny(methods=methods, sparsities=[0.5, 0.9], seeds=[0, 1, 2], data_fractions=[0.25, 0.5, 1.0])
    specs = expand(sweep)
    ordered = order_trials(sweep, specs, concurrency=3)
    assert sorted(s.name for s in ordered) == sorted(s.name for s in specs)  # a permutation
    assert ordered == order_trials(sweep, specs, concurrency=3)  # deterministic
    # The first wave: no two trials need the same artifact (three seeds, three sources).
    first = [set(upstream_keys(sweep, s)) for s in ordered[:3]]
    assert all(not (a & b) for a, b in itertools.combinations(first, 2))
    # Largest budget first among trials that need nothing (scratch).
    scratch = [s.data_fraction for s in ordered if s.method == "scratch"]
    assert scratch == sorted(scratch, reverse=True)


def test_ordering_without_shared_artifacts_is_largest_budget_first(monkeypatch):
    monkeypatch.setattr(ordering, "upstream_keys", lambda sweep, spec: spec.keys)
    specs = fake_specs(100, artifacts=100)
    ordered = order_trials(None, specs, concurrency=4)
    assert [s.data_fraction for s in ordered] == sorted((s.data_fraction for s in specs), reverse=True)
    # Equal budgets keep their input order (a stable sort).
    assert [s.name for s in ordered if s.data_fraction == 1.0] == [s.name for s in specs if s.data_fraction == 1.0]


# --- the callbacks' bookkeeping -------------------------------------------------------------


class FakeTrial:
    reads = 0

    def __init__(self):
        self._status = "PENDING"

    @property
    def status(self):
        FakeTrial.reads += 1
        return self._status


def simulate(n: int, concurrency: int = 2, steps_per_trial: int = 6):
    """Tune's list of trials as it grows: a trial is created when a slot frees up, runs for
    `steps_per_trial` steps, then terminates. Returns (status reads, running count at each step,
    the naive count at each step)."""
    FakeTrial.reads = 0
    live, trials, left = LiveTrials(), [], {}
    counted, naive = [], []
    while len(trials) < n or any(t._status == "RUNNING" for t in trials[-concurrency:]):
        running = [t for t in trials[-concurrency:] if t._status == "RUNNING"]
        if len(running) < concurrency and len(trials) < n:
            trial = FakeTrial()
            trial._status = "RUNNING"
            trials.append(trial)
            left[id(trial)] = steps_per_trial
        for t in trials[-concurrency:]:
            if t._status == "RUNNING":
                left[id(t)] -= 1
                if left[id(t)] == 0:
                    t._status = "TERMINATED"
        counted.append(live.running(trials))
        naive.append(sum(t._status == "RUNNING" for t in trials))
    return FakeTrial.reads, counted, naive


def test_running_count_matches_tunes_states():
    _, counted, naive = simulate(200)
    assert counted == naive


def test_running_count_reads_only_live_trials():
    small, _, _ = simulate(1000)
    large, _, _ = simulate(4000)
    assert large <= 4.5 * small
    # Each trial is read while it is live (its steps) and once more: not once per step of the sweep.
    assert large <= 4000 * (6 + 2)


def test_running_count_starts_over_on_a_new_list():
    live = LiveTrials()
    trials = [FakeTrial() for _ in range(3)]
    for t in trials:
        t._status = "RUNNING"
    assert live.running(trials) == 3
    assert live.running(trials[:1]) == 1
