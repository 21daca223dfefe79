"""Trial groups: several of our trials run one after another in one Tune trial, each with its own
row (`orchestrator.queue` sizes the groups, `orchestrator.worker` runs them, the Rows callback
writes their rows)."""

import json
import math
import os

import pytest

from methods.training import Interrupted
from orchestrator import queue, worker
from orchestrator.ordering import cost
from orchestrator.trial import TrialSpec, expand, run_trial

# --- the queue ------------------------------------------------------------------------------


def _specs(n: int, fraction: float = 0.5) -> list[TrialSpec]:
    return [TrialSpec(method="scratch", data_fraction=fraction, seed=i) for i in range(n)]


def _drain(q: queue.TrialQueue, on_each=lambda config: None) -> list[list[dict]]:
    """Every group the queue hands out, each completed as soon as it is handed out."""
    groups = []
    while (config := q.suggest(f"t{len(groups)}")) != queue.TrialQueue.FINISHED:
        groups.append(queue.members(config))
        on_each(config)
        q.on_trial_complete(f"t{len(groups) - 1}")
    return groups


def test_fixed_groups_hand_out_every_trial_once_in_order():
    specs = _specs(10)
    groups = _drain(queue.TrialQueue(specs, group=3, concurrency=2))
    assert [len(g) for g in groups] == [3, 3, 3, 1]
    assert [s for g in groups for s in g] == [s.model_dump() for s in specs]


def test_a_trial_alone_keeps_the_config_of_a_single_trial():
    (spec,) = _specs(1)
    assert queue.TrialQueue([spec], group=1).suggest("t0") == {"spec": spec.model_dump()}
    two = queue.TrialQueue(_specs(2), group=2).suggest("t0")
    assert set(two) == {"specs"} and len(two["specs"]) == 2


def _report(q: queue.TrialQueue, seconds_per_trial: float):
    """A fake Tune: every handed-out group reports its rows at once."""

    def on_each(config):
        specs = [TrialSpec(**s) for s in queue.members(config)]
        q.on_trial_result(
            "t", {"rows_cost": sum(cost(s) for s in specs), "rows_compute_s": seconds_per_trial * len(specs)}
        )

    return on_each


def test_auto_groups_start_alone_then_hold_about_the_target_compute():
    specs = _specs(4000)
    q = queue.TrialQueue(specs, group="auto", concurrency=2)
    groups = _drain(q, _report(q, seconds_per_trial=0.05))
    assert len(groups[0]) == 1, "nothing is measured before the first rows"
    assert [s for g in groups for s in g] == [s.model_dump() for s in specs]
    biggest = max(len(g) for g in groups)
    assert biggest == math.ceil(queue.GROUP_TARGET_S / 0.05), "the target compute decides while many are left"
    assert len(groups) < len(specs) / 20


def test_auto_groups_leave_several_groups_per_slot_for_the_tail():
    specs = _specs(4000)
    q = queue.TrialQueue(specs, group="auto", concurrency=2)
    groups = _drain(q, _report(q, seconds_per_trial=0.05))
    left = len(specs)
    for group in groups:
        # Each group but the first holds at most 1/(slots x GROUPS_PER_SLOT) of the cost still to hand out.
        if group is not groups[0]:
            assert len(group) == 1 or len(group) - 1 <= left / (2 * queue.GROUPS_PER_SLOT)
        left -= len(group)
    assert [len(g) for g in groups[-3:]] == [1, 1, 1], "the last groups are single trials"


def test_auto_keeps_long_trials_alone():
    specs = _specs(50)
    q = queue.TrialQueue(specs, group="auto", concurrency=2)
    assert {len(g) for g in _drain(q, _report(q, seconds_per_trial=30.0))} == {1}


