"""One discovery run serves several sparsities (`discover_many`, the mask kind's `compute_many`).

Training never reads the sparsity, so each sparsity's result from a shared run must be bit for bit
that of a run for it alone: mask, subtask accuracy, kept epoch, history and natural density. A
shared run stopped at every epoch end resumes to the same results, and a sweep's upstream phase
merges the mask jobs of one source and discovery setting into one run.
"""

from __future__ import annotations

import copy

import pytest
import torch

from methods import ARTIFACTS
from methods.discovery import DiscoveryConfig, discover, discover_many
from methods.training import Interrupted, Supervision, supervised
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import Upstream, expand, pick_device, run_trial
from orchestrator.upstream import _shared_runs
from tests.conftest import tiny_raw
from tests.methods.test_core_behaviour import _gen, subtask_data, trained_source
from tests.orchestrator.test_checkpoints import MemoryCheckpointer, stable

SPARSITIES = (0.5, 0.8, 0.95)
CASES = {
    "continuous_sparsification": DiscoveryConfig(epochs=6, batch_size=50, lr=1e-2),
    "continuous_sparsification_ties_last": DiscoveryConfig(epochs=6, batch_size=50, lr=1e-2, ties="last"),
    "hard_concrete": DiscoveryConfig(method="hard_concrete", epochs=6, batch_size=50, lr=0.1),
    "magnitude": DiscoveryConfig(method="magnitude"),
}


def _same(shared, alone):
    assert shared.history == alone.history
    assert shared.best_epoch == alone.best_epoch
    assert shared.subtask_acc == alone.subtask_acc
    assert shared.density == alone.density and shared.natural_density == alone.natural_density
    assert sorted(shared.mask) == sorted(alone.mask)
    for name in alone.mask:
        assert torch.equal(shared.mask[name], alone.mask[name]), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_shared_run_gives_each_sparsity_its_own_runs_result(case):
    cfg, source, data = CASES[case], trained_source(), subtask_data()
    shared = discover_many(copy.deepcopy(source), data, cfg, SPARSITIES, _gen(5))
    alone = [discover(copy.deepcopy(source), data, cfg, s, _gen(5)) for s in SPARSITIES]
    for one, other in zip(shared, alone, strict=True):
        _same(one, other)
    if cfg.method != "magnitude":
        # not a trivial case: the sparsities see different accuracies, and at least one varies by epoch
        assert len({tuple(one.history) for one in shared}) == len(SPARSITIES)
        assert any(len(set(one.history)) > 1 for one in shared)


def test_the_order_of_the_sparsities_does_not_matter():
    cfg, source, data = CASES["continuous_sparsification"], trained_source(), subtask_data()
    forward = discover_many(copy.deepcopy(source), data, cfg, SPARSITIES, _gen(5))
    backward = discover_many(copy.deepcopy(source), data, cfg, SPARSITIES[::-1], _gen(5))
    for one, other in zip(forward, backward[::-1], strict=True):
        _same(one, other)


def test_repeated_or_no_sparsities_are_refused():
    cfg, source, data = CASES["magnitude"], trained_source(), subtask_data()
    for bad in [(), (0.5, 0.5)]:
        with pytest.raises(ValueError, match="distinct sparsities"):
            discover_many(copy.deepcopy(source), data, cfg, bad, _gen(5))


def test_a_shared_run_stopped_at_every_epoch_end_resumes_bit_for_bit():
    cfg, source, data = CASES["continuous_sparsification_ties_last"], trained_source(), subtask_data()
    reference = discover_many(copy.deepcopy(source), data, cfg, SPARSITIES, _gen(5))
    checkpointer, stops, result = MemoryCheckpointer(), 0, None
    while result is None:
        assert stops <= cfg.epochs, "the run never finished"
        try:
            with supervised(Supervision(checkpointer=checkpointer, should_stop=lambda: True)):
                result = discover_many(copy.deepcopy(source), data, cfg, SPARSITIES, _gen(5))
        except Interrupted:
            stops += 1
    assert stops == cfg.epochs - 1  # one epoch per attempt; the last one finishes, no stop
    for one, other in zip(result, reference, strict=True):
        _same(one, other)


