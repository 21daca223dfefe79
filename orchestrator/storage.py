"""The storage rule on a multi-node cluster: every node must see the sweep's directories.

Artifacts, checkpoints and Tune's trial logs are written where the trials run, so a local path for
`--out` or `storage.artifacts` must be the same shared directory on every node, or each node computes
its own copy of every artifact. `check_shared` writes a marker file from the driver and reads it back
with a Ray task pinned to each node; a node that cannot see it stops the sweep before any trial runs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from orchestrator.config import ConfigError


class StorageNotShared(ConfigError):
    """A local path that not every node of the cluster sees."""


def sees(path: str, token: str) -> bool:
    """Whether this process sees the marker file `path` with content `token`."""
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def check_shared(locations: dict[str, str | None], check: Callable[[str, str], bool] = sees) -> None:
    """Check that every node of the Ray cluster sees each local directory in `locations` (label ->
    path; None or a URI: no check), by `check(path, token)` in a Ray task pinned to each node.
    Raises StorageNotShared naming the nodes that do not and the fix. No-op on a one-node cluster."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = {label: path for label, path in locations.items() if path and "://" not in str(path)}
    if len(nodes) <= 1 or not local:
        return
    remote = ray.remote(num_cpus=0, max_retries=0)(check)
    problems = []
    for label, path in local.items():
        token = uuid.uuid4().hex
        marker = os.path.join(path, f".instill-shared-{token[:12]}")
        os.makedirs(path, exist_ok=True)
        with open(marker, "w") as f:
            f.write(token)
        try:
            refs = {
                node["NodeID"]: remote.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                ).remote(marker, token)
                for node in nodes
            }
            blind = [_describe(node) for node in nodes if not ray.get(refs[node["NodeID"]], timeout=120)]
        finally:
            os.unlink(marker)
        if blind:
            problems.append(
                f"{label} {path} is not visible from {len(blind)} of {len(nodes)} nodes ({', '.join(blind)})"
            )
    if problems:
        raise StorageNotShared(
            "; ".join(problems)
            + ". On a multi-node cluster every node must see the same directory, or each node computes "
            "its own source models and masks and trial logs stay on the workers. Fix: give --out (and "
            "storage.artifacts, if set) a path on a file system shared by every node (e.g. NFS, as in "
            "cluster.yaml's /mnt/instill), or an object-store URI: s3://bucket/prefix or gs://bucket/prefix."
        )


def _describe(node: dict[str, Any]) -> str:
    return f"node {node.get('NodeManagerAddress', '?')} ({str(node.get('NodeID', '?'))[:8]})"
