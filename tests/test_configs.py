"""Every shipped sweep file validates (imagenet16's only failure is its absent data directory)."""

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_sweep_file
from orchestrator.trial import expand

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    if path.stem == "imagenet16":
        with pytest.raises(ConfigError, match="train_dir"):
            load_sweep_file(path)
        return
    sweep = load_sweep_file(path)
    assert expand(sweep)


def test_quickstart_fits_its_budget_on_paper():
    sweep = load_sweep_file(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    assert sweep.resources.cpu == 1 and sweep.resources.gpu == 0
    assert len(expand(sweep)) <= 80
