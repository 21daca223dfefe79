"""A later run of the same sweep reruns only the trials that failed; finished trials are kept as
they were (same row, same finish time, not run again) and their upstream artifacts are reused."""

import collections

import pytest
import yaml

from orchestrator import results
from orchestrator.artifacts import ArtifactStore
from orchestrator.cli import main
from tests.conftest import tiny_raw
from tests.plugins.flaky_task import FAILING_SEEDS


def _calls(folder) -> collections.Counter:
    """Calls of the flaky task's downstream data per seed, from its log (see tests/plugins/flaky_task.py)."""
    return collections.Counter(p.name.split("-")[0] for p in (folder / "calls").glob("seed*"))


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    import ray

    folder = tmp_path / "flaky"
    folder.mkdir()
    monkeypatch.setenv("INSTILL_TEST_FLAKY", str(folder))
    ray.shutdown()  # the Ray workers of this test must see the variable
    yield folder
    ray.shutdown()


@pytest.mark.slow
def test_a_later_run_reruns_only_the_failed_trials(tmp_path, flaky, capsys):
    raw = tiny_raw(
        plugins=["tests.plugins.flaky_task"],
        methods=["subtask_induction", "scratch"],
        data_fractions=[0.5, 1.0],
        seeds=[0, 1],
        max_failures=0,
    )
    raw["task"] = {**raw["task"], "name": "arithmetic_flaky"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    argv = ["run", str(path), "--out", str(out), "--num-cpus", "2", "--no-report"]

    assert main(argv) == 1, "the first run has failed trials"
    first = results.read(out / "results.parquet").set_index("trial")
    failed = first.index[first["seed"].isin(FAILING_SEEDS)]
    done = first.index[~first["seed"].isin(FAILING_SEEDS)]
    assert len(first) == 8 and len(failed) == len(done) == 4
    assert (first.loc[failed, "status"] == "failed").all()
    assert first.loc[failed, "error"].str.contains("deliberate failure").all()
    assert (first.loc[done, "status"] == "done").all()
    calls_first = _calls(flaky)
    computed_first = len(ArtifactStore(out / "artifacts").computations())
    assert computed_first == 2 + 2  # a source and a mask per seed: the failure is downstream

    (flaky / "fixed").touch()
    capsys.readouterr()
    assert main(argv) == 0
    assert "4 trials run, 4 already done, 0 failed" in capsys.readouterr().out
    second = results.read(out / "results.parquet").set_index("trial")
    assert sorted(second.index) == sorted(first.index)
    assert (second["status"] == "done").all()
    # Finished trials were not run again: same rows, same finish times, no new calls for their seeds.
    for column in ("finished_at", "started_at", "val_acc", "test_acc", "worker"):
        assert second.loc[done, column].tolist() == first.loc[done, column].tolist(), column
    calls_second = _calls(flaky)
    for seed in {int(s) for s in first.loc[done, "seed"]}:
        assert calls_second[f"seed{seed}"] == calls_first[f"seed{seed}"], "a finished trial ran again"
    # The failed ones ran once more each, after the first run.
    for seed in FAILING_SEEDS:
        assert calls_second[f"seed{seed}"] == calls_first[f"seed{seed}"] + 4
    assert (second.loc[failed, "finished_at"] > first.loc[done, "finished_at"].max()).all()
    # Their source models and masks came from the store.
    assert len(ArtifactStore(out / "artifacts").computations()) == computed_first
