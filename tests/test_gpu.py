"""GPU behaviour; skipped on machines without CUDA (see docs/PERFORMANCE.md for recorded runs)."""

import pytest
import torch

from orchestrator.artifacts import ArtifactStore
from orchestrator.trial import TrialSpec, pick_device, run_trial

pytestmark = pytest.mark.gpu


def test_device_is_cuda_when_a_gpu_is_assigned(tiny):
    assert pick_device(tiny(resources={"gpu": 0.25})).type == "cuda"


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_trial_runs_on_gpu(tiny, tmp_path, mixed_precision):
    sweep = tiny(resources={"gpu": 1, "mixed_precision": mixed_precision})
    row = run_trial(
        sweep,
        TrialSpec(method="subtask_induction", axes={"mask.sparsity": 0.5}, data_fraction=0.5, seed=0),
        ArtifactStore(tmp_path),
    )
    assert row["device"] == "cuda" and 0 <= row["test_acc"] <= 1


def test_transfer_is_exact_on_gpu(tiny):
    from methods.masking import MaskSelection, maskable_names, topk_mask
    from methods.transfer import TransferConfig, transfer
    from orchestrator.trial import fresh_model

    sweep = tiny()
    task = sweep.build_task()
    source = fresh_model(sweep, task, 0, "a").cuda()
    fresh = fresh_model(sweep, task, 0, "b").cuda()
    names = maskable_names(source, MaskSelection())
    params = dict(source.named_parameters())
    mask = topk_mask({n: torch.rand(params[n].shape) for n in names}, 0.5)
    model = transfer(source, fresh, mask, TransferConfig())
    eff = model.effective_weights()
    for n, m in mask.items():
        assert torch.equal(eff[n][m.cuda()], params[n][m.cuda()])


def test_quarter_gpus_pack_four_trials(tmp_path):
    import ray

    from orchestrator.config import load_sweep
    from orchestrator.sweep import run_sweep
    from tests.conftest import tiny_raw

    sweep = load_sweep(
        tiny_raw(
            resources={"gpu": 0.25, "cpu": 1},
            methods=["scratch"],
            data_fractions=[0.25, 0.5, 0.75, 1.0],
            training={"epochs": 30},
        )
    )
    ray.shutdown()
    outcome = run_sweep(sweep, tmp_path, num_cpus=4)
    ray.shutdown()
    table = outcome.table
    assert (table["device"] == "cuda").all()
    spans = sorted(zip(table["started_at"], table["finished_at"], strict=True))
    latest_start = max(s for s, _ in spans)
    earliest_end = min(e for _, e in spans)
    assert latest_start < earliest_end, "all four trials should run at once on one GPU"


def test_a_pack_trains_on_gpu_like_its_trials_alone(tiny, tmp_path):
    from orchestrator.trial import expand, run_pack

    sweep = tiny(
        methods=["subtask_induction", "sampled_subnetwork", "scratch"],
        seeds=[0, 1, 2],
        model={"dropout": 0.0},
        resources={"gpu": 1, "pack": "auto"},
    )
    specs = expand(sweep)
    store = ArtifactStore(tmp_path)
    alone = [run_trial(sweep, spec, store) for spec in specs]
    packed = run_pack(sweep, specs, store, limit=64)
    for a, p in zip(alone, packed, strict=True):
        assert isinstance(p, dict), p
        assert p["device"] == "cuda" and p["pack"] == (6 if p["method"] != "scratch" else 3)
        # CUDA kernels are not bitwise deterministic: one of 50 validation examples may flip.
        assert abs(p["val_acc"] - a["val_acc"]) <= 0.021 and abs(p["test_acc"] - a["test_acc"]) <= 0.021


def test_calibration_on_gpu_measures_memory_and_packs_more_than_one(tiny):
    from methods.packing import calibrate
    from methods.training import TrainConfig, cross_entropy
    from orchestrator.trial import fresh_model

    sweep = tiny()
    task = sweep.build_task()
    model = fresh_model(sweep, task, 0, "init").cuda()
    data = task.downstream_data(0, 1.0)
    found = calibrate(cross_entropy(model, data), data, TrainConfig(batch_size=26), 64)
    assert found.bytes_per_model is not None and found.bytes_per_model > 0
    assert found.k > 1, found  # a tiny model on a GPU: packing must pay
    print(found)


def test_sources_of_three_seeds_train_as_one_pack_on_gpu_with_dropout(tiny, tmp_path):
    # Each model's dropout masks come from a CUDA generator of its own.
    from orchestrator.trial import Upstream, expand, pick_device

    sweep = tiny(
        methods=["subtask_induction"],
        seeds=[0, 1, 2],
        model={"dropout": 0.1},
        resources={"gpu": 1, "pack_upstream": True},
    )
    store = ArtifactStore(tmp_path)
    up = Upstream(sweep, expand(sweep)[0], store, pick_device(sweep))
    assert up.device.type == "cuda" and up.key("source")["packed"] is True
    up.compute_shared("source", [{"seed": s} for s in sweep.seeds])
    entries = store.entries("source")
    assert len(entries) == 3 and all(meta["pack"] == 3 for _, meta, _ in entries)
