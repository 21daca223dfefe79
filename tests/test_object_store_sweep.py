"""A whole sweep through Ray with its artifacts on an object store (S3, served by moto on loopback):
every trial finishes, every artifact is computed exactly once, nothing is written to OUT/artifacts."""

import collections
import os
import socket
import subprocess
import sys
import time

import pytest

from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import expand, upstream_keys
from tests.conftest import tiny_raw

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback; yields (endpoint, pyarrow S3FileSystem)."""
    pytest.importorskip("moto")
    import pyarrow.fs as pafs

    port = _free_port()
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # credentials come from the environment, as for real S3
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("moto server did not start")
        endpoint = f"127.0.0.1:{port}"
        fs = pafs.S3FileSystem(
            access_key="test",
            secret_key="test",
            endpoint_override=endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir("instill-sweep")
        yield endpoint, fs
    finally:
        server.terminate()
        server.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def fresh_ray():
    """Ray started by the test itself, so that its workers see the S3 credentials."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_sweep_with_artifacts_on_s3_computes_each_artifact_once(tmp_path, s3_endpoint, fresh_ray):
    import pyarrow.fs as pafs

    from orchestrator.sweep import run_sweep

    endpoint, fs = s3_endpoint
    uri = f"s3://instill-sweep/artifacts?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    raw = tiny_raw(
        methods=["subtask_induction", "sampled_subnetwork", "full_transfer", "scratch"],
        sparsities=[0.5, 0.8],
        seeds=[0, 1],
        storage={"artifacts": uri},
    )
    sweep = load_sweep(raw)
    specs = expand(sweep)
    keys = {key for spec in specs for key in upstream_keys(sweep, spec)}
    assert collections.Counter(kind for kind, _ in keys) == {"source": 2, "mask": 4}

    out = tmp_path / "out"
    outcome = run_sweep(sweep, out, num_cpus=2)
    table = outcome.table
    assert len(table) == len(specs) and (table["status"] == "done").all(), table[["trial", "status"]]
    assert outcome.failed == 0

    store = ArtifactStore(uri)
    computations = store.computations()
    assert len(computations) == len(keys), "each distinct artifact computed once"
    assert sorted((c["kind"], c["key"]) for c in computations) == sorted(keys)
    for kind, key in keys:
        assert fs.get_file_info(f"instill-sweep/artifacts/{kind}/{key}.safetensors").type == pafs.FileType.File
    objects = fs.get_file_info(pafs.FileSelector("instill-sweep", recursive=True))
    assert not [o.path for o in objects if ".tmp" in o.path], "no temporary objects are left"

    assert not (out / "artifacts").exists(), "nothing is cached locally"
    assert not list(out.rglob("*.safetensors"))

    # A second run finds every trial done and computes nothing.
    again = run_sweep(sweep, out, num_cpus=2)
    assert again.ran == 0 and len(store.computations()) == len(keys)
