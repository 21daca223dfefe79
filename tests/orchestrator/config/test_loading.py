"""Every shipped sweep file validates.

Sweep files that name data directories outside the repository (imagenet16's `train_dir` and
`cue_conflict_dir`) are validated with those directories replaced by small ones made in a temporary
folder, so the outcome never depends on what happens to exist on the machine running the tests.
"""

from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.config import ConfigError, load_sweep, load_sweep_file
from orchestrator.trial import expand

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").glob("*.yaml"))
DATA_DIR_KEYS = {"train_dir", "cue_conflict_dir"}


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _fake_data_dirs(task: dict, tmp: Path) -> dict:
    """`task` with each data directory replaced by a minimal one of the layout it expects."""
    from tasks.imagenet16 import GEIRHOS_CLASSES

    unknown = {k for k in task if k.endswith("_dir") and k != "cache_dir"} - DATA_DIR_KEYS
    assert not unknown, f"teach this test the layout of {sorted(unknown)}"
    task = dict(task)
    classes = list(task.get("classes", GEIRHOS_CLASSES))
    if "train_dir" in task:
        task["train_dir"] = str(tmp / "train")
        for i, c in enumerate(classes):
            for j in range(4):
                _png(tmp / "train" / c / f"{c}_{j}.png", (i * 4 + j) % 256)
    if "cue_conflict_dir" in task:
        task["cue_conflict_dir"] = str(tmp / "cue")
        _png(tmp / "cue" / f"{classes[0]}1-{classes[1]}1.png", 1)
    if "cache_dir" in task or "train_dir" in task:
        task["cache_dir"] = str(tmp / "cache")
    return task


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _names_data_dirs(path: Path) -> bool:
    return bool(DATA_DIR_KEYS & set(_raw(path)["task"]))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path, tmp_path):
    if _names_data_dirs(path):
        raw = _raw(path)
        raw["task"] = _fake_data_dirs(raw["task"], tmp_path)
        sweep = load_sweep(raw, str(path))
    else:
        sweep = load_sweep_file(path)
    assert expand(sweep)


@pytest.mark.parametrize("path", [p for p in CONFIGS if _names_data_dirs(p)], ids=lambda p: p.stem)
def test_configs_with_data_directories_report_a_missing_one(path, tmp_path):
    raw = _raw(path)
    raw["task"] = _fake_data_dirs(raw["task"], tmp_path)
    raw["task"]["train_dir"] = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="train_dir"):
        load_sweep(raw, str(path))


def test_quickstart_fits_its_budget_on_paper():
    sweep = load_sweep_file(Path(__file__).resolve().parents[3] / "configs" / "quickstart.yaml")
    assert sweep.resources.cpu == 1 and sweep.resources.gpu == 0
    assert len(expand(sweep)) <= 80


# --- --set and plug-ins -----------------------------------------------------------------------

SETS = ["training.lr=0.004", "seeds=[0, 1]", "methods=[scratch, l2sp]", "l2sp.alpha=0.5", "model.d_model=32",
        "axes.model.n_layers=[1, 2]"]  # fmt: skip


def _sweep_file(folder: Path, **overrides) -> Path:
    from tests.conftest import tiny_raw

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(**overrides)))
    return path


def test_set_gives_the_sweep_the_file_would_with_those_values(tmp_path):
    from tests.conftest import tiny_raw

    sweep = load_sweep_file(_sweep_file(tmp_path), SETS)
    assert sweep.training.lr == 0.004 and sweep.seeds == (0, 1) and sweep.methods == ("scratch", "l2sp")
    assert sweep.block("l2sp").alpha == 0.5 and sweep.model.d_model == 32 and sweep.axes["model.n_layers"] == (1, 2)
    written = tiny_raw(training={"lr": 0.004}, seeds=[0, 1], methods=["scratch", "l2sp"], l2sp={"alpha": 0.5},
                       model={"d_model": 32}, axes={"model.n_layers": [1, 2]})  # fmt: skip
    assert sweep.config_hash == load_sweep(written).config_hash
    whole = load_sweep_file(_sweep_file(tmp_path), ["axes={model.n_layers: [1, 2]}"])
    assert whole.axes["model.n_layers"] == (1, 2)


def test_a_bad_set_is_the_same_error_as_in_the_file(tmp_path):
    with pytest.raises(ConfigError) as from_set:
        load_sweep_file(_sweep_file(tmp_path / "a"), ["training.lrr=0.1"])
    with pytest.raises(ConfigError) as from_file:
        load_sweep_file(_sweep_file(tmp_path / "b", training={"lrr": 0.1}))
    assert "with --set training.lrr=0.1" in str(from_set.value)
    assert str(from_set.value).splitlines()[1:] == str(from_file.value).splitlines()[1:] != []