def test_a_lost_group_comes_back_while_its_trials_have_tries_left():
    specs = _specs(4)
    q = queue.TrialQueue(specs, group=2, retries=1)
    first, second = q.suggest("a"), q.suggest("b")
    assert q.suggest("c") is None, "everything is out, but a live group may come back: wait"
    q.on_trial_complete("b")
    q.on_trial_complete("a", error=True)
    assert q.requeue(queue.members(first)) == []  # its worker was lost before it ran
    again = q.suggest("d")
    assert queue.members(again) == queue.members(first)
    assert q.requeue(queue.members(again)) == queue.members(first), "one retry each: spent"
    q.on_trial_complete("d", error=True)
    assert q.suggest("e") == queue.TrialQueue.FINISHED
    assert queue.members(second) == [s.model_dump() for s in specs[2:]]


def test_a_lost_pack_comes_back_as_a_pack():
    specs = _specs(3)
    q = queue.TrialQueue(specs, group=1, pack_keys=["k"] * 3, pack=4, retries=2)
    pack = q.suggest("a")
    assert len(queue.members(pack)) == 3
    q.on_trial_complete("a", error=True)
    assert q.requeue(queue.members(pack)[1:]) == []
    assert queue.members(q.suggest("b")) == queue.members(pack)[1:]


def test_the_queue_hands_out_nothing_once_stopped():
    stopping = False
    q = queue.TrialQueue(_specs(5), group=2, should_stop=lambda: stopping)
    assert q.suggest("a") is not None
    stopping = True
    assert q.suggest("b") == queue.TrialQueue.FINISHED


# --- the worker's group -----------------------------------------------------------------------


class _FakeRun:
    """Stands in for `run_trial`: reports `epochs` epochs, then returns a row (or raises)."""

    def __init__(self, epochs: int = 5, raises: dict | None = None):
        self.epochs, self.raises, self.calls = epochs, raises or {}, []

    def __call__(self, sweep, spec, store, report, should_stop):
        self.calls.append(spec.seed)
        for epoch in range(self.epochs):
            report({"stage": "epoch", "fit": "train", "epoch": epoch, "train/loss": 1.0})
        report({"stage": "train", "train_s": 0.1})
        if spec.seed in self.raises:
            error = self.raises[spec.seed]
            if isinstance(error, list):
                error = error.pop(0) if error else None
            if error is not None:
                raise error
        report({"stage": "done", "row_json": "{}"})
        return {"trial_hash": f"h{spec.seed}", "status": "done", "total_s": 0.25, "val_acc": 0.5, "seed": spec.seed}


def _run_group(tiny, monkeypatch, n, fake, **sweep):
    sweep.setdefault("resources", {"pack": 1})  # trials alone: packs are tested below
    monkeypatch.setattr(worker, "run_trial", fake)
    sent = []
    worker.Group(tiny(**sweep), _specs(n), store=None, send=sent.append).run()
    return sent


def _rows(sent):
    return [row for result in sent if "rows_json" in result for row in json.loads(result["rows_json"])]


def test_a_group_sends_every_row_with_its_compute_and_cost(tiny, monkeypatch):
    sent = _run_group(tiny, monkeypatch, 4, _FakeRun())
    assert [r["seed"] for r in _rows(sent)] == [0, 1, 2, 3]
    assert sent[-1]["stage"] == "done"
    batches = [r for r in sent if "rows_json" in r]
    assert sum(b["rows_compute_s"] for b in batches) == pytest.approx(4 * 0.25)
    assert sum(b["rows_cost"] for b in batches) == pytest.approx(4 * cost(_specs(1)[0]))
    assert not [r for r in sent if r["stage"] in ("train", "done") and "rows_json" not in r], "no stage results"


def test_rows_go_out_in_batches_at_most_a_second_apart(tiny, monkeypatch):
    monkeypatch.setattr(worker, "REPORT_EVERY_S", 0.0)
    sent = _run_group(tiny, monkeypatch, 3, _FakeRun(epochs=0))
    assert [(r["stage"], len(json.loads(r["rows_json"])), r["group_next"]) for r in sent] == [
        ("rows", 1, 1),
        ("rows", 1, 2),
        ("done", 1, 2),
    ]


