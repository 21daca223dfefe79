"""Checkpoints inside trials: a training run stopped at any epoch end, or killed in the middle of an
epoch, resumes from its checkpoint and ends bit for bit where an uninterrupted run ends. Checked on
the loop itself (every piece of its state), on every registered method that trains through it, on
the artifacts a trial trains (source, masks, a guide), and on a real Ray sweep whose worker is
SIGKILLed mid-training."""

import dataclasses
import io
import json
import math
import os
import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from common.seeding import seeded_init
from methods import METHODS, get_method
from methods.training import Interrupted, Supervision, TrainConfig, cross_entropy, fit, supervised
from orchestrator.artifacts import ArtifactStore
from orchestrator.checkpoints import CheckpointStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial, trial_hash
from tasks.base import Split, StageData
from tests.conftest import tiny_raw

VOLATILE = ("_s", "started_at", "finished_at", "_computed", "device", "worker")


def stable(row: dict) -> str:
    """The row without its timings and provenance, as comparable text (NaN equals NaN)."""
    return json.dumps({k: v for k, v in row.items() if not k.endswith(VOLATILE)}, sort_keys=True, default=str)


# --- the loop --------------------------------------------------------------------------------


class Killed(Exception):
    """Stands for a SIGKILL: the attempt's objects are dropped, a fresh 'process' resumes."""


