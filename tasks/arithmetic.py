"""The paper's modular-arithmetic experiment (METHOD.md, Experiment 1).

Inputs are token sequences `[a, b, =]` with a, b in [0, operand_range) and `=` the token
`operand_range`; the label is f(a, b) mod p, read at the last position.

- base task: `a + ab` (the source model learns it, and with it the subtask `ab`);
- subtask: `ab` (the mask is discovered on it);
- downstream: `a^2 + ab`, trained on the *ambiguous* samples a == b (where a^2 + ab, 2a^2, 2b^2 and
  a^2 + b^2 all agree) plus a budget of random *disambiguating* samples a != b.

All splits come from one permutation of the a != b pairs, carved into disjoint pieces. The
downstream pieces are carved first, so the base and subtask sizes never move them, and the budget
n takes the first n of the pool, so budgets are nested.

Tokens: the integer k is token k (k < operand_range), `=` is token operand_range. A label y in
[0, modulus) is the answer token y, so a model with a language-model head over the vocabulary
(`model.head: tied_lm`) is scored and trained against the labels as they are: argmax over the
vocabulary is right only on token y, and any other token (a larger integer, `=`) is a wrong answer.

`loss` (docs/PAPER-SETTINGS.md): `answer`, cross-entropy on the answer read at `=`; `all_positions`,
the paper's code's next-token loss on every position of `[a, b, =, y]` (b from a, = from a b, y
from a b =), so the ambiguous samples a == b also teach "b = a". It is a property of how the task
is posed, so it holds for every stage that trains on the model's own loss (source, continuous
sparsification, and downstream methods with the default objective).
"""

from __future__ import annotations

import functools
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from common.config import Frozen
from common.seeding import numpy_generator
from tasks import expr
from tasks.base import MODELS, Feeds, Split, StageData, Tokens, build_model_for, register_task


def _check_expression(text: str) -> str:
    try:
        expr.parse(text)
    except expr.ExpressionError as err:
        raise ValueError(str(err)) from None
    return text


class ModularArithmeticConfig(Frozen):
    name: Literal["modular_arithmetic"] = "modular_arithmetic"
    modulus: int = Field(7, ge=2, le=1_000_000)
    operand_range: int = Field(1000, ge=3, description="a and b range over [0, operand_range)")
    base: str = "a + ab"
    subtask: str = "ab"
    downstream: str = "a^2 + ab"
    competing: tuple[str, ...] = ("2a^2", "2b^2")
    n_base: int = Field(200_000, ge=10, description="base-task training samples")
    n_subtask: int = Field(50_000, ge=10, description="subtask (mask discovery) training samples")
    pool_size: int = Field(10_000, ge=0, description="disambiguating pool; n = fraction * pool_size")
    n_val: int = Field(1000, ge=10)
    n_test: int = Field(1000, ge=10)
    loss: Literal["answer", "all_positions"] = Field(
        "answer", description="answer: cross-entropy on y; all_positions: next-token loss on every position"
    )

    @field_validator("base", "subtask", "downstream")
    @classmethod
    def _check_rule(cls, value: str) -> str:
        return _check_expression(value)

    @field_validator("competing")
    @classmethod
    def _check_competing(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_expression(v) for v in value)

    @model_validator(mode="after")
    def _check_sizes(self):
        readings = [self.downstream, *self.competing]
        slugs = [expr.slug(r) for r in readings]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"competing readings repeat the downstream or each other: {readings}")
        a = np.arange(self.operand_range)
        target = expr.evaluate(expr.parse(self.downstream), a, a, self.modulus)
        for reading in self.competing:
            if not np.array_equal(expr.evaluate(expr.parse(reading), a, a, self.modulus), target):
                raise ValueError(
                    f"competing reading {reading!r} disagrees with downstream {self.downstream!r} "
                    "on the ambiguous samples (a == b), so it is not a competing reading; remove it"
                )
        needed = self.n_test + self.n_val + self.pool_size + 2 * self.n_val + self.n_base
        needed += self.n_subtask
        available = self.operand_range * (self.operand_range - 1)
        if needed > available:
            raise ValueError(
                f"the splits need {needed} distinct (a, b) pairs with a != b but operand_range "
                f"{self.operand_range} has only {available}: lower n_base, n_subtask or pool_size, "
                "or raise operand_range"
            )
        return self


