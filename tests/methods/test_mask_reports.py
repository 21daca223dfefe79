"""The mask kind's report extras: overlap of discovered masks read from artifact stores, against random
masks of the same densities, and the sparsity-against-subtask figure."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from methods.mask_reports import load_masks, mask_overlap
from orchestrator.artifacts import ArtifactStore
from orchestrator.report import artifact_roots, write_report
from orchestrator.report.render import stored_artifacts
from tests.orchestrator.report.synthetic import curves_table, write_results

N_WEIGHTS = 1000  # a mask over a 600-vector and a 20 x 20 matrix, flattened together


def _mask_key(seed: int, sparsity: float, l0: float = 1e-3) -> dict:
    source = {"task": {"name": "t"}, "model": {"name": "mlp"}, "training": {"lr": 5e-4}, "seed": seed}
    reads = {"discovery": {"l0_lambda": l0}, "mask": {"sparsity": sparsity}}
    return {"source": source, "subtask": {"name": "t"}, "reads": reads}


def _store_mask(store: ArtifactStore, key: dict, ones: slice) -> None:
    flat = torch.zeros(N_WEIGHTS, dtype=torch.bool)
    flat[ones] = True
    tensors = {"a.weight": flat[:600].clone(), "b.weight": flat[600:].reshape(20, 20).clone()}
    store.get_or_compute("mask", key, lambda: (tensors, {"density": flat.float().mean().item()}))


def test_artifact_store_lists_its_entries(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    assert store.entries("mask") == []
    _store_mask(store, _mask_key(0, 0.5), slice(0, 500))
    [(key, meta, path)] = store.entries("mask")
    assert key == _mask_key(0, 0.5) and meta["density"] == 0.5 and path == store.path("mask", key)


def test_mask_overlap_across_seeds_and_sparsities_against_random_masks(tmp_path):
    out = tmp_path / "run"
    write_results(out, curves_table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.5))
    store_root = tmp_path / "elsewhere"  # sweep.json points the store away from OUT/artifacts
    (out / "sweep.json").write_text(json.dumps({"config": {"storage": {"artifacts": str(store_root)}}}))
    store = ArtifactStore(store_root)
    _store_mask(store, _mask_key(0, 0.5), slice(0, 500))
    _store_mask(store, _mask_key(1, 0.5), slice(100, 600))  # |A∩B| = 400, |A∪B| = 600
    _store_mask(store, _mask_key(0, 0.75), slice(0, 250))  # inside seed 0's 0.5 mask: 250 / 500
    report = write_report([out])
    overlap = pd.read_parquet(report / "mask_overlap.parquet")
    seeds = overlap[overlap["pair"] == "across seeds"].iloc[0]
    assert (seeds["seed_a"], seeds["seed_b"], seeds["sparsity_a"]) == (0, 1, 0.5)
    assert seeds["jaccard"] == pytest.approx(400 / 600)
    assert seeds["jaccard_random"] == pytest.approx(0.25 / 0.75)
    sparsities = overlap[overlap["pair"] == "across sparsities"].iloc[0]
    assert (sparsities["sparsity_a"], sparsities["sparsity_b"], sparsities["seed_a"]) == (0.5, 0.75, 0)
    assert sparsities["jaccard"] == pytest.approx(0.5)
    assert sparsities["jaccard_random"] == pytest.approx(0.5 * 0.25 / (0.5 + 0.25 - 0.5 * 0.25))
    assert len(overlap) == 2  # seed 1 @0.5 and seed 0 @0.75 differ in both: not a pair
    assert (report / "mask_overlap.png").exists() and (report / "mask_overlap.svg").exists()
    assert "mask_overlap.svg" in (report / "index.html").read_text()
    assert "Mask overlap" in (report / "summary.md").read_text()


def test_masks_of_other_discovery_settings_are_not_paired(tmp_path):
    store = ArtifactStore(tmp_path / "run" / "artifacts")
    _store_mask(store, _mask_key(0, 0.5, l0=1e-3), slice(0, 500))
    _store_mask(store, _mask_key(1, 0.5, l0=1e-2), slice(0, 500))
    stored = stored_artifacts(artifact_roots([tmp_path / "run"]))("mask")
    assert len(stored) == 2 and mask_overlap(load_masks(stored), lambda families: [""] * len(families)).empty


def test_no_mask_overlap_figure_with_fewer_than_two_masks(tmp_path):
    out = tmp_path / "run"
    write_results(out, curves_table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.5))
    _store_mask(ArtifactStore(out / "artifacts"), _mask_key(0, 0.5), slice(0, 500))
    report = write_report([out])
    assert not (report / "mask_overlap.png").exists() and not (report / "mask_overlap.parquet").exists()
    assert "mask_overlap.svg" not in (report / "index.html").read_text()


def test_a_report_rebuilt_from_its_folder_without_the_masks_keeps_their_overlap(tmp_path):
    """A committed report folder holds its rows but not the masks: rebuilding it from itself keeps the
    mask overlap it was made with, and says so, rather than dropping the section."""
    out = tmp_path / "run"
    write_results(out, curves_table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.5))
    store = ArtifactStore(out / "artifacts")
    _store_mask(store, _mask_key(0, 0.5), slice(0, 500))
    _store_mask(store, _mask_key(1, 0.5), slice(100, 600))
    committed = tmp_path / "docs" / "run"
    write_report([out], committed)
    shutil.copy(out / "results.parquet", committed / "results.parquet")
    first = pd.read_parquet(committed / "mask_overlap.parquet")
    write_report([committed], committed)  # no artifacts beside it
    again = pd.read_parquet(committed / "mask_overlap.parquet")
    pd.testing.assert_frame_equal(first, again)
    summary = (committed / "summary.md").read_text()
    assert "Mask overlap" in summary and "its masks are not in these folders" in summary
    (committed / "mask_overlap.parquet").unlink()
    write_report([committed], committed)  # nothing to keep: no section
    assert "Mask overlap" not in (committed / "summary.md").read_text()


def test_a_run_whose_masks_no_longer_pair_does_not_reuse_its_last_overlap_table(tmp_path):
    out = tmp_path / "run"
    write_results(out, curves_table({"subtask_induction": {0: [0.3, 0.35], 99: [0.95, 0.9]}}, 0.5))
    store = ArtifactStore(out / "artifacts")
    _store_mask(store, _mask_key(0, 0.5), slice(0, 500))
    _store_mask(store, _mask_key(1, 0.5), slice(100, 600))
    report = write_report([out])  # OUT/report/, which the next report reads as the previous one
    assert "Mask overlap" in (report / "summary.md").read_text()
    [(_, _, path)] = [entry for entry in store.entries("mask") if entry[0]["source"]["seed"] == 1]
    Path(path).unlink()
    write_report([out])  # one mask left: no pair, and the old table is not reused
    assert "Mask overlap" not in (report / "summary.md").read_text()
