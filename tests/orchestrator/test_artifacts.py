import multiprocessing as mp
import time

import pytest
import torch

from orchestrator.artifacts import ArtifactStore, CorruptArtifact
from tests.conftest import moto_s3

KEY = {"task": "t", "seed": 0}


def _compute(value=1.0, delay=0.0):
    def compute():
        time.sleep(delay)
        return {"w": torch.full((4, 4), value), "m": torch.ones(3, dtype=torch.bool)}, {"acc": 0.5}

    return compute


def test_round_trip_and_reuse(tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.get_or_compute("source", KEY, _compute())
    again = store.get_or_compute("source", KEY, _compute(value=2.0))
    assert first.computed and not again.computed
    assert torch.equal(again.tensors["w"], torch.ones(4, 4)) and again.tensors["m"].dtype == torch.bool
    assert again.meta["acc"] == 0.5 and "compute_s" in again.meta
    assert [c["kind"] for c in store.computations()] == ["source"]
    assert not list(tmp_path.rglob("*.tmp-*")), "no temporary files are left behind"


def test_keys_separate_artifacts(tmp_path):
    store = ArtifactStore(tmp_path)
    store.get_or_compute("source", KEY, _compute())
    other = store.get_or_compute("source", {**KEY, "seed": 1}, _compute(value=3.0))
    assert other.computed and torch.equal(other.tensors["w"], torch.full((4, 4), 3.0))


@pytest.mark.parametrize("damage", ["flip-data", "truncate", "garbage-header", "empty"])
def test_corruption_is_detected_reported_and_recomputed(tmp_path, caplog, damage):
    store = ArtifactStore(tmp_path)
    store.get_or_compute("mask", KEY, _compute())
    path = tmp_path / "mask" / (store.path("mask", KEY).rsplit("/", 1)[1])
    blob = bytearray(path.read_bytes())
    if damage == "flip-data":
        blob[-5] ^= 0xFF
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "garbage-header":
        blob[10:20] = b"x" * 10
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    with pytest.raises((CorruptArtifact, ValueError)):
        store.load("mask", KEY)
    fetched = store.get_or_compute("mask", KEY, _compute(value=7.0))
    assert fetched.computed, "a corrupt artifact is never used"
    assert "corrupt" in caplog.text
    assert torch.equal(store.load("mask", KEY)[0]["w"], torch.full((4, 4), 7.0))


def _worker(root, barrier, out):
    store = ArtifactStore(root)
    barrier.wait()
    fetched = store.get_or_compute("source", KEY, _compute(delay=0.5))
    out.put(fetched.computed)


def test_concurrent_processes_compute_a_missing_artifact_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    computed = [out.get(timeout=5) for _ in procs]
    assert sum(computed) == 1
    assert len(ArtifactStore(tmp_path).computations()) == 1


def test_store_pickles_as_its_uri(tmp_path):
    import pickle

    store = pickle.loads(pickle.dumps(ArtifactStore(tmp_path)))
    assert store.uri == str(tmp_path)


# --- S3, against a real S3-compatible server on loopback (moto's server mode) ---------------


@pytest.fixture(scope="module")
def s3_uri():
    with moto_s3("instill-test") as (endpoint, _fs):
        yield f"s3://instill-test/store?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def test_s3_store_round_trip_reuse_and_corruption(s3_uri):
    store = ArtifactStore(s3_uri)
    assert not store.posix
    first = store.get_or_compute("source", KEY, _compute())
    again = ArtifactStore(s3_uri).get_or_compute("source", KEY, _compute(value=9.0))
    assert first.computed and not again.computed
    assert torch.equal(again.tensors["w"], torch.ones(4, 4))
    assert len(store.computations()) == 1
    # corrupt the object in place: detected and recomputed
    path = store.path("source", KEY)
    with store.fs.open_input_stream(path) as f:
        blob = bytearray(f.read())
    blob[-2] ^= 0xFF
    with store.fs.open_output_stream(path) as f:
        f.write(bytes(blob))
    fetched = store.get_or_compute("source", KEY, _compute(value=4.0))
    assert fetched.computed
    assert torch.equal(store.load("source", KEY)[0]["w"], torch.full((4, 4), 4.0))
