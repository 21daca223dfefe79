"""A method whose trial SIGKILLs its own worker process, as the OS or Ray's memory monitor kills a
worker that runs out of memory (loaded through `plugins:`; tests/orchestrator/test_worker_death.py).

`kills_its_worker` is `scratch` (packable too). While `$INSTILL_TEST_KILL/armed` exists, building
its model appends "<pid> <n_train>" to `$INSTILL_TEST_KILL/kills.log` and SIGKILLs the process,
only at the training-set sizes the file lists (one per line; an empty file: at every size).
Remove the file and its trials train as scratch's.
"""

import os
import signal
from pathlib import Path

from torch import nn

from methods.registry import MethodContext, register_method


@register_method("kills_its_worker", packable=True, description="test: scratch, whose worker SIGKILLs itself")
def _kills_its_worker(ctx: MethodContext) -> nn.Module:
    folder = os.environ.get("INSTILL_TEST_KILL")
    if not folder:
        raise RuntimeError("kills_its_worker needs INSTILL_TEST_KILL, a folder for its marker and log")
    armed = Path(folder) / "armed"
    n_train = len(ctx.data.train.x)
    if armed.exists():
        sizes = {int(line) for line in armed.read_text().split()}
        if not sizes or n_train in sizes:
            with open(Path(folder) / "kills.log", "a") as f:
                f.write(f"{os.getpid()} {n_train}\n")
            os.kill(os.getpid(), signal.SIGKILL)
    return ctx.fresh
