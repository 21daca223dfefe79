"""Source models of several seeds trained as one pack (`ArtifactKind.packs_seeds`, `resources.pack_upstream`).

A packed source is a function of its own seed and settings: computed in a pack of three, of two or
alone (a pack of one) it is bit for bit the same on CPU, and within float rounding of the serial
source. Its key says `packed`, so a store never hands a serial source to a sweep that packs, nor the
other way round. The upstream phase splits a sweep's sources into one pack per slot.
"""

from __future__ import annotations

import pytest
import torch

from methods import ARTIFACTS
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import Upstream, expand, pick_device
from orchestrator.trial.grid import packs_upstream
from orchestrator.upstream import _shared_runs
from tests.conftest import tiny_raw


def _sweep(**overrides):
    raw = {"methods": ["subtask_induction"], "seeds": [0, 1, 2], "resources": {"pack_upstream": True}, **overrides}
    return load_sweep(tiny_raw(**raw))


def _source(sweep, seed: int):
    return next(s for s in expand(sweep) if s.seed == seed)


@pytest.mark.parametrize(
    "resources, packs",
    [
        ({"pack": 1, "pack_upstream": True}, False),  # trials do not pack: nor does upstream work
        ({"pack_upstream": False}, False),
        ({}, False),  # off by default
        ({"gpu": 0.5}, False),  # GPU or not
        ({"pack_upstream": True}, True),
        ({"pack": 4, "pack_upstream": True}, True),
    ],
)
def test_when_upstream_work_packs(resources, packs):
    sweep = load_sweep(tiny_raw(resources=resources))
    assert packs_upstream(sweep) is packs
    key = Upstream(sweep, expand(sweep)[0], None, torch.device("cpu")).key("source")
    assert key.get("packed", False) is packs


def test_the_key_says_packed_and_the_serial_key_is_unchanged():
    packed, serial = _sweep(), _sweep(resources={"pack_upstream": False})
    spec = expand(serial)[0]
    up_packed = Upstream(packed, spec, None, torch.device("cpu"))
    up_serial = Upstream(serial, spec, None, torch.device("cpu"))
    assert up_packed.key("source") == {**up_serial.key("source"), "packed": True}
    assert "packed" not in up_serial.key("source")
    assert up_packed.key("mask")["source"]["packed"] is True  # masks of a packed source are its own


@pytest.mark.parametrize("slots, limit, sizes", [(2, 16, [2, 1]), (1, 16, [3]), (4, 16, [1, 1, 1]), (1, 2, [2, 1])])
def test_the_upstream_phase_packs_the_sources_one_pack_per_slot(slots, limit, sizes):
    sweep = _sweep()
    jobs = {}
    for spec in expand(sweep):
        up = Upstream(sweep, spec, None, pick_device(sweep))
        for kind in ("source", "mask"):
            jobs.setdefault((kind, str(up.key(kind))), {"kind": kind, "spec": spec, "key": up.key(kind), "deps": []})
    runs = _shared_runs(list(jobs.values()), slots=slots, limit=limit)
    sources = [run for run in runs if run["kind"] == "source"]
    assert [len(run["members"]) for run in sources] == sizes
    assert sorted(p["seed"] for run in sources for p in run["points"]) == [0, 1, 2]
    for run in sources:
        assert [m["seed"] for m in run["members"]] == [p["seed"] for p in run["points"]]
    masks = [run for run in runs if run["kind"] == "mask"]
    assert len(masks) == 3 and all(len(run["members"]) == 1 for run in masks), "discoveries are not packed"
    serial = _sweep(resources={"pack_upstream": False})
    serial_jobs = [
        {"kind": "source", "spec": s, "key": Upstream(serial, s, None, pick_device(serial)).key("source"), "deps": []}
        for s in expand(serial)
    ]
    assert all(run["points"] is None for run in _shared_runs(serial_jobs, slots=slots, limit=limit))


def test_a_packed_source_is_the_same_in_any_pack_and_close_to_the_serial_one(tmp_path):
    sweep, serial = _sweep(), _sweep(resources={"pack_upstream": False})
    device = pick_device(sweep)
    three, two = ArtifactStore(tmp_path / "three"), ArtifactStore(tmp_path / "two")
    Upstream(sweep, _source(sweep, 0), three, device).compute_shared("source", [{"seed": s} for s in (0, 1, 2)])
    Upstream(sweep, _source(sweep, 2), two, device).compute_shared("source", [{"seed": s} for s in (2, 0)])
    assert [c["kind"] for c in three.computations()] == ["source"] * 3
    assert all(meta["pack"] == 3 and meta["computed_with"] == 3 for _, meta, _ in three.entries("source"))
    for seed in (0, 1, 2):
        spec = _source(sweep, seed)
        key = Upstream(sweep, spec, None, device).key("source")
        tensors, meta = three.load("source", key)
        # Alone: a trial's own `get` trains it as a pack of one.
        alone = ArtifactStore(tmp_path / f"alone{seed}")
        Upstream(sweep, spec, alone, device).get("source")
        others = [alone.load("source", key)] + ([two.load("source", key)] if seed != 1 else [])
        for other_tensors, other_meta in others:
            assert other_meta["val_acc"] == meta["val_acc"] and other_meta["best_epoch"] == meta["best_epoch"]
            for name in tensors:
                assert torch.equal(tensors[name], other_tensors[name]), (seed, name)
        # Serial: the same masks and batches, other kernels: within float rounding.
        serial_store = ArtifactStore(tmp_path / f"serial{seed}")
        serial_up = Upstream(serial, spec, serial_store, device)
        serial_up.get("source")
        serial_tensors, serial_meta = serial_store.load("source", serial_up.key("source"))
        assert "pack" not in serial_meta
        assert serial_meta["best_epoch"] == meta["best_epoch"]
        assert serial_meta["val_acc"] == pytest.approx(meta["val_acc"], abs=0.02)
        for name, t in serial_tensors.items():
            if name.endswith("attn.qkv.bias"):
                continue  # its key part has no gradient in exact arithmetic: AdamW moves it by rounding noise
            torch.testing.assert_close(tensors[name], t, rtol=1e-3, atol=1e-3, msg=name)


