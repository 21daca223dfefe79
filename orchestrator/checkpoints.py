"""Checkpoints of the training runs inside trials, kept in the artifact store.

`ROOT/checkpoints/<owner>/<slot>.pt`, ROOT the artifact store's root (so a trial retried on another
node finds them). The owner is the trial's hash (its identity holds every setting its result depends
on) or, for an artifact trained inside a trial, `<kind>-<key hash>`; the slot is the `fit` call's
index within the owner (`methods.training.Supervision`).

A checkpoint is one `torch.save` of the loop's state, read back with `torch.load(weights_only=True)`
(nothing arbitrary is unpickled) and written to a temporary name moved into place; an unreadable one
is reported and ignored (the run starts afresh). An owner's checkpoints are deleted once it finishes.
"""

from __future__ import annotations

import io
import logging
import pickle
import sys
import time
import uuid
from typing import Any

import pyarrow.fs as pafs
import torch

from orchestrator.artifacts import ArtifactStore, read_or_none

log = logging.getLogger(__name__)


class CheckpointStore:
    """Checkpoints by (owner, slot), beside the artifacts of `artifacts`."""

    def __init__(self, artifacts: ArtifactStore):
        self.fs, self.root = artifacts.fs, f"{artifacts.root}/checkpoints"

    def folder(self, owner: str) -> str:
        return f"{self.root}/{owner}"

    def path(self, owner: str, slot: int) -> str:
        return f"{self.folder(owner)}/{slot}.pt"

    def save(self, owner: str, slot: int, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({"owner": owner, "slot": slot, "state": state}, buffer)
        path = self.path(owner, slot)
        self.fs.create_dir(self.folder(owner), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(buffer.getvalue())
        self.fs.move(tmp, path)

    def load(self, owner: str, slot: int) -> dict[str, Any] | None:
        """The state saved for (owner, slot), or None when there is none or it cannot be read."""
        path = self.path(owner, slot)
        data = read_or_none(self.fs, path)
        if data is None:
            return None
        try:
            record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            log.warning("checkpoint %s is unreadable (%s); starting that run afresh", path, err)
            return None
        if record.get("owner") != owner or record.get("slot") != slot:
            raise ValueError(f"checkpoint {path} holds ({record.get('owner')}, {record.get('slot')}), not its own")
        return record["state"]

    def slots(self, owner: str) -> list[int]:
        """The slots of `owner` that hold a checkpoint."""
        selector = pafs.FileSelector(self.folder(owner), allow_not_found=True)
        names = [info.path.rsplit("/", 1)[1] for info in self.fs.get_file_info(selector)]
        return sorted(int(name.removesuffix(".pt")) for name in names if name.endswith(".pt"))

    def owners(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(info.path.rsplit("/", 1)[1] for info in infos if info.type == pafs.FileType.Directory)

    def clear(self, owner: str) -> None:
        """Delete every checkpoint of `owner` (nothing if it has none)."""
        folder = self.folder(owner)
        if self.fs.get_file_info(folder).type == pafs.FileType.Directory:
            self.fs.delete_dir(folder)


class Interval:
    """When a trial's runs checkpoint: at the first epoch end `every_s` seconds after the trial's
    start or its last checkpoint (None: never; 0: every epoch). One per trial, shared by its runs."""

    def __init__(self, every_s: float | None, clock=time.monotonic):
        self.every_s, self.clock = every_s, clock
        self.last = clock()

    def due(self) -> bool:
        return self.every_s is not None and self.clock() - self.last >= self.every_s

    def reset(self) -> None:
        self.last = self.clock()


class Checkpointer:
    """`methods.training.Checkpointer` for one owner: its slots in `store`, saved when `interval` is due."""

    def __init__(self, store: CheckpointStore, owner: str, interval: Interval):
        self.store, self.owner, self.interval = store, owner, interval

    def due(self) -> bool:
        return self.interval.due()

    def load(self, slot: int) -> dict[str, Any] | None:
        state = self.store.load(self.owner, slot)
        if state is not None:
            done = "finished" if state.get("finished") else "saved"
            print(f"[instill] {self.owner}: run {slot} resumes from its checkpoint ({done} after epoch "
                  f"{state.get('epoch')})", file=sys.stderr, flush=True)  # fmt: skip
        return state

    def save(self, slot: int, state: dict[str, Any]) -> None:
        self.store.save(self.owner, slot, state)
        self.interval.reset()

    def clear(self) -> None:
        self.store.clear(self.owner)
