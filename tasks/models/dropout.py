"""Dropout through modules only: what a model does so that packed training can own its draws.

Packed training (`methods.packing`) gives every model of a pack its own dropout stream by standing
in for the lead model's `nn.Dropout` modules, so it reaches only dropout applied through such a
module. A model that fuses dropout into a kernel (attention dropout inside
`scaled_dot_product_attention`) asks `modules_only()` and, inside `dropout_through_modules()`,
takes an explicit path through an `nn.Dropout` module instead. Outside it (serial training) the
fused kernel runs as before, so serial numbers do not move.
"""

from __future__ import annotations

import contextlib
import contextvars

_MODULES_ONLY = contextvars.ContextVar("instill_dropout_modules_only", default=False)


def modules_only() -> bool:
    """Whether every dropout must go through an `nn.Dropout` module now."""
    return _MODULES_ONLY.get()


@contextlib.contextmanager
def dropout_through_modules():
    token = _MODULES_ONLY.set(True)
    try:
        yield
    finally:
        _MODULES_ONLY.reset(token)