def test_a_group_reports_few_epochs_and_a_trial_alone_every_one(tiny, monkeypatch):
    grouped = _run_group(tiny, monkeypatch, 3, _FakeRun(epochs=50))
    assert len([r for r in grouped if r["stage"] == "epoch"]) <= 1
    alone = _run_group(tiny, monkeypatch, 1, _FakeRun(epochs=50))
    assert [r["stage"] for r in alone] == ["epoch"] * 50 + ["train", "done"]
    assert alone[-1]["val_acc"] == 0.5


def test_a_failing_trial_sends_a_failed_row_and_the_group_goes_on(tiny, monkeypatch):
    fake = _FakeRun(raises={1: RuntimeError("deliberate")})
    sent = _run_group(tiny, monkeypatch, 3, fake, max_failures=2)
    assert fake.calls == [0, 1, 2], "the worker retries nothing: the queue decides (test_a_failed_row_...)"
    rows = _rows(sent)
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert "RuntimeError: deliberate" in rows[1]["error"]
    assert rows[1]["trial"] == _specs(3)[1].name


def test_a_stop_request_ends_the_group_with_the_rows_it_has(tiny, monkeypatch):
    fake = _FakeRun(raises={2: Interrupted("stop requested")})
    sent = _run_group(tiny, monkeypatch, 4, fake)
    assert fake.calls == [0, 1, 2], "nothing runs after the interrupted trial"
    assert sent[-1]["stage"] == "interrupted"
    assert [r["seed"] for r in _rows(sent)] == [0, 1]


# --- on Ray ---------------------------------------------------------------------------------

COMPARED = ("trial_hash", "status", "test_acc", "val_acc", "best_epoch", "epochs_run", "measurements_json")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from orchestrator.sweep import start_ray

    ray.shutdown()
    start_ray(num_cpus=2)
    yield
    ray.shutdown()


def _raw(**overrides):
    from tests.conftest import tiny_raw

    return tiny_raw(methods=["subtask_induction", "scratch"], data_fractions=[0.2, 0.5, 1.0], seeds=[0, 1], **overrides)


def test_grouped_trials_give_the_rows_of_trials_run_alone(ray_local, tmp_path):
    from orchestrator import results
    from orchestrator.config import load_sweep
    from orchestrator.sweep import run_sweep

    tables = {}
    for group in (1, 5):
        sweep = load_sweep(_raw(resources={"group": group, "pack": 1}))
        outcome = run_sweep(sweep, tmp_path / f"group{group}")
        assert outcome.failed == 0 and outcome.ran == len(expand(sweep)) == 12
        tables[group] = results.read(tmp_path / f"group{group}" / "results.parquet").set_index("trial_hash")
        tune_trials = [p for p in (tmp_path / f"group{group}" / "tune").glob("run-*/*") if p.is_dir()]
        assert len(tune_trials) == math.ceil(12 / group)
        assert not list((tmp_path / f"group{group}" / "rows").glob("*.running")), "no trial is left marked running"
    alone, grouped = tables[1], tables[5].loc[tables[1].index]
    for column in COMPARED[1:]:
        assert alone[column].tolist() == grouped[column].tolist(), column


@pytest.mark.slow  # Ray: about a minute on two cores
def test_a_group_whose_worker_dies_is_retried_and_every_trial_gets_its_row(tmp_path):
    import ray

    from orchestrator import results
    from orchestrator.config import load_sweep
    from orchestrator.sweep import run_sweep

    folder = tmp_path / "dies_once"
    folder.mkdir()
    os.environ["INSTILL_TEST_DIES_ONCE"] = str(folder)  # inherited by the Ray workers started below
    try:
        from tests.conftest import tiny_raw

        sweep = load_sweep(
            tiny_raw(
                plugins=["tests.plugins.dies_once"],
                methods=["scratch", "dies_once"],  # dies_once is scratch bit for bit
                seeds=[0, 1],
                training={"epochs": 6, "batch_size": 10},
                resources={"group": 4, "pack": 1},
                max_failures=1,
            )
        )
        ray.shutdown()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        outcome = run_sweep(sweep, tmp_path / "out")
    finally:
        ray.shutdown()
        os.environ.pop("INSTILL_TEST_DIES_ONCE")

    assert (folder / "killed").exists(), "the worker was killed"
    assert outcome.failed == 0 and outcome.ran == 4
    table = results.read(tmp_path / "out" / "results.parquet").set_index(["method", "seed"])
    assert (table["status"] == "done").all()
    for seed in (0, 1):
        for column in COMPARED[2:]:
            assert table.loc[("dies_once", seed), column] == table.loc[("scratch", seed), column], column


