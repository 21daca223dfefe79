"""A trial whose worker process dies is a failed trial, not the end of the sweep.

A worker dies when the OS or Ray's memory monitor kills it for lack of memory, on a SIGKILL or a
segfault. Ray tells Tune with a `RayActorError` (`ActorDiedError`): Tune ends that Tune trial with
an error, and `orchestrator.callbacks` hands its unfinished trials back to the queue, then gives
them failed rows (`death_message`) once their tries are spent; a rerun of `instill run` retries
them. Trials packed in one worker (`resources.pack`) die together and fail alike.

A worker killed by Ray's memory monitor is reported as `ray.exceptions.OutOfMemoryError` instead,
which Tune's actor manager does not expect: it raised "Caught unexpected exception" out of
`Tuner.fit` and ended the whole driver. `survive_worker_loss` patches a Ray internal, written
against Ray 2.60.0: `RayActorManager._actor_task_failed` passes a `RayActorError` or a
`RayTaskError` on to Tune and raises on any other error; `_actor_start_failed` passes any on. In
both, any other Ray error becomes a `WorkerLost` (a `RayActorError`, which Tune reads as the
worker's death) and its worker is killed, if it still lives.
tests/orchestrator/test_ray_internals.py fails if what it relies on changes.
"""

from __future__ import annotations

import functools

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

WORKER_DIED = (
    "the worker running this trial died (killed by the OS or Ray's memory monitor: out of memory?); "
    "rerun `instill run` to retry it, or lower resources.pack / run fewer sweeps at once"
)


class WorkerLost(RayActorError):
    """A worker Ray reported lost with another error than `RayActorError` (`OutOfMemoryError`,
    `WorkerCrashedError`, `NodeDiedError`, ...), as the `RayActorError` Tune handles."""

    def __init__(self, error_msg: str = RayActorError.BASE_ERROR_MSG):
        super().__init__(error_msg=error_msg)


def as_worker_lost(error: BaseException) -> BaseException:
    """`error` as Tune expects it: a Ray error other than a task's or an actor's becomes `WorkerLost`."""
    if isinstance(error, RayError) and not isinstance(error, (RayActorError, RayTaskError)):
        return WorkerLost(f"{type(error).__name__}: {error}")
    return error


def survive_worker_loss() -> None:
    """Patch Tune's actor manager (in this process, once) so that a lost worker ends its Tune trial
    with an error instead of the whole `Tuner.fit`."""
    from ray.air.execution._internal.actor_manager import RayActorManager

    if getattr(RayActorManager._actor_task_failed, "_instill", False):
        return

    task_failed, start_failed = RayActorManager._actor_task_failed, RayActorManager._actor_start_failed

    @functools.wraps(task_failed)
    def _actor_task_failed(self, tracked_actor_task, exception):
        lost = as_worker_lost(exception)
        if lost is not exception:
            _kill(self, tracked_actor_task._tracked_actor)
        return task_failed(self, tracked_actor_task, lost)

    @functools.wraps(start_failed)
    def _actor_start_failed(self, tracked_actor, exception):
        lost = as_worker_lost(exception)
        if lost is not exception:
            _kill(self, tracked_actor)
        return start_failed(self, tracked_actor, lost)

    _actor_task_failed._instill = _actor_start_failed._instill = True
    RayActorManager._actor_task_failed = _actor_task_failed
    RayActorManager._actor_start_failed = _actor_start_failed


def _kill(manager, tracked_actor) -> None:
    """Make sure the worker Tune is told is lost is gone (one killed for memory already is)."""
    handle = manager._live_actors_to_ray_actors_resources.get(tracked_actor, (None, None))[0]
    if handle is not None:
        try:
            ray.kill(handle, no_restart=True)
        except (RayError, ValueError):  # already gone (ray.kill raises ValueError for a dead handle)
            pass


def death_message(error: BaseException | None) -> str | None:
    """`WORKER_DIED` and Ray's own words (their first telling line), where `error` says the trial's
    worker died; None for any other error (one raised in the trial's code, or in its worker's start)."""
    if not isinstance(error, RayActorError) or error.actor_init_failed:
        return None
    plain = {RayActorError.BASE_ERROR_MSG, ActorDiedError.BASE_ERROR_MSG}
    # Skipped: the plain first line of an ActorDiedError and its indented fields (pid, ip, ...).
    told = [line.strip() for line in str(error).splitlines() if line.strip() and not line[0].isspace()]
    detail = _sentences(next((line for line in told if line not in plain), ""), DETAIL_CHARS)
    return f"{WORKER_DIED} [Ray: {detail}]" if detail else WORKER_DIED


DETAIL_CHARS = 240  # Ray's words in a row's error: its first sentences (how the worker died), not its advice


def _sentences(text: str, limit: int) -> str:
    """The first sentences of `text` that fit in `limit` characters (at least the first, cut)."""
    kept = ""
    for sentence in text.split(". "):
        joined = f"{kept}. {sentence}" if kept else sentence
        if len(joined) > limit:
            return kept + "." if kept else sentence[: limit - 3] + "..."
        kept = joined
    return kept
