"""Axes that artifact kinds declare: config paths of a kind's blocks that are grid axes of every
trial needing it (`axes=`), the paths one computation serves at once (`shares=`), and a sweep-file
shorthand for their values (`shorthand=`). The mask's `mask.sparsity` (`sparsities:`) is one such
axis; a plug-in kind (tests/plugins/wide_guide.py, `wide_guide.width`, `widths:`) declares its own
the same way and runs with no change to the orchestrator."""

import pytest
import torch

from common.config import stable_hash
from methods import ARTIFACTS
from methods.artifacts import ArtifactKind, register_artifact
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import Upstream, expand, identity, run_trial, trial_hash, trial_needs
from orchestrator.upstream import _shared_runs
from tests.conftest import tiny_raw

CPU = torch.device("cpu")
PLUGIN = "tests.plugins.wide_guide"


def _sweep(**overrides):
    raw = {"plugins": [PLUGIN], "methods": ["uses_wide_guide", "scratch"], "widths": [4, 8, 16], "seeds": [0, 1]}
    return load_sweep(tiny_raw(**{**raw, **overrides}))


def _without(raw: dict, key: str) -> dict:
    return {k: v for k, v in raw.items() if k != key}


def _trials(sweep) -> list[tuple[str, str]]:
    return [(spec.name, trial_hash(sweep, spec)) for spec in expand(sweep)]


def test_a_plug_in_kind_puts_the_trials_that_need_it_on_its_axis():
    sweep = _sweep()
    specs = expand(sweep)
    guided = [s for s in specs if s.method == "uses_wide_guide"]
    assert sorted(s.axes["wide_guide.width"] for s in guided) == [4, 4, 8, 8, 16, 16]
    scratch = [s for s in specs if s.method == "scratch"]
    assert len(scratch) == 2 and all(s.axes == {} for s in scratch), "once per budget and seed, not per width"
    assert "uses_wide_guide-wide_guide.width=16-f0.5-seed1" in {s.name for s in specs}
    assert identity(sweep, guided[0])["wide_guide"] == {"width": guided[0].axes["wide_guide.width"], "scale": 1.0}
    # Not listed, the axis has one value, its block's: the trials still carry it (a row column, their name).
    single = load_sweep(tiny_raw(plugins=[PLUGIN], methods=["uses_wide_guide"], wide_guide={"width": 5}))
    assert single.axes["wide_guide.width"] == (5,)
    assert [s.axes for s in expand(single)] == [{"wide_guide.width": 5}]


def test_a_shorthand_and_the_axis_it_stands_for_give_the_same_trials():
    short = load_sweep(tiny_raw(methods=["subtask_induction", "scratch"], sparsities=[0.5, 0.9]))
    raw = _without(tiny_raw(methods=["subtask_induction", "scratch"]), "sparsities")
    explicit = load_sweep({**raw, "axes": {"mask.sparsity": [0.5, 0.9]}})
    assert short.canonical() == explicit.canonical()
    assert _trials(short) == _trials(explicit) and len(_trials(short)) == 3
    # One value: the shorthand, the axis and the block's own value are the same trials.
    one = [
        load_sweep({**raw, "sparsities": [0.6]}),
        load_sweep({**raw, "axes": {"mask.sparsity": [0.6]}}),
        load_sweep({**raw, "mask": {"sparsity": 0.6}}),
    ]
    assert _trials(one[0]) == _trials(one[1]) == _trials(one[2])
    # A plug-in kind's shorthand works the same way.
    widths = _sweep()
    axis = load_sweep({**_without(tiny_raw(plugins=[PLUGIN], methods=["uses_wide_guide", "scratch"]), "widths"),
                       "seeds": [0, 1], "axes": {"wide_guide.width": [4, 8, 16]}})  # fmt: skip
    assert _trials(widths) == _trials(axis)


def test_one_computation_serves_every_width_and_each_is_stored_on_its_own(tmp_path):
    sweep = _sweep()
    jobs = {}
    for spec in expand(sweep):
        up = Upstream(sweep, spec, None, CPU)
        for kind in trial_needs(sweep, spec):
            key = up.key(kind)
            jobs.setdefault((kind, stable_hash(key)), {"kind": kind, "spec": spec, "key": key, "deps": []})
    runs = [run for run in _shared_runs(list(jobs.values())) if run["kind"] == "wide_guide"]
    assert len(runs) == 2, "one run per source (seed)"
    assert all(sorted(p["wide_guide.width"] for p in run["points"]) == [4, 8, 16] for run in runs)
    store = ArtifactStore(tmp_path)
    for run in runs:
        Upstream(sweep, run["spec"], store, CPU).compute_shared("wide_guide", run["points"])
    entries = store.entries("wide_guide")
    assert len(entries) == 6 and all(meta["served"] == meta["computed_with"] == 3 for _, meta, _ in entries)
    for spec in expand(sweep):
        if spec.method == "uses_wide_guide" and spec.seed == 0:
            row = run_trial(sweep, spec, store)
            assert row["wide_guide_computed"] is False, "each trial loads its own width's artifact"
            assert row["wide_guide_width"] == row["wide_guide.width"] == spec.axes["wide_guide.width"]


def test_a_kind_declares_axes_only_on_blocks_it_reads_and_shares_only_what_is_its_own():
    class Probe(ArtifactKind):
        pass

    cases = [
        ({"needs": ("source",), "axes": ("model.width",)}, "must be paths of the blocks it reads"),
        ({"needs": ("source",), "blocks": ("discovery",), "shares": ("discovery.lr",)}, "must name its axes"),
        ({"blocks": ("discovery",), "axes": ("discovery.lr",), "shorthand": {"lrs": "discovery.epochs"}}, "its axes"),
        ({"needs": ("source",), "blocks": ("source",), "axes": ("source.lr",), "shares": ("source.lr",)},
         "a kind it needs reads that block"),
    ]  # fmt: skip
    for declared, message in cases:
        with pytest.raises(ValueError, match=message):
            register_artifact("bad_axes_probe", **declared)(Probe)
        assert "bad_axes_probe" not in ARTIFACTS


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from orchestrator.sweep import start_ray

    ray.shutdown()
    start_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_plug_in_axis_runs_in_a_sweep_on_ray(ray_local, tmp_path):
    from orchestrator.sweep import run_sweep

    sweep = _sweep(seeds=[0])
    outcome = run_sweep(sweep, tmp_path / "out")
    assert outcome.failed == 0 and outcome.ran == 4
    table = outcome.table.set_index("trial")
    guided = table[table["method"] == "uses_wide_guide"]
    assert sorted(guided["wide_guide.width"]) == [4, 8, 16] and table.loc["scratch-f0.5-seed0", "status"] == "done"
    assert (guided["wide_guide_served"] == 3).all(), "the upstream phase computed every width in one run"
    assert not guided["wide_guide_computed"].any()
    entries = ArtifactStore(tmp_path / "out" / "artifacts").entries("wide_guide")
    assert sorted(meta["width"] for _, meta, _ in entries) == [4, 8, 16]
