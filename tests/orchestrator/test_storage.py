"""A whole sweep through Ray with its artifacts on an object store (S3, served by moto on loopback):
every trial finishes, every artifact is computed exactly once, nothing is written to OUT/artifacts."""

import collections

import pytest

from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import expand, upstream_keys
from tests.conftest import moto_s3, tiny_raw


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback; yields (endpoint, pyarrow S3FileSystem)."""
    with moto_s3("instill-sweep") as served:
        yield served


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
