import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def tiny_raw(**overrides):
    """A sweep small enough to run a whole trial in about a second on one CPU."""
    raw = {
        "name": "tiny",
        "task": {
            "name": "modular_arithmetic",
            "operand_range": 30,
            "n_base": 300,
            "n_subtask": 200,
            "pool_size": 100,
            "n_val": 50,
            "n_test": 50,
        },
        "model": {"name": "gpt", "n_layers": 1, "d_model": 16, "n_heads": 2, "dropout": 0.1},
        "source": {"epochs": 2, "lr": 1e-3},
        "discovery": {"epochs": 2, "batch_size": 100},
        "training": {"epochs": 2, "lr": 1e-3},
        "methods": ["subtask_induction", "scratch"],
        "sparsities": [0.5],
        "data_fractions": [0.5],
        "seeds": [0],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@pytest.fixture
def tiny():
    from orchestrator.config import load_sweep

    return lambda **overrides: load_sweep(tiny_raw(**overrides))


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def moto_s3(bucket: str):
    """A moto S3 server on loopback with `bucket` created; yields (endpoint, pyarrow S3FileSystem).
    Credentials are set in the environment for its lifetime, as for real S3."""
    pytest.importorskip("moto")
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    credentials = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    saved = {k: os.environ.get(k) for k in credentials}
    os.environ.update(credentials)
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
        fs.create_dir(bucket)
        yield endpoint, fs
    finally:
        server.terminate()
        server.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
