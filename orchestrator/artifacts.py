"""Content-addressed store for upstream artifacts (source models, masks), shared by all trials.

An artifact is a set of tensors (safetensors: loading runs no code) plus JSON metadata, kept under
`ROOT/<kind>/<key-hash>/`. The key is the dict of config fields that determine the artifact, and
nothing else. Writes go to a temporary directory renamed into place, so a reader never sees half an
artifact; the file's SHA-256 is checked on every load, and a corrupted artifact is reported and
recomputed. A file lock per key makes concurrent trials compute each artifact exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from tasks.config import stable_hash

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclasses.dataclass
class Fetched:
    tensors: Tensors
    meta: dict[str, Any]
    computed: bool  # True when this call computed it, False when it was loaded
    wait_s: float  # time spent waiting for another process holding the lock


class ArtifactStore:
    """A directory of artifacts keyed by config; safe for concurrent processes on one file system."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, key: dict[str, Any]) -> Path:
        return self.root / kind / stable_hash(key, 24)

    def get_or_compute(
        self, kind: str, key: dict[str, Any], compute: Callable[[], tuple[Tensors, dict[str, Any]]]
    ) -> Fetched:
        """Load the artifact for `key`, computing and storing it first if it is missing or corrupt."""
        path = self.path(kind, key)
        hit = self._load(path)
        if hit is not None:
            return Fetched(*hit, computed=False, wait_s=0.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with FileLock(str(path) + ".lock"):
            waited = time.perf_counter() - t0
            hit = self._load(path)  # another process may have finished it while we waited
            if hit is not None:
                return Fetched(*hit, computed=False, wait_s=waited)
            start = time.perf_counter()
            tensors, meta = compute()
            meta = {**meta, "compute_s": time.perf_counter() - start}
            self._write(path, kind, key, tensors, meta)
            self._log_computation(kind, path.name, meta["compute_s"])
        return Fetched(tensors, self._read_meta(path), computed=True, wait_s=waited)

    # --- internals --------------------------------------------------------------------------

    def _write(self, path: Path, kind: str, key: dict, tensors: Tensors, meta: dict) -> None:
        tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            file = tmp / "tensors.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(file))
            record = {"kind": kind, "key": key, "sha256": _sha256(file), "meta": meta}
            (tmp / "meta.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
            if path.exists():  # a corrupt copy, already reported by _load
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _read_meta(self, path: Path) -> dict[str, Any]:
        return json.loads((path / "meta.json").read_text())["meta"]

    def _load(self, path: Path) -> tuple[Tensors, dict[str, Any]] | None:
        if not path.exists():
            return None
        try:
            record = json.loads((path / "meta.json").read_text())
            file = path / "tensors.safetensors"
            if _sha256(file) != record["sha256"]:
                raise ValueError("content hash mismatch")
            return load_file(str(file)), record["meta"]
        except (OSError, ValueError, KeyError) as err:
            log.warning("artifact %s is corrupt (%s); recomputing it", path, err)
            return None

    def _log_computation(self, kind: str, key_hash: str, seconds: float) -> None:
        line = json.dumps(
            {
                "kind": kind,
                "key": key_hash,
                "seconds": seconds,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )
        with FileLock(str(self.root / "computations.lock")), open(self.root / "computations.jsonl", "a") as f:
            f.write(line + "\n")

    def computations(self) -> list[dict[str, Any]]:
        """Every computation this store has recorded, oldest first."""
        log_file = self.root / "computations.jsonl"
        if not log_file.exists():
            return []
        return [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
