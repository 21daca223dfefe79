import os

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
