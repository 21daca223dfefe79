"""The Ray session: join a cluster, or start the embedded local Ray quietly."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any


def start_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at `address`, or start a quiet local Ray (the embedded default)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The legacy console reporter honours verbose=0; the new one prints tables regardless.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # The sweep handles SIGINT itself (orchestrator.stop): Tune's own handler would end the run at once.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    with _keep_signal_handlers():
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": always a new Ray of our own, never a cluster that `ray start` left on this machine.
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)


@contextlib.contextmanager
def _keep_signal_handlers():
    """Keep the sweep's SIGTERM handler (orchestrator.stop) through `ray.init`. A patch of a Ray
    internal, written against Ray 2.60.0: `ray.init` sets SIGTERM to `sys.exit` through
    `ray._private.utils.set_sigterm_handler`, and no public API turns that off.
    tests/orchestrator/test_ray_internals.py fails when Ray stops setting it that way."""
    from ray._private import utils as ray_utils

    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


def concurrency(cpu_per_trial: float, max_concurrent: int | None) -> int:
    """How many trials fit on the cluster at once, capped by `max_concurrent`."""
    import ray

    n = max(1, int(ray.cluster_resources().get("CPU", 1) // cpu_per_trial))
    return min(n, max_concurrent) if max_concurrent else n
