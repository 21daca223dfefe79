"""A method that kills its own worker process mid-training, once, for the checkpoint tests (loaded
through `plugins:`).

`dies_once` is `scratch` bit for bit (same model, same objective, no measurements of its own), with an
`end_epoch` hook that appends "<pid> <epoch>" to `$INSTILL_TEST_DIES_ONCE/epochs.log` and, at epoch
`KILL_AT`, SIGKILLs its own process unless `$INSTILL_TEST_DIES_ONCE/killed` exists (it creates it
first, so the retry lives). The kill lands before that epoch's checkpoint: the retry must resume
from the one before.
"""

import dataclasses
import os
import signal
from pathlib import Path

from methods.registry import Method, MethodContext, register_method
from methods.training import Objective

KILL_AT = 3


def _folder() -> Path:
    folder = os.environ.get("INSTILL_TEST_DIES_ONCE")
    if not folder:
        raise RuntimeError("dies_once needs INSTILL_TEST_DIES_ONCE, a folder for its epoch log and marker")
    return Path(folder)


@register_method("dies_once", description="test: scratch, whose worker SIGKILLs itself once mid-training")
class DiesOnce(Method):
    def build(self, ctx: MethodContext):
        return ctx.fresh

    def objective(self, ctx: MethodContext, model) -> Objective:
        folder = _folder()

        def end_epoch(epoch: int) -> None:
            with open(folder / "epochs.log", "a") as f:
                f.write(f"{os.getpid()} {epoch}\n")
            marker = folder / "killed"
            if epoch == KILL_AT and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)

        return dataclasses.replace(super().objective(ctx, model), end_epoch=end_epoch)
