"""A trial whose worker process dies (killed for memory, SIGKILL, segfault) is a failed trial with a
clear error; the other trials go on, and the next `instill run` retries it (orchestrator.worker_loss)."""

import os

import pytest

from orchestrator.worker_loss import WORKER_DIED, WorkerLost, as_worker_lost, death_message

# What Ray's memory monitor reports for the worker it killed (its first line; the rest lists processes).
OOM = (
    "1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, "
    "ID: 42) was 22.36GB used / 23.54GB limit (0.949894)\nOOM kill reason: Memory usage exceeded threshold"
)


def test_a_worker_lost_for_memory_reads_as_an_actor_death_with_a_clear_message():
    from ray import cloudpickle
    from ray.exceptions import ActorDiedError, OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

    lost = as_worker_lost(OutOfMemoryError(OOM))
    assert isinstance(lost, RayActorError) and not lost.actor_init_failed
    assert isinstance(as_worker_lost(WorkerCrashedError()), WorkerLost)
    task_error = RayTaskError("f", "Traceback ...", ValueError("bad"))
    assert as_worker_lost(task_error) is task_error, "an error raised in the trial's code stays as it is"
    # Tune pickles a trial's error; the driver reads it back to write the rows.
    message = death_message(cloudpickle.loads(cloudpickle.dumps(lost)))
    assert message == f"{WORKER_DIED} [Ray: OutOfMemoryError: 1 worker(s) were killed due to the node running low on " \
        "memory. Memory on the node (IP: 192.0.2.2, ID: 42) was 22.36GB used / 23.54GB limit (0.949894)]"  # fmt: skip
    assert death_message(ActorDiedError()) == WORKER_DIED
    assert death_message(ActorDiedError.from_task_error(task_error)) is None, "its start raised: not a death"
    assert death_message(ValueError("bad")) is None and death_message(None) is None


# --- on Ray ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killer(tmp_path_factory):
    """A Ray of its own whose workers see $INSTILL_TEST_KILL (tests.plugins.kills_its_worker)."""
    import ray

    folder = tmp_path_factory.mktemp("kill")
    os.environ["INSTILL_TEST_KILL"] = str(folder)
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield folder
    ray.shutdown()
    os.environ.pop("INSTILL_TEST_KILL")


def _sweep(**overrides):
    from orchestrator.config import load_sweep
    from tests.conftest import tiny_raw

    return load_sweep(
        tiny_raw(
            plugins=["tests.plugins.kills_its_worker"],
            methods=["scratch", "kills_its_worker"],  # kills_its_worker is scratch, when it lives
            data_fractions=[0.5, 1.0],
            **overrides,
        )
    )


def _kills(folder) -> list[str]:
    log = folder / "kills.log"
    return log.read_text().split("\n")[:-1] if log.exists() else []


@pytest.fixture
def memory_monitor(monkeypatch):
    """Deaths reported as Ray's memory monitor reports the workers it kills: `OutOfMemoryError`, not
    `ActorDiedError` (which Tune 2.60 did not expect: "Caught unexpected exception" ended the driver)."""
    from ray.air.execution._internal.event_manager import RayEventManager
    from ray.exceptions import ActorDiedError, OutOfMemoryError

    resolve = RayEventManager.resolve_future

    def resolve_future(self, future):
        on_result, on_error = self._tracked_futures.get(future, (None, None))
        if on_error is not None:

            def as_oom(error, on_error=on_error):
                died = isinstance(error, ActorDiedError) and not error.actor_init_failed
                on_error(OutOfMemoryError(OOM) if died else error)

            self._tracked_futures[future] = (on_result, as_oom)
        return resolve(self, future)

    monkeypatch.setattr(RayEventManager, "resolve_future", resolve_future)


@pytest.mark.slow  # Ray: about a minute on two cores
def test_a_trial_killed_for_memory_fails_the_others_finish_and_a_rerun_retries_it(killer, memory_monitor, tmp_path):
    from orchestrator import results
    from orchestrator.sweep import run_sweep

    sweep = _sweep(seeds=[0], resources={"pack": 1, "group": 1}, max_failures=1)
    (killer / "armed").write_text("")  # at every budget
    outcome = run_sweep(sweep, tmp_path / "out")

    assert len(_kills(killer)) == 4, "each trial of kills_its_worker died, and again on its retry"
    assert outcome.failed == 2 and outcome.ran == 4
    table = results.read(tmp_path / "out" / "results.parquet").set_index(["method", "data_fraction"])
    assert (table.loc["scratch", "status"] == "done").all()
    killed = table.loc["kills_its_worker"]
    assert (killed["status"] == "failed").all()
    for error in killed["error"]:
        assert error.startswith(WORKER_DIED) and "OutOfMemoryError: 1 worker(s) were killed" in error, error

    (killer / "armed").unlink()
    again = run_sweep(sweep, tmp_path / "out")
    assert (again.ran, again.skipped, again.failed) == (2, 2, 0), "the rerun retries the failed trials only"
    table = results.read(tmp_path / "out" / "results.parquet").set_index(["method", "data_fraction"])
    assert (table["status"] == "done").all()
    assert len(_kills(killer)) == 4


@pytest.mark.slow  # Ray: about a minute on two cores
def test_packed_trials_die_together_and_fail_with_the_same_error(killer, tmp_path):
    from orchestrator import results
    from orchestrator.sweep import run_sweep
    from orchestrator.trial import expand

    sweep = _sweep(seeds=[0, 1], resources={"pack": 4}, max_failures=0)
    task = expand(sweep)[0].config(sweep).build_task()
    whole = len(task.downstream_data(0, 1.0).train.x)
    assert whole != len(task.downstream_data(0, 0.5).train.x)
    (killer / "armed").write_text(f"{whole}\n")  # only the pack of the whole budget dies
    (killer / "kills.log").unlink(missing_ok=True)
    outcome = run_sweep(sweep, tmp_path / "out")

    assert len(_kills(killer)) == 1, "one worker died, with its pack"
    assert outcome.failed == 4 and outcome.ran == 8
    table = results.read(tmp_path / "out" / "results.parquet")
    died, lived = table[table["data_fraction"] == 1.0], table[table["data_fraction"] == 0.5]
    assert (lived["status"] == "done").all() and lived["packed"].all() and (lived["pack"] == 4).all()
    assert (died["status"] == "failed").all() and died["error"].nunique() == 1
    assert died["error"].iloc[0].startswith(WORKER_DIED), died["error"].iloc[0]

    (killer / "armed").unlink()
    again = run_sweep(sweep, tmp_path / "out")
    assert (again.ran, again.skipped, again.failed) == (4, 4, 0)
    assert (results.read(tmp_path / "out" / "results.parquet")["status"] == "done").all()