def test_the_identity_of_a_trial_on_packed_sources_says_so():
    from orchestrator.trial import identity

    packed, serial = (
        _sweep(methods=["subtask_induction", "scratch"]),
        _sweep(methods=["subtask_induction", "scratch"], resources={"pack_upstream": False}),
    )
    for spec in expand(packed):
        ours, theirs = identity(packed, spec), identity(serial, spec)
        if spec.method == "scratch":  # needs no source: the same trial either way
            assert ours == theirs
        else:
            assert ours == {**theirs, "packed_upstream": True}


def test_the_upstream_slots_are_bounded_by_the_gpus():
    from orchestrator.upstream import _slots

    assert _slots(_sweep(), 16, {"CPU": 16}) == 16
    assert _slots(_sweep(resources={"pack_upstream": True, "gpu": 1}), 16, {"CPU": 16, "GPU": 1}) == 1
    assert _slots(_sweep(resources={"pack_upstream": True, "gpu": 0.25}), 16, {"CPU": 16, "GPU": 1}) == 4
    assert _slots(_sweep(resources={"pack_upstream": True, "gpu": 0.25}), 2, {"CPU": 2, "GPU": 1}) == 2
    assert _slots(_sweep(resources={"pack_upstream": True, "gpu": 1}), 4, {"CPU": 4}) == 1  # none visible yet


def test_a_refused_pack_trains_pack_of_one_and_a_refused_one_serially(tmp_path, monkeypatch):
    from methods import artifacts
    from methods.packing import NotPackable, fit_packed

    sweep = _sweep(seeds=[0, 1])

    def refuse_mixes(objectives, *args, **kwargs):
        if len(objectives) > 1:
            raise NotPackable("base data of different sizes")
        return fit_packed(objectives, *args, **kwargs)

    monkeypatch.setattr(artifacts, "fit_packed", refuse_mixes)
    store = ArtifactStore(tmp_path / "mixes")
    Upstream(sweep, _source(sweep, 0), store, torch.device("cpu")).compute_shared("source", [{"seed": 0}, {"seed": 1}])
    assert sorted((meta["pack"], "alone" in meta) for _, meta, _ in store.entries("source")) == [(1, False), (1, False)]

    def refuse(*args, **kwargs):
        raise NotPackable("draws random numbers past nn.Dropout")

    monkeypatch.setattr(artifacts, "fit_packed", refuse)
    store = ArtifactStore(tmp_path / "alone")
    Upstream(sweep, _source(sweep, 0), store, torch.device("cpu")).compute_shared("source", [{"seed": 0}, {"seed": 1}])
    assert all("not packable" in meta["alone"] for _, meta, _ in store.entries("source"))


def test_a_context_for_another_seed_cannot_read_this_trials_artifacts():
    up = Upstream(_sweep(), _source(_sweep(), 0), None, torch.device("cpu"))
    ctx = up.context("source", seed=1)
    assert ctx.seed == 1 and ctx.packed
    with pytest.raises(ValueError, match="seed 1 cannot read 'mask' of seed 0"):
        ctx.key_of("mask")
    assert up.context("source").key_of("source") == up.key("source")


def test_a_kind_that_packs_seeds_needs_nothing():
    from methods.artifacts import ArtifactKind, register_artifact

    with pytest.raises(ValueError, match="cannot need other kinds"):

        @register_artifact("packed_probe_kind", needs=("source",), packs_seeds=True)
        class Bad(ArtifactKind):
            pass

    assert "packed_probe_kind" not in ARTIFACTS


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from orchestrator.sweep import start_ray

    ray.shutdown()
    start_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_sweep_that_packs_its_sources_on_ray(ray_local, tmp_path):
    from orchestrator.sweep import run_sweep

    sweep = _sweep(data_fractions=[0.5, 1.0])
    outcome = run_sweep(sweep, tmp_path / "out")
    assert outcome.failed == 0 and outcome.ran == 6
    store = ArtifactStore(tmp_path / "out" / "artifacts")
    sources = store.entries("source")
    assert len(sources) == 3 and len([c for c in store.computations() if c["kind"] == "source"]) == 3
    assert sorted(meta["pack"] for _, meta, _ in sources) == [1, 2, 2], "one pack per slot: 2 + 1"
    table = outcome.table
    assert (table["status"] == "done").all() and not table["source_computed"].any()