# --- packs ----------------------------------------------------------------------------------


def test_packable_trials_of_one_key_form_one_group_up_to_the_pack_size():
    specs = _specs(7) + [TrialSpec(method="l2sp", data_fraction=0.5, seed=i) for i in range(2)] + _specs(3, 0.2)
    keys = ["a"] * 7 + [None, None] + ["b"] * 3
    q = queue.TrialQueue(specs, group=1, concurrency=2, pack_keys=keys, pack=4)
    groups = [[(s["method"], s["data_fraction"], s["seed"]) for s in g] for g in _drain(q)]
    assert [len(g) for g in groups] == [4, 3, 1, 1, 3]
    assert {g[0][1] for g in groups[:2]} == {0.5} and groups[4][0][1] == 0.2
    assert [s for g in groups for s in g] == [(s.method, s.data_fraction, s.seed) for s in specs]


def test_pack_keys_join_packable_methods_of_one_budget_and_setting(tiny):
    from orchestrator.trial import pack_keys

    sweep = tiny(
        methods=["subtask_induction", "sampled_subnetwork", "scratch", "l2sp"],
        data_fractions=[0.2, 1.0],
        seeds=[0, 1],
        axes={"training.lr": [1e-3, 2e-3]},
        resources={"pack": "auto"},
    )
    specs = expand(sweep)
    keys = pack_keys(sweep, specs)
    for spec, key in zip(specs, keys, strict=True):
        if spec.method == "l2sp":
            assert key is None, "l2sp's objective reads reference weights: it trains alone"
            continue
        same = [s for s, k in zip(specs, keys, strict=True) if k == key]
        assert all(s.data_fraction == spec.data_fraction for s in same)
        assert all(s.axes["training.lr"] == spec.axes["training.lr"] for s in same)  # sparsities mix
        assert {s.method for s in same} == {"subtask_induction", "sampled_subnetwork", "scratch"}
    assert pack_keys(tiny(resources={"pack": 1}), specs) == [None] * len(specs)


def test_a_pack_gives_the_rows_of_its_trials_run_alone(tiny, tmp_path):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import run_pack, run_trial

    sweep = tiny(
        methods=["subtask_induction", "sampled_subnetwork", "scratch", "full_transfer", "l2sp"],
        seeds=[0, 1, 2],
        model={"dropout": 0.1},
    )
    specs = expand(sweep)
    store = ArtifactStore(tmp_path)
    alone = [run_trial(sweep, s, store) for s in specs]
    packed = run_pack(sweep, specs, store, limit=16)
    sizes = {}
    for a, p in zip(alone, packed, strict=True):
        assert isinstance(p, dict), p
        assert p["trial_hash"] == a["trial_hash"] and p["status"] == "done"
        for column in ("val_acc", "test_acc", "best_epoch", "epochs_run"):
            assert p[column] == pytest.approx(a[column], abs=1e-6), (a["trial"], column)
        sizes[p["method"]] = p["pack"]
        assert a["pack"] == 1 and a["packed"] is False
        assert p["packed"] is (p["method"] != "l2sp")
    # Masked models pack together, plain models together; l2sp trains alone.
    assert sizes == {"subtask_induction": 6, "sampled_subnetwork": 6, "scratch": 6, "full_transfer": 6, "l2sp": 1}
    assert sum(p["total_s"] for p in packed) > 0
    limited = run_pack(sweep, specs, store, limit=4)
    assert sorted(p["pack"] for p in limited if p["method"] != "l2sp") == [3] * 12  # 6 at most 4 a pack: 3 + 3