@pytest.fixture
def markers(tmp_path, monkeypatch):
    """`write(folder, name, where)`: a module `name` in `folder` that records `where`; sys.path,
    PYTHONPATH and the modules are restored after the test."""
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    names = []

    def write(folder: Path, name: str, where: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.py").write_text(f"WHERE = {where!r}\n")
        names.append(name)

    yield write
    for name in names:
        sys.modules.pop(name, None)


def test_plugins_resolve_from_the_sweep_folder_then_the_working_folder(tmp_path, monkeypatch, markers):
    import os
    import sys

    from orchestrator.config import plugin_paths

    lab, cwd = tmp_path / "lab", tmp_path / "cwd"
    markers(lab, "instill_marker_both", "sweep folder")
    markers(cwd, "instill_marker_both", "working folder")
    markers(cwd, "instill_marker_cwd", "working folder")
    monkeypatch.chdir(cwd)
    plugins = ["instill_marker_both", "instill_marker_cwd"]
    sweep = load_sweep_file(_sweep_file(lab, plugins=plugins))
    assert sys.modules["instill_marker_both"].WHERE == "sweep folder"
    assert sys.modules["instill_marker_cwd"].WHERE == "working folder"
    found = {"instill_marker_both": str(lab.resolve()), "instill_marker_cwd": str(cwd.resolve())}
    assert plugin_paths(sweep.plugins) == found
    assert str(lab.resolve()) in os.environ["PYTHONPATH"].split(os.pathsep), "Ray workers started later find them"

    with pytest.raises(ConfigError) as err:
        load_sweep_file(_sweep_file(lab, plugins=["instill_marker_nowhere"]))
    assert "cannot import 'instill_marker_nowhere'" in str(err.value) and str(lab.resolve()) in str(err.value)


_RULE = {"min": 3, "max": 20, "step": 3, "until": {"half_width": 0.03, "metric": "test_acc"}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"min": 5, "max": 4}, "seeds: min (5) must be at most max (4)"),
        ({"step": 0}, "seeds: step: Input should be greater than or equal to 1"),
        ({"until": {"half_width": 0}}, "seeds: until.half_width: Input should be greater than 0"),
        ({"until": {"half_width": 0.03, "metric": "tst_acc"}},
         "seeds.until.metric: 'tst_acc' is not a column the report summarises; one of: test_acc, val_acc"),
        ({"until": {"half_width": 0.03, "versus": "l2sp"}}, "seeds.until.versus: 'l2sp' is not one of methods"),
        ({"until": {"half_width": 0.03, "margin": 0.1}}, "seeds: until.margin: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_a_seed_rule_is_checked_field_by_field(change, message):
    from tests.conftest import tiny_raw

    with pytest.raises(ConfigError) as err:
        load_sweep(tiny_raw(seeds={**_RULE, **change}))
    assert message in str(err.value)


def test_a_seed_rule_runs_its_first_round_and_a_list_is_unchanged():
    from tests.conftest import tiny_raw

    ruled = load_sweep(tiny_raw(seeds=_RULE))
    assert ruled.first_seeds == (0, 1, 2) and {s.seed for s in expand(ruled)} == {0, 1, 2}
    assert "then 3 more per round (up to 20)" in str(ruled.seeds) and "+-0.03" in str(ruled.seeds)
    listed = load_sweep(tiny_raw(seeds=[4, 2]))
    assert listed.seeds == listed.first_seeds == (4, 2) and listed.canonical()["seeds"] == [4, 2]


def test_report_versus_takes_methods_and_settings():
    from tests.conftest import tiny_raw

    config = load_sweep(tiny_raw(report={"versus": ["scratch", "model.name=gpt"]}))
    assert config.report.versus == ("scratch", "model.name=gpt")
    with pytest.raises(ConfigError, match="report.versus: 'l2sp' is not one of methods"):
        load_sweep(tiny_raw(report={"versus": ["l2sp", "model.name=gpt"]}))


def test_report_metrics_are_summarised_columns():
    from tests.conftest import tiny_raw

    assert load_sweep(tiny_raw(report={"metrics": "val_acc"})).report.metrics == ("val_acc",)
    with pytest.raises(ConfigError, match="report.metrics: 'nope_acc' is not a column the report summarises"):
        load_sweep(tiny_raw(report={"metrics": ["nope_acc"]}))
