"""Per-stage seeds derived from a trial's seed.

Every random draw in Instill takes an explicit generator built here, so changing one stage (the
method, the sparsity) never shifts the random stream of another (the data split, the fresh init).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch


def stage_seed(seed: int, stage: str) -> int:
    """A 63-bit seed for `stage`, a pure function of (seed, stage)."""
    digest = hashlib.sha256(f"{int(seed)}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def torch_generator(seed: int, stage: str) -> torch.Generator:
    """A CPU torch generator for `stage` of the trial seeded with `seed`."""
    gen = torch.Generator()
    gen.manual_seed(stage_seed(seed, stage))
    return gen


def numpy_generator(seed: int, stage: str) -> np.random.Generator:
    """A numpy generator for `stage` of the trial seeded with `seed`."""
    return np.random.default_rng(stage_seed(seed, stage))


@contextlib.contextmanager
def seeded_init(seed: int, stage: str) -> Iterator[None]:
    """Make torch's global RNG deterministic for one model construction.

    torch's layer constructors draw their default init from the global generator; this forks it so
    the caller's RNG state is left untouched afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stage_seed(seed, stage))
        yield
