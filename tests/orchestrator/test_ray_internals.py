"""The patches of Ray internals, one test each: it fails when a Ray upgrade breaks what the patch
relies on (written against Ray 2.60.0). Everything else in orchestrator/ uses Ray's public API."""

import inspect
import signal


def test_start_ray_keeps_the_drivers_sigterm_handler_through_ray_init():
    from ray._private import utils, worker

    from orchestrator.ray_session import _keep_signal_handlers

    assert "ray._private.utils.set_sigterm_handler(" in inspect.getsource(worker.init), "ray.init sets it elsewhere"
    before = signal.getsignal(signal.SIGTERM)
    with _keep_signal_handlers():
        utils.set_sigterm_handler(lambda signum, frame: None)  # what ray.init does
    assert signal.getsignal(signal.SIGTERM) is before


def test_forget_results_empties_what_tune_keeps_of_a_finished_trial():
    from ray.tune.experiment import Trial

    from orchestrator.callbacks import forget_results

    trial = Trial("__fake", config={}, stub=True)
    trial.run_metadata.last_result = {"stage": "done", "rows_json": "[...]", "done": True}
    trial.run_metadata.update_metric("val_acc", 0.5)
    assert trial.metric_analysis and trial.metric_n_steps
    forget_results(trial)
    assert "rows_json" not in trial.last_result and trial.last_result["stage"] == "done"
    assert trial.metric_analysis == {} and trial.metric_n_steps == {}


def test_tune_still_passes_the_result_buffer_settings_swapped():
    """orchestrator.tuner.TUNE_DEFAULTS is written for this bug; once fixed, swap its values."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.trainable import Trainable

    assert list(inspect.signature(Trainable.train_buffered).parameters)[1:3] == ["buffer_time_s", "max_buffer_length"]
    assert "args = (buffer_length, buffer_time_s)" in inspect.getsource(TuneController._schedule_trial_train)


def test_a_worker_killed_for_memory_reaches_tune_as_an_actor_death():
    """orchestrator.worker_loss: Tune's actor manager raises on a Ray error other than an actor's or a
    task's (the memory monitor's OutOfMemoryError), ending the driver; patched, it passes it on."""
    from unittest import mock

    from ray.air.execution._internal.actor_manager import RayActorManager
    from ray.exceptions import OutOfMemoryError

    from orchestrator.worker_loss import WorkerLost, survive_worker_loss

    survive_worker_loss()
    assert "raise RuntimeError" in inspect.getsource(inspect.unwrap(RayActorManager._actor_task_failed)), (
        "Ray no longer raises on unexpected errors: orchestrator.worker_loss may go"
    )
    for method, first in [("_actor_task_failed", "tracked_actor_task"), ("_actor_start_failed", "tracked_actor")]:
        assert list(inspect.signature(getattr(RayActorManager, method)).parameters) == ["self", first, "exception"]
    assert "self._live_actors_to_ray_actors_resources" in inspect.getsource(RayActorManager.__init__)
    manager, task = mock.MagicMock(), mock.MagicMock()
    manager._live_actors_to_ray_actors_resources = {}
    RayActorManager._actor_task_failed(manager, task, OutOfMemoryError("1 worker(s) were killed"))
    for callback in (task._tracked_actor._on_error, task._on_error):  # Tune's actor and task callbacks
        [(_, error)] = [c.args for c in callback.call_args_list]
        assert isinstance(error, WorkerLost) and "OutOfMemoryError: 1 worker(s) were killed" in str(error)
    manager._cleanup_actor.assert_called_once_with(tracked_actor=task._tracked_actor)
