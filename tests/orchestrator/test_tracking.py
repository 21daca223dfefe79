"""`--tracking`: Ray's own W&B and MLflow callbacks, exercised offline on a real local Ray.

The trainable reports what our trials report: a stage result, per-epoch metrics under the stage's
prefix, and a final result carrying the row as a long JSON string that must never reach a tracker.
"""

import json
import struct
import sys

import pytest

from orchestrator import tracking
from orchestrator.config import ConfigError

SPECS = [
    {"method": "alpha", "data_fraction": 0.5, "seed": 0, "axes": {"mask.sparsity": 0.5, "model.n_layers": 2}},
    {"method": "beta", "data_fraction": 1.0, "seed": 1, "axes": {}},
]
EPOCHS = 3
ROW = json.dumps({"note": "x" * 5000})


def _trainable(config):
    from ray import tune

    tune.report({"stage": "source", "source_s": 0.1})
    for epoch in range(EPOCHS):
        tune.report({"stage": "train", "epoch": epoch, "train/loss": 1.0 / (epoch + 1), "train/val_score": epoch / 10})
    tune.report({"stage": "done", "row_json": ROW, "val_acc": 0.9})


def _name(spec: dict) -> str:
    return f"{spec['method']}-seed{spec['seed']}"


REPORTS = 1 + EPOCHS + 1


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import os

    import ray

    from orchestrator.ray_session import start_ray

    # W&B keeps settings and caches under $HOME: keep them in the test's directory (set before the
    # Ray workers that run wandb start, so they inherit it).
    home = tmp_path_factory.mktemp("wandb_home")
    saved = dict(os.environ)
    os.environ.update(
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"),
        WANDB_SILENT="true",
    )
    ray.shutdown()
    start_ray(num_cpus=2)
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _fit(callbacks, storage):
    from ray import tune

    tuner = tune.Tuner(
        _trainable,
        param_space={"spec": tune.grid_search(SPECS)},
        tune_config=tune.TuneConfig(trial_name_creator=lambda t: _name(t.config["spec"])),
        run_config=tune.RunConfig(name="run", storage_path=str(storage), callbacks=callbacks, verbose=0),
    )
    results = tuner.fit()
    assert not results.errors


def test_no_tracking_is_no_callbacks(tmp_path):
    assert tracking.callbacks(None, experiment="s", out_dir=tmp_path) == []


def test_unknown_tracker_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="wandb, mlflow"):
        tracking.callbacks("tensorboard", experiment="s", out_dir=tmp_path)


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_missing_package_names_the_extra(kind, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, kind, None)  # `import kind` now raises ImportError
    with pytest.raises(ConfigError, match=rf"pip install 'instill\[{kind}\]'"):
        tracking.callbacks(kind, experiment="s", out_dir=tmp_path)


def test_object_store_out_needs_an_explicit_location(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        tracking.callbacks("mlflow", experiment="s", out_dir="s3://bucket/out")


def test_mlflow_one_run_per_trial_with_history_and_params(ray_local, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    _fit(tracking.callbacks("mlflow", experiment="tiny", out_dir=out), tmp_path / "tune")

    uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(_name(s) for s in SPECS)
    for run in runs:
        spec = next(s for s in SPECS if _name(s) == run.info.run_name)
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep"] == "tiny"
        params = run.data.params
        assert params["spec/method"] == spec["method"]
        assert params["spec/seed"] == str(spec["seed"])
        assert params["spec/data_fraction"] == str(spec["data_fraction"])
        assert all(params[f"spec/axes/{path}"] == str(v) for path, v in spec["axes"].items())

        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1.0 / (e + 1) for e in range(EPOCHS)]
        assert len({m.step for m in history}) == EPOCHS  # one step per report, not one point overwritten
        assert run.data.metrics["val_acc"] == 0.9
        logged = set(run.data.metrics) | set(params)
        assert not {k for k in logged if k.split("/")[0] in ("row_json", "config", "pid", "timestamp")}
        assert ROW not in json.dumps(run.data.to_dictionary())


def _wandb_records(path):
    """The records of an offline W&B run file: a 7-byte header, then LevelDB-log chunks (7-byte
    header: crc, length, type) in 32 KiB blocks, each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: the record is complete
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def test_wandb_offline_writes_a_run_per_trial_with_history(ray_local, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _fit(tracking.callbacks("wandb", experiment="tiny", out_dir=tmp_path / "out"), tmp_path / "tune")

    runs = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == len(SPECS)
    names = set()
    for run in runs:
        (log,) = run.glob("run-*.wandb")
        assert ROW.encode() not in log.read_bytes()
        records = _wandb_records(log)
        (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        names.add(info.display_name)
        spec = next(s for s in SPECS if _name(s) == info.display_name)
        assert (info.project, info.run_group) == ("tiny", "tiny")
        config = {item.key: json.loads(item.value_json) for item in info.config.update}
        assert config["spec"] == spec

        history = [  # W&B files "train/loss" as the nested key ("train", "loss")
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        assert len(history) == REPORTS
        assert [h["train/loss"] for h in history if "train/loss" in h] == [1.0 / (e + 1) for e in range(EPOCHS)]
        assert history[-1]["val_acc"] == 0.9
        assert not {k for h in history for k in h} & {"row_json", "config", "timestamp", "stage"}
    assert names == {_name(s) for s in SPECS}