def test_a_packed_trial_gives_the_same_row_in_any_pack(tiny, tmp_path):
    # With dropout on: a resumed or extended sweep packs other trials together, and another
    # machine may pack more or fewer; none of it may move a trial's numbers.
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import run_pack

    sweep = tiny(methods=["subtask_induction", "scratch"], seeds=[0, 1, 2], model={"dropout": 0.1})
    specs = expand(sweep)
    store = ArtifactStore(tmp_path)
    columns = ("val_acc", "test_acc", "best_epoch", "epochs_run")
    together = run_pack(sweep, specs, store, limit=16)
    assert {r["pack"] for r in together} == {3} and all(r["packed"] for r in together)
    in_twos = run_pack(sweep, specs[::-1], store, limit=2)[::-1]
    alone = [run_pack(sweep, [spec], store, limit=16)[0] for spec in specs]
    assert {r["pack"] for r in in_twos} == {1, 2} and {r["pack"] for r in alone} == {1}
    for a, b, c in zip(together, in_twos, alone, strict=True):
        assert [a[k] for k in columns] == [b[k] for k in columns] == [c[k] for k in columns], a["trial"]
    assert len({r["val_acc"] for r in together}) > 1


def test_a_pack_refused_by_its_first_forward_trains_each_trial_alone(tiny, tmp_path, monkeypatch):
    # `fit_packed` may refuse a pack only once the models are built (its first forward finds
    # randomness past nn.Dropout): then each trial trains serially, as with pack: 1.
    from methods.packing import NotPackable
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import packs

    sweep = tiny(methods=["scratch"], seeds=[0, 1])
    specs = expand(sweep)
    store = ArtifactStore(tmp_path)
    alone = [run_trial(sweep, s, store) for s in specs]

    def refuse(*args, **kwargs):
        raise NotPackable("its loss draws random numbers other than through nn.Dropout modules")

    monkeypatch.setattr(packs, "fit_packed", refuse)
    rows = packs.run_pack(sweep, specs, store, limit=16)
    for a, r in zip(alone, rows, strict=True):
        assert isinstance(r, dict) and r["packed"] is False and r["pack"] == 1
        assert [r[k] for k in ("val_acc", "test_acc", "best_epoch")] == [
            a[k] for k in ("val_acc", "test_acc", "best_epoch")
        ]


def test_a_trial_that_fails_in_its_pack_sends_a_failed_row(tiny, monkeypatch):
    failing = RuntimeError("diverged in the pack")

    def run_pack(sweep, specs, store, limit, **kwargs):  # the first trial fails in its pack, the others pack
        done = [{"trial_hash": f"h{s.seed}", "status": "done", "total_s": 0.1, "seed": s.seed} for s in specs[1:]]
        return [failing, *done]

    monkeypatch.setattr(worker, "run_pack", run_pack)
    fake = _FakeRun(epochs=0)
    monkeypatch.setattr(worker, "run_trial", fake)
    sent = []
    worker.Group(tiny(max_failures=1, resources={"pack": 4}), _specs(3), store=None, send=sent.append).run()
    assert fake.calls == [], "retries are the queue's"
    rows = _rows(sent)
    assert rows[0]["status"] == "failed" and "diverged in the pack" in rows[0]["error"]


