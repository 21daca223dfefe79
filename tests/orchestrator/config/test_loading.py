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
