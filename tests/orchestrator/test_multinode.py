"""Sweeps on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`, every node on this machine):
the storage rule, and a sweep whose output directory and artifacts live on S3 (moto on loopback)
that loses a worker node and gains another mid-sweep."""

import collections
import contextlib
import json
import threading
import time

import pyarrow.fs as pafs
import pytest

from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import expand, upstream_keys
from tests.conftest import moto_s3, tiny_raw


@pytest.fixture
def cluster():
    with _cluster() as made:
        yield made


@contextlib.contextmanager
def _cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},  # trials run on the workers only
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_storage_rule_on_a_three_node_cluster(cluster, tmp_path):
    import ray

    from orchestrator.storage import StorageNotShared, check_shared

    ray.init(address=cluster[0].address)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    shared = tmp_path / "shared"
    check_shared({"--out": str(shared), "storage.artifacts": "s3://bucket/x"})  # one disk: every node sees it
    assert not list(shared.iterdir()), "the marker is removed"

    head = ray.get_runtime_context().get_node_id()

    def head_only(path, token):  # stands for worker nodes whose local disks differ from the driver's
        import ray as ray_

        from orchestrator.storage import sees

        return ray_.get_runtime_context().get_node_id() == head and sees(path, token)

    with pytest.raises(StorageNotShared) as err:
        check_shared({"--out": str(shared)}, check=head_only)
    message = str(err.value)
    assert "not visible from 2 of 3 nodes" in message and str(shared) in message
    assert "s3://" in message and "shared by every node" in message


@pytest.mark.slow  # a 3-node cluster and a moto server: a minute or two on two cores
def test_sweep_on_s3_survives_losing_and_gaining_a_worker_node(tmp_path):
    from orchestrator.sweep import run_sweep

    # The server (and the credentials in the environment) first, so that every node has them.
    with moto_s3("instill-cluster") as (endpoint, fs), _cluster() as (ray_cluster, workers):
        uri = f"s3://instill-cluster/sweep?endpoint_override={endpoint}&scheme=http&region=us-east-1"
        raw = tiny_raw(
            methods=["subtask_induction", "sampled_subnetwork", "scratch"],
            sparsities=[0.5, 0.8],
            data_fractions=[0.3, 1.0],
            seeds=[0, 1],
            training={"epochs": 6},
            max_failures=3,
        )
        sweep = load_sweep(raw)
        specs = expand(sweep)
        keys = {key for spec in specs for key in upstream_keys(sweep, spec)}

        # The sweep runs in a thread; the cluster changes from the main thread (Ray adds nodes there only).
        finished: dict = {}
        thread = threading.Thread(
            target=lambda: finished.update(outcome=run_sweep(sweep, uri, address=ray_cluster.address)), daemon=True
        )
        thread.start()
        deadline = time.time() + 300
        while time.time() < deadline and thread.is_alive():
            rows = fs.get_file_info(pafs.FileSelector("instill-cluster/sweep/rows", allow_not_found=True))
            if len([r for r in rows if r.path.endswith(".json")]) >= 3:
                break
            time.sleep(0.5)
        changed = thread.is_alive()
        ray_cluster.remove_node(workers[0])  # kills the trials running there: the queue retries them elsewhere
        ray_cluster.add_node(num_cpus=1)
        thread.join(timeout=600)
        outcome = finished["outcome"]

        assert changed, "the cluster changed mid-sweep"
        table = outcome.table
        assert len(table) == len(specs) and (table["status"] == "done").all(), table[["trial", "status", "error"]]

        computations = ArtifactStore(uri.replace("/sweep?", "/sweep/artifacts?")).computations()
        assert sorted((c["kind"], c["key"]) for c in computations) == sorted(keys), "each artifact computed once"
        assert collections.Counter(c["kind"] for c in computations) == {"source": 2, "mask": 4}

        def exists(path):
            return fs.get_file_info(f"instill-cluster/sweep/{path}").type == pafs.FileType.File

        assert exists("results.parquet") and exists("sweep.json")
        rows = [
            r for r in fs.get_file_info(pafs.FileSelector("instill-cluster/sweep/rows")) if r.path.endswith(".json")
        ]
        assert len(rows) == len(specs)
        tune_files = fs.get_file_info(pafs.FileSelector("instill-cluster/sweep/tune", recursive=True))
        assert any(f.path.endswith("result.json") for f in tune_files), "Tune's trial logs are in the store too"
        assert not exists("driver.lock"), "the lease is released"
        with fs.open_input_stream("instill-cluster/sweep/sweep.json") as f:
            assert json.loads(f.read())["name"] == sweep.name