def test_packed_sweep_on_ray_gives_the_rows_of_a_serial_one(ray_local, tmp_path):
    from orchestrator import results
    from orchestrator.config import load_sweep
    from orchestrator.sweep import run_sweep

    tables = {}
    for pack in (1, "auto"):
        sweep = load_sweep(_raw(model={"dropout": 0.1}, resources={"pack": pack}))
        outcome = run_sweep(sweep, tmp_path / f"pack{pack}")
        assert outcome.failed == 0 and outcome.ran == 12
        tables[pack] = results.read(tmp_path / f"pack{pack}" / "results.parquet").set_index("trial_hash")
    serial, packed = tables[1], tables["auto"].loc[tables[1].index]
    assert (serial["pack"] == 1).all()
    assert (packed["pack"] == 2).all(), "each budget's two seeds of a method pack"
    for column in ("test_acc", "val_acc", "best_epoch", "epochs_run"):
        assert packed[column].tolist() == pytest.approx(serial[column].tolist(), abs=1e-6), column


def test_a_stopped_pack_checkpoints_and_the_next_run_resumes_it(tiny, tmp_path, monkeypatch):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.checkpoints import CheckpointStore

    asked = []

    def requested():
        asked.append(1)
        return len(asked) == 2  # the second epoch end

    monkeypatch.setattr(worker.stop, "requested", requested)
    sweep = tiny(methods=["scratch"], seeds=[0, 1, 2], training={"epochs": 5, "patience": None})
    store = ArtifactStore(tmp_path / "store")
    sent = []
    worker.Group(sweep, expand(sweep), store, send=sent.append).run()
    assert [r["stage"] for r in sent] == ["interrupted"] and _rows(sent) == [], "no rows from a stopped pack"
    assert len(asked) == 2
    assert len(CheckpointStore(store).owners()) == 1, "the pack saved its state on the stop request"
    sent.clear()
    worker.Group(sweep, expand(sweep), store, send=sent.append).run()
    resumed = _rows(sent)
    # Five epochs in all: asked at the ends of epochs 1-2, then 3-4 (none after the last).
    assert len(asked) == 4, "the second run went on from epoch 2"
    assert CheckpointStore(store).owners() == [], "cleared once the pack finished"
    sent.clear()
    worker.Group(sweep, expand(sweep), ArtifactStore(tmp_path / "whole"), send=sent.append).run()
    columns = ("val_acc", "test_acc", "best_epoch", "epochs_run", "measurements_json")
    assert all(r["packed"] and r["pack"] == 3 for r in resumed)
    assert [[r[c] for c in columns] for r in resumed] == [[r[c] for c in columns] for r in _rows(sent)]


def test_in_a_mixed_group_the_running_trial_is_named_by_its_place_in_the_group(tiny, monkeypatch):
    def run_pack(sweep, specs, store, limit, **kwargs):
        return [{"trial_hash": f"p{s.seed}", "status": "done", "total_s": 0.1, "seed": s.seed} for s in specs]

    monkeypatch.setattr(worker, "run_pack", run_pack)
    monkeypatch.setattr(worker, "run_trial", _FakeRun(epochs=0))
    monkeypatch.setattr(worker, "REPORT_EVERY_S", 0.0)
    alone = [TrialSpec(method="l2sp", data_fraction=0.5, seed=s) for s in (10, 11, 12)]
    specs = [alone[0], *_specs(2), *alone[1:]]  # l2sp trains alone, the two scratch trials pack
    sent = []
    worker.Group(tiny(resources={"pack": 4}), specs, store=None, send=sent.append).run()
    assert [r["seed"] for r in _rows(sent)] == [0, 1, 10, 11, 12]
    assert [r["group_next"] for r in sent if r["stage"] == "rows"] == [3, 4], "indices into the whole group"


