"""End to end on a real local Ray: the smoke sweep of the spine issue."""

import json

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from orchestrator import results
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.sweep import run_sweep
from orchestrator.trial import expand, upstream_keys
from tests.conftest import tiny_raw


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from orchestrator.sweep import start_ray

    start_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def smoke(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    sweep = load_sweep(
        tiny_raw(
            methods=["subtask_induction", "sampled_subnetwork", "scratch"],
            sparsities=[0.5, 0.8],
            data_fractions=[0.2, 1.0],
            seeds=[0, 1],
        )
    )
    outcome = run_sweep(sweep, out)
    return sweep, out, outcome


def test_smoke_sweep_writes_the_documented_table(smoke):
    sweep, out, outcome = smoke
    specs = expand(sweep)
    assert len(specs) == 2 * 2 * 2 * 2 + 2 * 2  # 16 masked trials + 4 scratch trials
    assert outcome.ran == len(specs) and outcome.failed == 0
    table = pq.read_table(out / "results.parquet").to_pandas()
    assert len(table) == len(specs)
    assert list(table.columns[:9]) == [*results.IDENTIFYING, "mask.sparsity"]  # the grid point, then its axes
    for col in results.COLUMNS + ["splits_test_acc_2a2", "splits_test_acc_2b2"]:
        assert col in table.columns, col
    assert (table["status"] == "done").all()
    assert table["test_acc"].between(0, 1).all()
    masked = table[table["method"] != "scratch"]
    assert ((masked["mask_density"] - (1 - masked["mask.sparsity"])).abs() <= 0.005).all()
    assert table.loc[table["method"] == "scratch", "mask.sparsity"].isna().all()
    assert table["trial_hash"].nunique() == len(specs)
    assert table.groupby(["method", "mask.sparsity", "n_train"], dropna=False)["series"].nunique().eq(1).all()
    assert json.loads(table["config_json"].iloc[0])["task"]["name"] == "modular_arithmetic"
    assert "torch" in json.loads(table["versions"].iloc[0])
    # readable by pandas, pyarrow and duckdb alike
    assert len(pd.read_parquet(out / "results.parquet")) == len(specs)
    count = duckdb.sql(f"select count(*) from read_parquet('{out / 'results.parquet'}')").fetchall()[0][0]
    assert count == len(specs)


@pytest.fixture(scope="module")
def side_by_side(ray_local, tmp_path_factory):
    """Four trials of a method whose trials wait (up to 180 s: a loaded machine starts workers slowly)
    until two of them have started."""
    tmp = tmp_path_factory.mktemp("side_by_side")
    folder = tmp / "rendezvous"
    folder.mkdir()
    sweep = load_sweep(
        tiny_raw(
            plugins=["tests.plugins.rendezvous"],
            methods=["rendezvous"],
            rendezvous={"folder": str(folder), "parties": 2, "timeout_s": 180},
            seeds=[0, 1, 2, 3],
        )
    )
    outcome = run_sweep(sweep, tmp / "out")
    return tmp / "out", folder, outcome


def test_trials_ran_side_by_side(side_by_side):
    out, folder, outcome = side_by_side
    assert outcome.ran == 4 and outcome.failed == 0
    assert not list(folder.glob("alone-*")), "a trial waited out its timeout: trials ran one at a time"
    assert len(list(folder.glob("met-*"))) == 4
    table = results.read(out / "results.parquet")
    spans = list(zip(table["started_at"], table["finished_at"], strict=True))
    overlapping = sum(s1 < e2 and s2 < e1 for i, (s1, e1) in enumerate(spans) for s2, e2 in spans[i + 1 :])
    assert overlapping >= 1, "no two trials ran at the same time"
    assert table["worker"].nunique() >= 2, "trials ran in at least two worker processes"


def test_trial_output_goes_to_per_trial_logs(smoke):
    _, out, _ = smoke
    table = results.read(out / "results.parquet")
    texts = [log.read_text() for log in (out / "tune").rglob("stdout")]
    assert 1 <= len(texts) <= len(table)  # one per Tune trial, which may run a group of ours
    for name in table["trial"]:
        assert len([t for t in texts if f"[{name}] stage done" in t]) == 1, name


def test_upstream_work_is_computed_once_per_distinct_key(smoke):
    sweep, out, _ = smoke
    done = ArtifactStore(out / "artifacts").computations()
    keys = {k for spec in expand(sweep) for k in upstream_keys(sweep, spec)}
    assert sorted((c["kind"], c["key"]) for c in done) == sorted(keys)
    assert len([k for k in keys if k[0] == "source"]) == 2
    assert len([k for k in keys if k[0] == "mask"]) == 4
    # each seed's two sparsities come from one discovery run (tests/methods/test_discovery.py)
    assert [meta.get("computed_with") for _, meta, _ in ArtifactStore(out / "artifacts").entries("mask")] == [2] * 4
    pids = {c["pid"] for c in done}
    assert len(pids) >= 1


def test_rerun_resumes_without_redoing_work(smoke):
    sweep, out, first = smoke
    again = run_sweep(sweep, out)
    assert again.ran == 0 and again.skipped == len(expand(sweep))
    pd.testing.assert_frame_equal(again.table, first.table)


def test_a_grown_sweep_runs_only_its_new_trials(smoke):
    """Adding a seed (and changing a resource) reruns nothing that already finished."""
    sweep, out, first = smoke
    raw = sweep.canonical()
    raw["seeds"] = [0, 1, 2]
    raw["resources"] = {**raw["resources"], "max_concurrent": 1}
    grown = load_sweep(raw)
    again = run_sweep(grown, out)
    new = [s for s in expand(grown) if s.seed == 2]
    assert again.ran == len(new) and again.skipped == len(expand(sweep)) and again.failed == 0
    table = again.table.set_index("trial")
    old = first.table.set_index("trial")
    assert (table.loc[old.index, "finished_at"] == old["finished_at"]).all(), "finished rows were not rerun"
    assert (table["status"] == "done").all() and len(table) == len(expand(grown))
