"""Config base shared by every block of a sweep file.

Configs are frozen pydantic models: validated when built, immutable after, and unknown keys are
errors that name the key. Tasks, models and methods each define the block they own; the
orchestrator composes them into a sweep.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Base for every config block: immutable, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def canonical(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, defaults included."""
        return self.model_dump(mode="json")


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-ready object, independent of key order and of the Python process."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
