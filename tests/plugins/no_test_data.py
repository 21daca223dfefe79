"""A task whose test data cannot be read (loaded through `plugins:`), for the tests that check that
tuning never looks at test data.

`arithmetic_no_test` is the modular-arithmetic task, except that the downstream data's evaluation
splits (`evals`: test and the like) are a mapping that raises `TestDataRead` on any access.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Literal

from tasks.arithmetic import ModularArithmetic, ModularArithmeticConfig
from tasks.base import StageData, register_task


class TestDataRead(AssertionError):
    """Something read an evaluation split of `arithmetic_no_test`."""

    __test__ = False  # not a pytest test class


class ForbiddenEvals(Mapping):
    """A mapping of evaluation splits that refuses every access: lookups, iteration, size, truth."""

    @staticmethod
    def _refuse():
        raise TestDataRead("an evaluation (test) split was read")

    def __getitem__(self, key):
        self._refuse()

    def __iter__(self) -> Iterator:
        self._refuse()

    def __len__(self) -> int:
        self._refuse()

    def __contains__(self, key) -> bool:
        self._refuse()

    def __bool__(self) -> bool:
        self._refuse()

    def keys(self):
        self._refuse()

    def items(self):
        self._refuse()

    def values(self):
        self._refuse()

    def get(self, key, default=None):
        self._refuse()

    def __repr__(self) -> str:
        return "ForbiddenEvals()"


class NoTestArithmeticConfig(ModularArithmeticConfig):
    name: Literal["arithmetic_no_test"] = "arithmetic_no_test"


@register_task("arithmetic_no_test")
class NoTestArithmetic(ModularArithmetic):
    Config = NoTestArithmeticConfig

    def downstream_data(self, seed: int, data_fraction: float) -> StageData:
        data = super().downstream_data(seed, data_fraction)
        return dataclasses.replace(data, evals=ForbiddenEvals())
