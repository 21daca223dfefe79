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


class UndeclaredBlock(LookupError):
    """A plug-in read a sweep block it did not declare; the message names the declaration to add."""


class Declared:
    """A sweep config as one plug-in (a method, an analysis, an artifact kind) may read it: only the
    blocks it declares, plus `always` (blocks already in every key and identity it feeds). Blocks
    by attribute (`view.discovery`) or by name (`view.block("guide")`); anything else raises
    `UndeclaredBlock` naming `owner` and `hint`, the declaration to add. What a plug-in may read is
    what enters its key: `canonical()`, which the orchestrator hashes, holds every visible block.

    Declarations exist so that reading a block cannot silently reuse a result computed with another
    value of it (Bazel's rule: an undeclared input is an error, not a cache hit)."""

    def __init__(self, config: Any, owner: str, blocks: tuple[str, ...], hint: str, always: tuple[str, ...] = ()):
        self._config, self._owner, self._hint = config, owner, hint
        self._visible = tuple(dict.fromkeys((*always, *blocks)))

    def block(self, name: str) -> Any:
        if name not in self._visible:
            raise UndeclaredBlock(f"{self._owner} reads block {name!r} but does not declare it: add it to {self._hint}")
        return self._config.block(name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy, pickle and friends probe for dunders
            raise AttributeError(name)
        return self.block(name)

    def lazy(self, name: str) -> Any:
        """The block, or (undeclared) a stand-in that raises `UndeclaredBlock` when it is used."""
        try:
            return self.block(name)
        except UndeclaredBlock as err:
            return Undeclared(str(err))

    def canonical(self) -> dict[str, Any]:
        """Every visible block that the config has, as JSON: what a key holds of the settings."""
        blocks = {name: self._config.block(name) for name in self._visible}
        return {name: block.canonical() for name, block in blocks.items() if block is not None}

    def __repr__(self) -> str:
        return f"Declared({self._owner}: {', '.join(self._visible)})"


class Undeclared:
    """Stands in for a block its reader did not declare: any use raises `UndeclaredBlock`."""

    def __init__(self, message: str):
        self._message = message

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise UndeclaredBlock(self._message)

    def __repr__(self) -> str:
        return f"Undeclared({self._message!r})"
