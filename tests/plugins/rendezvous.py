"""A method whose trials wait for each other, so a test can tell that trials really ran side by side.

Each trial drops a marker file in `rendezvous.folder` and then waits (at most `rendezvous.timeout_s`)
until `rendezvous.parties` markers exist, and writes down whether it met the others in time. Run one
at a time, the first trial waits out its timeout and records that it met no one; run side by side,
every trial meets the others at once. Timing alone (do the start/finish stamps overlap?) depends on
how fast the machine launches workers; this does not.
"""

import os
import time
import uuid
from pathlib import Path

from pydantic import Field
from torch import nn

from common.config import Frozen
from methods.registry import MethodContext, register_method


class RendezvousConfig(Frozen):
    folder: str = Field("", description="a folder every trial can see")
    parties: int = Field(2, ge=1)
    timeout_s: float = Field(60.0, gt=0)


@register_method("rendezvous", config=RendezvousConfig, description="test: trials wait for each other")
def _rendezvous(ctx: MethodContext) -> nn.Module:
    cfg: RendezvousConfig = ctx.config
    folder = Path(cfg.folder)
    (folder / f"arrived-{os.getpid()}-{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + cfg.timeout_s
    while len(list(folder.glob("arrived-*"))) < cfg.parties and time.monotonic() < deadline:
        time.sleep(0.05)
    met = len(list(folder.glob("arrived-*"))) >= cfg.parties
    (folder / f"{'met' if met else 'alone'}-{uuid.uuid4().hex}").touch()
    return ctx.fresh