# --- the mask kind and the upstream phase ------------------------------------------------------


POINTS = [{"mask.sparsity": s} for s in (0.5, 0.8, 0.9)]  # every point of `_sweep`'s mask axis


def _sweep(**overrides):
    raw = {"methods": ["subtask_induction"], "sparsities": [0.5, 0.8, 0.9], "seeds": [0, 1], **overrides}
    return load_sweep(tiny_raw(**raw))


def test_the_upstream_phase_merges_the_mask_jobs_of_one_source():
    sweep = _sweep()
    jobs = {}
    for spec in expand(sweep):
        up = Upstream(sweep, spec, None, pick_device(sweep))
        for kind in ("source", "mask"):
            jobs.setdefault((kind, str(up.key(kind))), {"kind": kind, "spec": spec, "key": up.key(kind), "deps": []})
    runs = _shared_runs(list(jobs.values()))
    masks = [run for run in runs if run["kind"] == "mask"]
    assert len(masks) == 2, "one discovery run per seed"
    for run in masks:
        assert sorted(p["mask.sparsity"] for p in run["points"]) == [0.5, 0.8, 0.9]
        assert [m["reads"]["mask"]["sparsity"] for m in run["members"]] == [p["mask.sparsity"] for p in run["points"]]
        assert len({m["source"]["seed"] for m in run["members"]}) == 1
    sources = [run for run in runs if run["kind"] == "source"]
    assert len(sources) == 2 and all(run["points"] is None and len(run["members"]) == 1 for run in sources)


def test_masks_stored_from_a_shared_run_equal_masks_computed_one_by_one(tmp_path):
    sweep = _sweep(seeds=[0])
    specs = expand(sweep)
    shared, alone = ArtifactStore(tmp_path / "shared"), ArtifactStore(tmp_path / "alone")
    device = pick_device(sweep)
    Upstream(sweep, specs[0], shared, device).compute_shared("mask", POINTS)
    entries = shared.entries("mask")
    assert len(entries) == 3 and all(meta["computed_with"] == 3 for _, meta, _ in entries)
    assert [c["kind"] for c in shared.computations()] == ["source", "mask", "mask", "mask"]
    for spec in specs:
        up = Upstream(sweep, spec, alone, device)
        key = up.key("mask")
        one_by_one = alone.get_or_compute("mask", key, lambda up=up: ARTIFACTS.get("mask").compute(up.context("mask")))
        assert one_by_one.computed
        tensors, meta = shared.load("mask", key)
        assert sorted(tensors) == sorted(one_by_one.tensors)
        for name in tensors:
            assert torch.equal(tensors[name], one_by_one.tensors[name]), name
        for field in ("subtask_acc", "density", "natural_density", "best_epoch", "history"):
            assert meta[field] == one_by_one.meta[field], field
    # The trials find their masks stored, and their rows equal those of trials on the masks computed alone.
    for spec in specs:
        row, reference = run_trial(sweep, spec, shared), run_trial(sweep, spec, alone)
        assert row["mask_computed"] is False
        assert stable(row) == stable(reference)


def test_a_partly_stored_group_computes_only_what_is_missing(tmp_path):
    sweep = _sweep(seeds=[0])
    specs = expand(sweep)
    store = ArtifactStore(tmp_path)
    device = pick_device(sweep)
    run_trial(sweep, next(s for s in specs if s.axes["mask.sparsity"] == 0.8), store)  # stores the 0.8 mask alone
    Upstream(sweep, specs[0], store, device).compute_shared("mask", POINTS)
    masks = [c for c in store.computations() if c["kind"] == "mask"]
    assert len(masks) == 3, "the stored mask is not computed again"
    widths = sorted(meta.get("computed_with", 1) for _, meta, _ in store.entries("mask"))
    assert widths == [1, 2, 2]