class MemoryCheckpointer:
    """Serialised as the store does (torch.save; weights-only load), kept in memory."""

    def __init__(self):
        self.slots: dict[int, bytes] = {}

    def due(self) -> bool:
        return True

    def save(self, slot, state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.slots[slot] = buffer.getvalue()

    def load(self, slot):
        blob = self.slots.get(slot)
        return None if blob is None else torch.load(io.BytesIO(blob), weights_only=True)


def _split(n: int, gen: torch.Generator) -> Split:
    x = torch.randn(n, 6, generator=gen)
    return Split(x, {"y": (x[:, 0] + 0.5 * torch.randn(n, generator=gen) > 0).long() + (x[:, 1] > 1).long()})


CFG = TrainConfig(epochs=12, batch_size=16, lr=5e-3, patience=3)  # patience ends it after epoch 8


def _setup(kill_at_step: int | None = None):
    """A fresh 'process': a model with dropout, two batch streams of different sizes (so the second
    stream's pending batches straddle epochs), and an objective with state of its own (a random
    stream and an epoch counter that the loss reads)."""
    gen = torch.Generator().manual_seed(0)
    data = StageData(_split(60, gen), _split(40, gen), {"test": _split(20, gen)}, {"extra": _split(37, gen)})
    with seeded_init(0, "loop_test"):
        model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.3), nn.ReLU(), nn.Linear(32, 3))
    noise = torch.Generator().manual_seed(11)
    own = {"epochs": 0}

    def loss(batch, step):
        if step == kill_at_step:
            raise Killed(step)
        w = torch.rand((), generator=noise)
        ce = F.cross_entropy(model(batch["train"].x), batch["train"].y)
        extra = F.cross_entropy(model(batch["extra"].x), batch["extra"].y)
        return ce + w * extra / (1 + own["epochs"]), {"ce": ce, "extra": extra}

    def end_epoch(epoch):
        own["epochs"] += 1
        return {"own_epochs": float(own["epochs"])}

    def load_state(saved):
        noise.set_state(saved["noise"])
        own["epochs"] = saved["epochs"]

    objective = dataclasses.replace(
        cross_entropy(model, data),
        loss=loss,
        streams=("train", "extra"),
        end_epoch=end_epoch,
        state=lambda: {"noise": noise.get_state(), "epochs": own["epochs"]},
        load_state=load_state,
    )
    return objective, data, model, (noise, own)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every test (conftest's fixture is per test, and runs after this one)
    objective, data, model, own = _setup()
    generator = torch.Generator().manual_seed(3)
    try:
        result = fit(objective, data, CFG, generator)
    finally:
        torch.set_num_threads(threads)
    assert result.epochs_run < CFG.epochs, "patience must end the run, so that its counter is tested"
    assert result.best_epoch < result.epochs_run, "the best epoch must be restored, so that its snapshot is tested"
    return result, model, own, generator.get_state()


def _check_same(uninterrupted, result, model, own, generator):
    ref_result, ref_model, ref_own, ref_generator = uninterrupted
    assert result == ref_result
    assert _same_state(model, ref_model)
    assert torch.equal(own[0].get_state(), ref_own[0].get_state()) and own[1] == ref_own[1]
    assert torch.equal(generator.get_state(), ref_generator), "the caller's generator ends where it would have"


def test_a_run_stopped_at_every_epoch_end_resumes_bit_for_bit(uninterrupted):
    checkpointer, stops, result = MemoryCheckpointer(), 0, None
    while result is None:
        assert stops <= CFG.epochs, "the run never finished"
        objective, data, model, own = _setup()
        generator = torch.Generator().manual_seed(3)
        try:
            with supervised(Supervision(checkpointer=checkpointer, should_stop=lambda: True)):
                result = fit(objective, data, CFG, generator)
        except Interrupted:
            stops += 1
    assert stops == uninterrupted[0].epochs_run - 1  # one epoch per attempt; the last one finishes, no stop
    _check_same(uninterrupted, result, model, own, generator)


@pytest.mark.parametrize("kill_at_step", [5, 13, 22])  # in epochs 2, 4 and 6 (4 steps per epoch)
def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint_bit_for_bit(uninterrupted, kill_at_step):
    checkpointer = MemoryCheckpointer()
    objective, data, *_ = _setup(kill_at_step)
    with pytest.raises(Killed), supervised(Supervision(checkpointer=checkpointer)):
        fit(objective, data, CFG, torch.Generator().manual_seed(3))
    assert torch.load(io.BytesIO(checkpointer.slots[0]), weights_only=True)["epoch"] == kill_at_step // 4
    objective, data, model, own = _setup()
    generator = torch.Generator().manual_seed(3)
    with supervised(Supervision(checkpointer=checkpointer)):
        result = fit(objective, data, CFG, generator)
    _check_same(uninterrupted, result, model, own, generator)


def test_each_fit_call_gets_its_own_slot_and_label():
    checkpointer, labels = MemoryCheckpointer(), []
    supervision = Supervision(
        name="train", checkpointer=checkpointer, on_epoch=lambda label, e, v: labels.append(label)
    )
    with supervised(supervision):
        for _ in range(2):
            objective, data, *_ = _setup()
            fit(objective, data, TrainConfig(epochs=1, batch_size=16), torch.Generator().manual_seed(3))
    assert sorted(checkpointer.slots) == [0, 1] and labels == ["train", "train.2"]


def test_supervision_changes_no_number(uninterrupted):
    """Checkpointing every epoch and reporting every epoch draw nothing and reorder nothing."""
    objective, data, model, own = _setup()
    generator = torch.Generator().manual_seed(3)
    with supervised(Supervision(checkpointer=MemoryCheckpointer(), on_epoch=lambda *a: None)):
        result = fit(objective, data, CFG, generator)
    _check_same(uninterrupted, result, model, own, generator)


# --- every registered method, as a trial -------------------------------------------------------

# Methods of the package (test plug-ins registered by other tests are left out).
BUILT_IN = [n for n in METHODS.names() if type(get_method(n)).__module__.startswith("methods.")]
NOT_FIT = {"linearized_gp"}  # fitted in closed form: its train() runs no epoch


def _cued_raw(tmp_path, **overrides) -> dict:
    """A tiny sweep on the shapes task's cue variant (cbft needs its cued stream)."""
    task = {
        "name": "shapes",
        "n_classes": 3,
        "image_size": 16,
        "n_base": 30,
        "n_subtask": 10,
        "pool_size": 24,
        "n_val": 12,
        "n_test": 12,
        "cache_dir": str(tmp_path / "cache"),
        "cue": {"kind": "box", "fraction": 1.0},
    }
    raw = tiny_raw()
    raw.update(  # whole blocks: tiny_raw would merge them into its own task and model
        task=task,
        model={"name": "plain_cnn", "n_blocks": 2, "width": 4},
        source={"epochs": 2, "lr": 1e-2, "batch_size": 10},
        training={"epochs": 3, "lr": 1e-2, "batch_size": 8},
        data_fractions=[1.0],
        **overrides,
    )
    return raw


def _method_sweep(method: str, tmp_path):
    if method == "cbft":
        return load_sweep(_cued_raw(tmp_path, methods=["cbft"]))
    return load_sweep(
        tiny_raw(
            methods=[method],
            training={"epochs": 3, "batch_size": 10},  # 5 steps per epoch
            lpft={"probe_epochs": 2},
            guidance={"guidance_steps": 7},  # alignment stops inside the second epoch
        )
    )


def _spec(sweep, method: str) -> TrialSpec:
    axes = {"mask.sparsity": sweep.axes["mask.sparsity"][0]} if "mask" in get_method(method).needs else {}
    return TrialSpec(method=method, axes=axes, data_fraction=sweep.data_fractions[0], seed=0)


def _epochs(reports: list[dict]) -> list[str]:
    return [r["fit"] for r in reports if r["stage"] == "epoch"]


def _curves(reports: list[dict], prefix: str = "") -> list[dict]:
    """The epoch reports (scores, losses, measurements) of the runs whose label starts with `prefix`."""
    return [r for r in reports if r["stage"] == "epoch" and r["fit"].startswith(prefix)]


def run_stopping_at_every_epoch(sweep, spec, root) -> tuple[dict, int, list[dict]]:
    """Run the trial with a stop requested at every epoch end, and rerun it until it finishes."""
    reports: list[dict] = []
    for stops in range(50):
        try:
            row = run_trial(sweep, spec, ArtifactStore(root), report=reports.append, should_stop=lambda: True)
            return row, stops, reports
        except Interrupted:
            pass
    raise AssertionError("the trial never finished")


def test_every_built_in_method_is_checked():
    assert {"scratch", "subtask_induction", "lpft", "cbft", "guidance", "l2sp", "linearized_gp"} <= set(BUILT_IN)


@pytest.mark.parametrize("method", BUILT_IN)
def test_a_trial_stopped_at_every_epoch_end_gives_the_uninterrupted_row(method, tmp_path):
    sweep = _method_sweep(method, tmp_path)
    spec = _spec(sweep, method)
    root = tmp_path / "store"
    reports: list[dict] = []
    reference = run_trial(sweep, spec, ArtifactStore(root), report=reports.append)  # computes the artifacts
    trained = _epochs(reports).count("train") + _epochs(reports).count("train.2")
    assert (trained == 0) == (method in NOT_FIT), "every method but the closed-form ones trains through fit"

    row, stops, resumed_reports = run_stopping_at_every_epoch(sweep, spec, root)  # artifacts loaded
    runs = len({f for f in _epochs(reports) if f.startswith("train")})
    assert stops == trained - runs  # a stop at every epoch end but each run's last (it finishes)
    assert stable(row) == stable(reference)
    assert _curves(resumed_reports) == _curves(reports, "train"), "every epoch's numbers, not only the result"
    assert CheckpointStore(ArtifactStore(root)).owners() == [], "a finished trial leaves no checkpoint"


ARTIFACT_CASES = {
    "source_and_continuous_sparsification": ("subtask_induction", {}),
    "hard_concrete": ("subtask_induction", {"discovery": {"method": "hard_concrete", "lr": 0.1}}),
    "trained_guide_of_another_architecture": (
        "guidance",
        {"guide": {"trained": True, "model": {"name": "mlp", "n_layers": 2, "width": 16}}},
    ),
}


@pytest.mark.parametrize("case", sorted(ARTIFACT_CASES))
def test_artifacts_trained_in_a_trial_resume_bit_for_bit_too(case, tmp_path):
    method, overrides = ARTIFACT_CASES[case]
    sweep = load_sweep(tiny_raw(methods=[method], **overrides))
    spec = _spec(sweep, method)
    reports: list[dict] = []
    reference = run_trial(sweep, spec, ArtifactStore(tmp_path / "reference"), report=reports.append)
    row, stops, resumed_reports = run_stopping_at_every_epoch(sweep, spec, tmp_path / "interrupted")
    runs = len(set(_epochs(reports)))  # a stop at every epoch end but each run's last (it finishes)
    assert stops == len(_epochs(reports)) - runs and any(not f.startswith("train") for f in _epochs(reports))
    assert stable(row) == stable(reference)
    assert _curves(resumed_reports) == _curves(reports), "every epoch's numbers, not only the result"
    assert CheckpointStore(ArtifactStore(tmp_path / "interrupted")).owners() == []


# --- the stop request, the store, the interval ----------------------------------------------


def test_a_stop_request_checkpoints_and_a_rerun_resumes(tiny, tmp_path):
    sweep = tiny(methods=["scratch"], training={"epochs": 4, "batch_size": 10})
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    reference = run_trial(sweep, spec, ArtifactStore(tmp_path / "reference"))

    store = ArtifactStore(tmp_path / "store")
    epochs_seen = []

    def should_stop() -> bool:
        epochs_seen.append(1)
        return len(epochs_seen) == 2

    with pytest.raises(Interrupted):
        run_trial(sweep, spec, store, should_stop=should_stop)
    checkpoints = CheckpointStore(store)
    owner = trial_hash(sweep, spec)
    assert checkpoints.owners() == [owner] and checkpoints.slots(owner) == [0]
    assert checkpoints.load(owner, 0)["epoch"] == 2

    reports: list[dict] = []
    row = run_trial(sweep, spec, store, report=reports.append, should_stop=should_stop)
    assert [r["epoch"] for r in reports if r["stage"] == "epoch"] == [3, 4]  # resumed, not restarted
    assert stable(row) == stable(reference)
    assert checkpoints.owners() == []


def test_a_checkpoint_of_another_configuration_is_never_loaded(tiny, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    first = tiny(methods=["scratch"], training={"epochs": 3, "lr": 1e-3})
    with pytest.raises(Interrupted):
        run_trial(first, spec, store, should_stop=lambda: True)
    other = tiny(methods=["scratch"], training={"epochs": 3, "lr": 2e-3})
    assert trial_hash(other, spec) != trial_hash(first, spec)
    reports: list[dict] = []
    row = run_trial(other, spec, store, report=reports.append)
    assert [r["epoch"] for r in reports if r["stage"] == "epoch"] == [1, 2, 3]
    assert stable(row) == stable(run_trial(other, spec, ArtifactStore(tmp_path / "reference")))
    assert CheckpointStore(store).owners() == [trial_hash(first, spec)], "the other trial's checkpoint is kept"


def test_the_interval_decides_when_to_checkpoint(tiny, tmp_path):
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    seen = {}
    for every in (None, 0):
        sweep = tiny(methods=["scratch"], training={"epochs": 3}, resources={"checkpoint_every_s": every})
        store = ArtifactStore(tmp_path / f"every-{every}")
        checkpoints, owner = CheckpointStore(store), trial_hash(sweep, spec)

        def report(metrics, checkpoints=checkpoints, owner=owner, every=every):
            if metrics["stage"] == "epoch":  # reported before that epoch's checkpoint is written
                seen.setdefault(every, []).append(checkpoints.load(owner, 0) is not None)

        run_trial(sweep, spec, store, report=report)
        assert checkpoints.owners() == []
    assert seen == {None: [False, False, False], 0: [False, True, True]}


def test_checkpoint_every_s_is_validated_and_not_part_of_a_trials_identity(tiny):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint_every_s"):
        tiny(resources={"checkpoint_every_s": -1})
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    hashes = {trial_hash(tiny(resources={"checkpoint_every_s": s}), spec) for s in (None, 0, 60)}
    assert len(hashes) == 1


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_an_unreadable_or_unsafe_checkpoint_is_ignored(tiny, tmp_path, caplog):
    sweep = tiny(methods=["scratch"])
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    store = ArtifactStore(tmp_path / "store")
    checkpoints, owner = CheckpointStore(store), trial_hash(sweep, spec)
    (tmp_path / "store" / "checkpoints" / owner).mkdir(parents=True)
    path = tmp_path / "store" / "checkpoints" / owner / "0.pt"
    path.write_bytes(pickle.dumps({"owner": owner, "slot": 0, "state": _Payload()}, protocol=2))
    assert checkpoints.load(owner, 0) is None  # weights_only: the object is never built
    path.write_bytes(b"not a checkpoint")
    assert checkpoints.load(owner, 0) is None
    assert "unreadable" in caplog.text
    row = run_trial(sweep, spec, store)
    assert stable(row) == stable(run_trial(sweep, spec, ArtifactStore(tmp_path / "reference")))


# --- a real Ray sweep whose worker is killed ----------------------------------------------------


@pytest.mark.slow  # Ray: about a minute on two cores
def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path):
    import ray

    from orchestrator import results
    from orchestrator.sweep import run_sweep
    from tests.plugins.dies_once import KILL_AT

    folder = tmp_path / "dies_once"
    folder.mkdir()
    os.environ["INSTILL_TEST_DIES_ONCE"] = str(folder)  # inherited by the Ray workers started below
    try:
        sweep = load_sweep(
            tiny_raw(
                plugins=["tests.plugins.dies_once"],
                methods=["scratch", "dies_once"],  # dies_once is scratch bit for bit
                training={"epochs": 6, "batch_size": 10},
                # pack 1: scratch trains serially, as dies_once does (a pack is not checkpointed inside)
                resources={"checkpoint_every_s": 0, "pack": 1},
                max_failures=1,
            )
        )
        ray.shutdown()
        # A Ray of its own (not one another process started on this machine), whose workers see the variable.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        outcome = run_sweep(sweep, tmp_path / "out")
    finally:
        ray.shutdown()
        os.environ.pop("INSTILL_TEST_DIES_ONCE")

    assert (folder / "killed").exists(), "the worker was killed"
    attempts: dict[str, list[int]] = {}
    for line in (folder / "epochs.log").read_text().split("\n"):
        if line:
            pid, epoch = line.split()
            attempts.setdefault(pid, []).append(int(epoch))
    assert list(attempts.values()) == [list(range(1, KILL_AT + 1)), list(range(KILL_AT, 7))], attempts

    assert outcome.failed == 0
    table = results.read(tmp_path / "out" / "results.parquet").set_index("method")
    assert (table["status"] == "done").all()
    for column in ("test_acc", "val_acc", "best_epoch", "epochs_run", "measurements_json"):
        assert table.loc["dies_once", column] == table.loc["scratch", column], column
    assert math.isfinite(table.loc["dies_once", "test_acc"])
    assert CheckpointStore(ArtifactStore(tmp_path / "out" / "artifacts")).owners() == []

    # Live curves: each trial's result.json holds one result per epoch, and TensorBoard files.
    [run_dir] = (tmp_path / "out" / "tune").iterdir()
    [scratch_dir] = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("scratch")]
    results_json = [json.loads(line) for line in (scratch_dir / "result.json").read_text().splitlines()]
    epochs = [r for r in results_json if r.get("stage") == "epoch" and r.get("fit") == "train"]
    assert [r["epoch"] for r in epochs] == list(range(1, 7))
    assert all({"train/val_score", "train/loss", "train/ce"} <= set(r) for r in epochs)
    assert list(scratch_dir.glob("events.out.tfevents*")), "TensorBoard logs"
