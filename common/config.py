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


# Sweep blocks declared by the plug-ins that read them (besides a method's or artifact kind's own
# block, which its registration declares): name -> schema. Every sweep holds each of them, written
# at its top level (`discovery: {...}`) or at its defaults.
BLOCKS: dict[str, type[Frozen]] = {}


def declare_block(name: str):
    """Decorator: the `Frozen` class validates the sweep block `name`, which plug-ins read by
    declaring it (`reads=` / `blocks=`). One schema per name (a reloaded module may declare it again)."""

    def add(config: type[Frozen]) -> type[Frozen]:
        known = BLOCKS.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (config.__module__, config.__qualname__):
            raise ValueError(f"sweep block {name!r} is already declared as {known.__module__}.{known.__qualname__}")
        BLOCKS[name] = config
        return config

    return add


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

    def canonical(self) -> dict[str, Any]:
        """Every visible block that the config has, as JSON: what a key holds of the settings."""
        blocks = {name: self._config.block(name) for name in self._visible}
        return {name: block.canonical() for name, block in blocks.items() if block is not None}

    def __repr__(self) -> str:
        return f"Declared({self._owner}: {', '.join(self._visible)})"
