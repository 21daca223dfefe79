"""A task that fails some trials until it is fixed (loaded through `plugins:`), for the rerun tests.

`arithmetic_flaky` is the modular-arithmetic task, except that building a trial's downstream data
raises for the seeds in `FAILING_SEEDS` while the directory named by $INSTILL_TEST_FLAKY holds no
file `fixed`. Every call is logged there, one file per call (`calls/seed<seed>-<pid>-<n>`), so a
test can count the attempts of each seed across processes.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Literal

from tasks.arithmetic import ModularArithmetic, ModularArithmeticConfig
from tasks.base import StageData, register_task

FAILING_SEEDS = (1,)
_calls = itertools.count()


class NotFixedYet(RuntimeError):
    pass


def _folder() -> Path | None:
    folder = os.environ.get("INSTILL_TEST_FLAKY")
    return Path(folder) if folder else None


class FlakyArithmeticConfig(ModularArithmeticConfig):
    name: Literal["arithmetic_flaky"] = "arithmetic_flaky"


@register_task("arithmetic_flaky")
class FlakyArithmetic(ModularArithmetic):
    Config = FlakyArithmeticConfig

    def downstream_data(self, seed: int, data_fraction: float) -> StageData:
        folder = _folder()
        if folder is not None:
            (folder / "calls").mkdir(parents=True, exist_ok=True)
            (folder / "calls" / f"seed{seed}-{os.getpid()}-{next(_calls)}").touch()
            if seed in FAILING_SEEDS and not (folder / "fixed").exists():
                raise NotFixedYet(f"deliberate failure of seed {seed} until {folder / 'fixed'} exists")
        return super().downstream_data(seed, data_fraction)