@register_task("modular_arithmetic")
class ModularArithmetic:
    """Data and models for the modular-arithmetic experiment."""

    Config = ModularArithmeticConfig
    n_positions = 4  # [a, b, =, y] as in the paper; the model reads the first three
    trains_on_zero = True  # n = 0 still leaves the ambiguous samples to train on
    default_analyses = ("splits", "calibration")  # accuracy under the competing readings; calibration

    def __init__(self, config: ModularArithmeticConfig):
        self.config = config
        self._base = expr.parse(config.base)
        self._subtask = expr.parse(config.subtask)
        self._downstream = expr.parse(config.downstream)
        self._competing = {expr.slug(c): expr.parse(c) for c in config.competing}

    def key_fields(self, stage: str) -> dict:
        """The config fields that determine `stage`'s data ('source' or 'subtask') and the loss it
        is trained on, and only those.

        The splits are carved in a fixed order (test, val, pool, base_val, subtask_val, base,
        subtask), so a split depends on its own rule and size and on the sizes carved before it.
        """
        c = self.config
        common = {
            "name": c.name,
            "modulus": c.modulus,
            "operand_range": c.operand_range,
            "n_val": c.n_val,
            "n_test": c.n_test,
            "pool_size": c.pool_size,
            "loss": c.loss,
        }
        if stage == "source":
            return {**common, "base": c.base, "n_base": c.n_base}
        if stage == "subtask":
            return {**common, "subtask": c.subtask, "n_subtask": c.n_subtask, "n_base": c.n_base}
        raise ValueError(f"unknown stage {stage!r}; use 'source' or 'subtask'")

    # --- data -----------------------------------------------------------------------------

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a task object lives for one trial
    def _pairs(self, seed: int) -> dict[str, np.ndarray]:
        """Disjoint (a, b) index arrays for every split, from one permutation of the a != b pairs."""
        c = self.config
        r = c.operand_range
        rng = numpy_generator(seed, "data")
        # Index k over a != b pairs: a = k // (r - 1), b = the (k % (r - 1))-th value other than a.
        order = rng.permutation(r * (r - 1))
        sizes = {
            "test": c.n_test,
            "val": c.n_val,
            "pool": c.pool_size,
            "base_val": c.n_val,
            "subtask_val": c.n_val,
            "base": c.n_base,
            "subtask": c.n_subtask,
        }
        out, start = {}, 0
        for name, size in sizes.items():
            k = order[start : start + size]
            a = k // (r - 1)
            b = k % (r - 1)
            b = b + (b >= a)  # skip b == a
            out[name] = np.stack([a, b], axis=1)
            start += size
        return out

    def _split(self, ab: np.ndarray, rule: expr.Node, extra: bool = False) -> Split:
        a, b = ab[:, 0], ab[:, 1]
        p = self.config.modulus
        eq = np.full_like(a, self.config.operand_range)
        x = torch.from_numpy(np.stack([a, b, eq], axis=1))
        labels = {"y": torch.from_numpy(expr.evaluate(rule, a, b, p))}
        if extra:
            for name, node in self._competing.items():
                labels[name] = torch.from_numpy(expr.evaluate(node, a, b, p))
        return Split(x, labels)

    def ambiguous_pairs(self) -> np.ndarray:
        a = np.arange(self.config.operand_range)
        return np.stack([a, a], axis=1)

    def base_data(self, seed: int) -> StageData:
        pairs = self._pairs(seed)
        return StageData(self._split(pairs["base"], self._base), self._split(pairs["base_val"], self._base))

    def subtask_data(self, seed: int) -> StageData:
        pairs = self._pairs(seed)
        return StageData(
            self._split(pairs["subtask"], self._subtask),
            self._split(pairs["subtask_val"], self._subtask),
        )

    def downstream_size(self, data_fraction: float) -> int:
        """Number of disambiguating samples at `data_fraction` of the pool."""
        return int(round(data_fraction * self.config.pool_size))

    def downstream_data(self, seed: int, data_fraction: float) -> StageData:
        pairs = self._pairs(seed)
        n = self.downstream_size(data_fraction)
        train = np.concatenate([self.ambiguous_pairs(), pairs["pool"][:n]])
        rule = self._downstream
        return StageData(
            train=self._split(train, rule),
            val=self._split(pairs["val"], rule, extra=True),
            evals={"test": self._split(pairs["test"], rule, extra=True)},
        )

    PROBE_SETS: ClassVar[tuple[str, ...]] = ("in_distribution",)

    def probe_features(self, seed: int, on: str = "in_distribution") -> tuple[Split, Split]:
        """(fit, eval) splits for representation analyses: the inputs of the downstream val and test
        pairs (the training distribution), labelled with features (not targets): a, b, their residues
        mod p, ab mod p and the base task's answer."""
        if on not in self.PROBE_SETS:
            raise ValueError(f"modular_arithmetic: no probe set {on!r}; choose one of {list(self.PROBE_SETS)}")
        p = self.config.modulus
        product = expr.parse("ab")

        def split(ab: np.ndarray) -> Split:
            a, b = ab[:, 0], ab[:, 1]
            x = torch.from_numpy(np.stack([a, b, np.full_like(a, self.config.operand_range)], axis=1))
            features = {
                "a": a,
                "b": b,
                "a_mod_p": a % p,
                "b_mod_p": b % p,
                "ab_mod_p": expr.evaluate(product, a, b, p),
                "base": expr.evaluate(self._base, a, b, p),
            }
            return Split(x, {name: torch.from_numpy(np.asarray(v, dtype=np.int64)) for name, v in features.items()})

        pairs = self._pairs(seed)
        return split(pairs["val"]), split(pairs["test"])

    # --- model ----------------------------------------------------------------------------

    def feeds(self) -> Feeds:
        """Token sequences [a, b, =] over the vocabulary 0..operand_range (`=` last), labels in
        [0, modulus): also the answer tokens when modulus <= operand_range."""
        c = self.config
        tokens = Tokens(
            vocab_size=c.operand_range + 1,
            n_positions=self.n_positions,
            labels_are_tokens=c.modulus <= c.operand_range,
            sequence_loss=c.loss == "all_positions",
        )
        return Feeds(tokens, n_classes=c.modulus)

    def build_model(self, model_config: Frozen) -> nn.Module:
        c = self.config
        lm_head = MODELS.get(model_config.name).vocabulary_head(model_config)
        if c.loss == "all_positions" and not lm_head:
            raise ValueError(
                "task.loss: all_positions trains the next token at every position, which needs logits over the "
                f"vocabulary; model {model_config.name!r} has a classes head: set model.head: tied_lm (model gpt), "
                "use model hf_gpt2, or task.loss: answer"
            )
        if lm_head and c.modulus > c.operand_range:
            raise ValueError(
                f"model {model_config.name!r} reads the answer y as the token y (a language-model head), but "
                f"task.modulus ({c.modulus}) exceeds task.operand_range ({c.operand_range}), so some answers have no "
                "token: lower the modulus, raise operand_range, or use model.head: classes (model gpt)"
            )
        return build_model_for(self, model_config)