def test_a_calibrated_pack_size_splits_the_packs(tiny, tmp_path, monkeypatch):
    """With `calibrate_k` (pack: auto on a GPU) the measured K, not the limit, sizes the packs; it is
    measured once per kind of pack in the process."""
    from methods import packing
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import packs, run_pack

    calls = []

    def fake(objective, data, cfg, k_max, **kw):
        calls.append(k_max)
        return packing.Calibration(k=2, rates={1: 1.0, 2: 2.0}, bytes_per_model=None, stopped="test")

    monkeypatch.setattr(packs, "calibrate", fake)
    monkeypatch.setattr(packs, "_CALIBRATED", {})
    sweep = tiny(methods=["scratch"], seeds=[0, 1, 2, 3, 4], resources={"pack": "auto"})
    specs = expand(sweep)
    rows = run_pack(sweep, specs, ArtifactStore(tmp_path), limit=16, calibrate_k=True)
    assert [r["pack"] for r in rows] == [2, 2, 2, 2, 1]  # 5 trials at K = 2: 2 + 2 + 1, in order
    assert calls == [5]  # at most the trials there are
    monkeypatch.setattr(packs, "_CALIBRATED", {})
    rows = run_pack(sweep, specs, ArtifactStore(tmp_path / "b"), limit=4, calibrate_k=False)
    assert [r["pack"] for r in rows] == [3, 3, 3, 2, 2]  # 5 trials at most 4 a pack: 3 + 2, not 4 + 1


def test_a_failed_calibration_packs_as_many_as_allowed(tiny, tmp_path, monkeypatch):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import packs, run_pack

    def broken(*args, **kw):
        raise RuntimeError("CUBLAS_STATUS_ALLOC_FAILED")

    monkeypatch.setattr(packs, "calibrate", broken)
    monkeypatch.setattr(packs, "_CALIBRATED", {})
    sweep = tiny(methods=["scratch"], seeds=[0, 1, 2], resources={"pack": "auto"})
    rows = run_pack(sweep, expand(sweep), ArtifactStore(tmp_path), limit=16, calibrate_k=True)
    assert [r["pack"] for r in rows] == [3, 3, 3]


class _LostTrial:
    """What the Rows callback reads of a Tune trial that errored or sent rows."""

    def __init__(self, config):
        self.trial_id, self.config = "t0", config
        self.error_msg, self.last_result = "ActorDiedError: its node has died", {}


@pytest.mark.parametrize("retries", [1, 0])
def test_a_lost_group_goes_back_to_the_queue(tiny, tmp_path, retries):
    """Tune retries nothing: the driver queues a lost group's trials again while their tries allow,
    else records them failed."""
    from orchestrator.callbacks import make_callbacks
    from orchestrator.outdir import read_row

    sweep = tiny(methods=["scratch"], seeds=[0, 1], max_failures=retries)
    specs = expand(sweep)
    q = queue.TrialQueue(specs, group=2, retries=retries)
    rows, _ = make_callbacks(tmp_path, sweep, specs, 0, queue=q)
    config = q.suggest("t0")
    q.on_trial_complete("t0", error=True)
    rows.on_trial_error(0, [], _LostTrial(config))
    back = retries > 0
    assert [read_row(tmp_path, sweep, s) is None for s in specs] == [back, back]
    assert (q.suggest("t1") != queue.TrialQueue.FINISHED) == back
    if not back:
        assert read_row(tmp_path, sweep, specs[0])["status"] == "failed"


@pytest.mark.parametrize("retries", [1, 0])
def test_a_failed_row_goes_back_to_the_queue_while_its_tries_allow(tiny, tmp_path, retries):
    from orchestrator.callbacks import make_callbacks
    from orchestrator.outdir import read_row
    from orchestrator.trial import failed_row

    sweep = tiny(methods=["scratch"], max_failures=retries)
    [spec] = expand(sweep)
    q = queue.TrialQueue([spec], retries=retries)
    rows, _ = make_callbacks(tmp_path, sweep, [spec], 0, queue=q)
    for attempt in range(retries + 1):
        config = q.suggest(f"t{attempt}")
        row = failed_row(sweep, spec, RuntimeError("deliberate"))
        rows.on_trial_result(0, [], _LostTrial(config), {"stage": "done", "rows_json": json.dumps([row])})
        rows.on_trial_complete(0, [], _LostTrial(config))
        q.on_trial_complete(f"t{attempt}")
        assert (read_row(tmp_path, sweep, spec) is None) == (attempt < retries)
    assert q.suggest("last") == queue.TrialQueue.FINISHED and rows.failed == 1
