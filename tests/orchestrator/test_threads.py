"""`resources.cpu: auto`: threads per trial measured on the node, kept in the artifact store."""

import json

import pytest

from orchestrator.artifacts import ArtifactStore
from orchestrator.config import ConfigError, load_sweep
from orchestrator.threads import KIND, choose, measure, options, resolve
from tests.conftest import tiny_raw


def test_options_double_up_to_the_node():
    assert options(1) == [1]
    assert options(2) == [1, 2]
    assert options(6) == [1, 2, 4]
    assert options(16) == [1, 2, 4, 8, 16]


def test_choice_is_the_fewest_threads_within_the_margin_of_the_fastest():
    assert choose({1: 100.0, 2: 104.0}) == 1  # 4% faster: not worth fewer trials at once
    assert choose({1: 100.0, 2: 106.0}) == 2
    assert choose({1: 100.0, 2: 150.0, 4: 155.0}) == 2
    assert choose({1: 300.0, 2: 9.0}) == 1


def test_cpu_is_one_by_default_and_a_number_is_kept(tiny):
    assert tiny().resources.cpu == 1.0  # auto is opt-in: a choice from timings could differ between runs
    pinned = tiny(resources={"cpu": 2})
    assert resolve(pinned, store=None) is pinned  # a number is never measured


@pytest.mark.parametrize("value", [0, -1, "two"])
def test_cpu_must_be_auto_or_positive(value):
    with pytest.raises(ConfigError, match=r"resources\.cpu"):
        load_sweep(tiny_raw(resources={"cpu": value}))


def test_gpu_trials_take_one_cpu_without_measuring(tiny):
    resolved = resolve(tiny(resources={"cpu": "auto", "gpu": 0.5}), store=None)
    assert resolved.resources.cpu == 1.0


def test_measure_times_every_option_with_all_its_processes_at_once(tiny):
    sweep = tiny()
    found = measure(json.dumps(sweep.canonical()), 2, window_s=0.3)
    assert set(found["rates"]) == {1, 2}
    assert all(rate > 0 for rate in found["rates"].values())
    assert found["threads"] == choose(found["rates"])
    (a, b) = found["spans"][1]  # the two 1-thread processes ran at the same time
    assert max(a[0], b[0]) < min(a[1], b[1])
    assert len(found["spans"][2]) == 1
    capped = measure(json.dumps(sweep.canonical()), 2, window_s=0.1, max_concurrent=1)
    assert len(capped["spans"][1]) == 1  # no more processes than trials may run at once


@pytest.mark.parametrize("cpus", [1, 2])
def test_a_failing_measurement_names_the_error(cpus):
    raw = tiny_raw()
    raw["model"] = {**raw["model"], "d_model": 15}  # 15 is not divisible by 2 heads: building fails
    with pytest.raises(RuntimeError, match=r"(?s)measuring process failed: .*divisible"):
        measure(json.dumps(raw), cpus, window_s=0.1)


@pytest.mark.slow
def test_auto_measures_once_and_a_resumed_sweep_keeps_the_threads(tmp_path, capfd):
    from orchestrator.sweep import run_sweep

    sweep = load_sweep(tiny_raw(resources={"cpu": "auto"}, methods=["scratch"]))
    out = tmp_path / "out"
    table = run_sweep(sweep, out, num_cpus=2).table
    store = ArtifactStore(out / "artifacts")
    (measured,) = store.entries(KIND)
    chosen = int(measured[1]["threads"])
    assert (table["threads"] == chosen).all()
    assert "resources.cpu: auto -> " in capfd.readouterr().err

    extended = load_sweep(tiny_raw(resources={"cpu": "auto"}, methods=["scratch"], seeds=[0, 1]))
    table = run_sweep(extended, out, num_cpus=2).table
    assert len(store.entries(KIND)) == 1
    assert "kept from an earlier measurement" in capfd.readouterr().err
    assert (table["threads"] == chosen).all() and len(table) == 2
