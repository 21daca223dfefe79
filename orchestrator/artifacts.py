"""Content-checked store for upstream artifacts (source models, masks), shared by all trials.

An artifact is one safetensors file, `ROOT/<kind>/<key-hash>.safetensors`: its tensors, and in the
header's metadata the key it was computed for, its metadata (accuracies, timings) and the SHA-256 of
its data section. Loading parses no pickle and runs no code; the hash is checked on every load, and
a corrupted artifact is reported and recomputed, never used.

ROOT is a local or NFS path, or any pyarrow filesystem URI (`s3://bucket/prefix`, `gs://...`).
Writes go to a temporary name moved into place, so a reader never sees half an artifact.

Exactly-once computation: a file lock per key (on the store for local and NFS paths, on the node for
object stores) makes concurrent processes wait for the one computing an artifact; across nodes of an
object store, the sweep computes upstream artifacts before any trial needs them (`orchestrator.upstream`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from filelock import FileLock
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from common.config import stable_hash

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class CorruptArtifact(ValueError):
    """An artifact whose bytes do not match its recorded hash, or that cannot be parsed."""


@dataclasses.dataclass
class Fetched:
    tensors: Tensors
    meta: dict[str, Any]
    computed: bool  # True when this call computed it, False when it was loaded
    wait_s: float  # time spent waiting for another process holding the lock


def open_filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str, bool]:
    """(filesystem, root path inside it, whether the root is on a POSIX file system)."""
    text = str(uri)
    if "://" in text and not text.startswith("file://"):
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/"), False
    path = Path(text.removeprefix("file://")).expanduser().resolve()
    return pafs.LocalFileSystem(), str(path), True


def read_or_none(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of the file at `path`, or None when there is none."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise


class ArtifactStore:
    """Artifacts keyed by config, on a local path, NFS, or a pyarrow filesystem URI."""

    def __init__(self, root: str | Path):
        self.uri = str(root)
        self.fs, self.root, self.posix = open_filesystem(root)
        self.fs.create_dir(self.root, recursive=True)

    @property
    def location(self) -> str:
        """Where the store lives, as another process on another node should be given it."""
        return self.root if self.posix else self.uri

    def __reduce__(self):  # pickles as its URI: filesystems hold connections
        return (ArtifactStore, (self.uri,))

    def path(self, kind: str, key: dict[str, Any]) -> str:
        return f"{self.root}/{kind}/{stable_hash(key, 24)}.safetensors"

    def exists(self, kind: str, key: dict[str, Any]) -> bool:
        return self.fs.get_file_info(self.path(kind, key)).type == pafs.FileType.File

    def get_or_compute(
        self, kind: str, key: dict[str, Any], compute: Callable[[], tuple[Tensors, dict[str, Any]]]
    ) -> Fetched:
        """Load the artifact for `key`, computing and storing it first if it is missing or corrupt."""
        return self.get_or_compute_many(kind, [key], lambda missing: [compute()])[0]

    def get_or_compute_many(
        self,
        kind: str,
        keys: list[dict[str, Any]],
        compute: Callable[[list[int]], list[tuple[Tensors, dict[str, Any]]]],
    ) -> list[Fetched]:
        """Load the artifacts for `keys`; `compute(missing)` computes those at the indices `missing` in
        one go, under every key's lock (taken in path order, so two callers cannot deadlock)."""
        paths = [self.path(kind, key) for key in keys]
        hits = [self._load(path) for path in paths]
        if all(hit is not None for hit in hits):
            return [Fetched(*hit, computed=False, wait_s=0.0) for hit in hits]
        t0 = time.perf_counter()
        with contextlib.ExitStack() as locks:
            for lock in sorted({self._lock_path(path) for path in paths}):
                locks.enter_context(FileLock(lock))
            waited = time.perf_counter() - t0
            hits = [self._load(path) for path in paths]  # another process may have finished some meanwhile
            missing = [i for i, hit in enumerate(hits) if hit is None]
            if missing:
                start = time.perf_counter()
                results = compute(missing)
                if len(results) != len(missing):
                    raise RuntimeError(f"{kind}: {len(results)} artifacts computed for {len(missing)} keys")
                seconds = (time.perf_counter() - start) / len(missing)  # the shared run's time, shared out
                shared = {"computed_with": len(missing)} if len(missing) > 1 else {}
                for i, (tensors, meta) in zip(missing, results, strict=True):
                    meta = {**meta, "compute_s": seconds, **shared}
                    self._write(paths[i], kind, keys[i], tensors, meta)
                    self._log_computation(kind, paths[i], seconds)
                    hits[i] = ({k: v.detach().cpu() for k, v in tensors.items()}, meta)
        return [Fetched(*hit, computed=i in missing, wait_s=waited) for i, hit in enumerate(hits)]

    def put(self, kind: str, key: dict[str, Any], tensors: Tensors, meta: dict[str, Any]) -> None:
        """Store (or replace) the artifact for `key`: for results a trial keeps (its trained model),
        which are written once by their own trial and need no lock."""
        self._write(self.path(kind, key), kind, key, tensors, meta)

    def load(self, kind: str, key: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        """Load an artifact that must exist and be intact; raises FileNotFoundError or CorruptArtifact."""
        path = self.path(kind, key)
        with self.fs.open_input_stream(path) as f:
            return _decode(f.read())

    def entries(self, kind: str) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
        """(key, meta, path) of every stored artifact of `kind`, in path order, from headers only
        (unchecked: `load` checks the content hash). An unreadable header is logged and skipped."""
        selector = pafs.FileSelector(f"{self.root}/{kind}", allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.path.endswith(".safetensors"):
                continue  # temporary files of an unfinished write end in .tmp-<uuid>
            try:
                with self.fs.open_input_file(info.path) as f:
                    (header_len,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(header_len))
                record = json.loads(header["__metadata__"]["instill"])
                found.append((record["key"], record["meta"], info.path))
            except (struct.error, ValueError, KeyError, TypeError) as err:
                log.warning("artifact %s has an unreadable header (%s); skipping it", info.path, err)
        return sorted(found, key=lambda entry: entry[2])

    def computations(self) -> list[dict[str, Any]]:
        """Every computation this store has recorded, oldest first."""
        selector = pafs.FileSelector(f"{self.root}/computations", allow_not_found=True)
        records = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.path.endswith(".json"):
                with self.fs.open_input_stream(info.path) as f:
                    records.append(json.loads(f.read()))
        return sorted(records, key=lambda r: r["time"])

    # --- internals --------------------------------------------------------------------------

    def _lock_path(self, path: str) -> str:
        if self.posix:
            return path + ".lock"
        # Object stores have no locks: serialise per node; the sweep's upstream phase covers the cluster.
        folder = Path(tempfile.gettempdir()) / "instill-locks"
        folder.mkdir(exist_ok=True)
        return str(folder / (hashlib.sha256(f"{self.uri}|{path}".encode()).hexdigest()[:32] + ".lock"))

    def _write(self, path: str, kind: str, key: dict, tensors: Tensors, meta: dict) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        data = _encode(kind, key, tensors, meta)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def _load(self, path: str) -> tuple[Tensors, dict[str, Any]] | None:
        data = read_or_none(self.fs, path)
        if data is None:
            return None
        try:
            return _decode(data)
        except CorruptArtifact as err:
            log.warning("artifact %s is corrupt (%s); recomputing it", path, err)
            return None

    def _log_computation(self, kind: str, path: str, seconds: float) -> None:
        record = {
            "kind": kind,
            "key": path.rsplit("/", 1)[1].removesuffix(".safetensors"),
            "seconds": seconds,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
        }
        folder = f"{self.root}/computations"
        self.fs.create_dir(folder, recursive=True)
        with self.fs.open_output_stream(f"{folder}/{kind}-{record['key']}-{uuid.uuid4().hex[:8]}.json") as f:
            f.write(json.dumps(record).encode())


def _encode(kind: str, key: dict, tensors: Tensors, meta: dict) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    body = save_bytes(tensors)
    digest = hashlib.sha256(_data_section(body)).hexdigest()
    info = {"kind": kind, "key": key, "meta": meta, "sha256": digest}
    return save_bytes(tensors, metadata={"instill": json.dumps(info, default=str)})


def _data_section(blob: bytes) -> bytes:
    (header_len,) = struct.unpack("<Q", blob[:8])
    return blob[8 + header_len :]


def _decode(blob: bytes) -> tuple[Tensors, dict[str, Any]]:
    try:
        (header_len,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + header_len])
        info = json.loads(header["__metadata__"]["instill"])
    except (struct.error, ValueError, KeyError, TypeError) as err:
        raise CorruptArtifact(f"unreadable header: {err}") from None
    if hashlib.sha256(_data_section(blob)).hexdigest() != info.get("sha256"):
        raise CorruptArtifact("content hash mismatch")
    try:
        tensors = load_bytes(blob)
    except Exception as err:  # safetensors raises its own error types on malformed input
        raise CorruptArtifact(f"unreadable tensors: {err}") from None
    return tensors, info["meta"]
