"""`variants:`: named sets of settings as one grid axis (an ablation that changes one thing at a time)."""

import json

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_sweep
from orchestrator.results import frame
from orchestrator.trial import base_row, expand, trial_hash, upstream_keys
from tests.conftest import tiny_raw

VARIANTS = {
    "paper": {},
    "init": {"model.init": "gpt2"},
    "discovery": {"discovery.weight_decay": 0.01, "discovery.ties": "last"},
}


def test_each_variant_applies_all_its_settings_and_nothing_else(tiny):
    sweep = tiny(methods=["subtask_induction"], variants=VARIANTS)
    specs = expand(sweep)
    assert sorted(s.axes["variant"] for s in specs) == ["discovery", "init", "paper"]
    for spec in specs:
        eff = sweep.effective(spec.method, spec.axes)
        name = spec.axes["variant"]
        assert eff.model.init == ("gpt2" if name == "init" else "torch")
        assert eff.block("discovery").weight_decay == (0.01 if name == "discovery" else 0.0)
        assert eff.block("discovery").ties == ("last" if name == "discovery" else "first")
        row = base_row(sweep, spec)
        assert row["variant"] == name and "variant" in spec.name
        config = json.loads(row["config_json"])
        assert config["model"]["init"] == eff.model.init  # the row's config is the variant's


def test_a_method_runs_once_for_variants_that_change_nothing_it_depends_on(tiny):
    sweep = tiny(methods=["subtask_induction", "full_transfer", "scratch"], variants=VARIANTS, seeds=[0, 1])
    specs = expand(sweep)
    count = {m: sum(s.method == m for s in specs) for m in ("subtask_induction", "full_transfer", "scratch")}
    # Discovery settings touch only the mask: the methods without one run for `paper` and `init` only.
    assert count == {"subtask_induction": 3 * 2, "full_transfer": 2 * 2, "scratch": 2 * 2}  # variants x seeds
    assert len({trial_hash(sweep, s) for s in specs}) == len(specs)
    keys = {
        s.axes["variant"]: dict(upstream_keys(sweep, s))
        for s in specs
        if s.method == "subtask_induction" and s.seed == 0 and s.data_fraction == 0.5
    }
    assert keys["paper"]["source"] == keys["discovery"]["source"] != keys["init"]["source"]
    assert keys["paper"]["mask"] != keys["discovery"]["mask"]


def test_a_variant_equal_to_the_sweep_is_the_same_trial_as_the_sweep_without_variants(tiny):
    plain, with_variants = tiny(methods=["scratch"]), tiny(methods=["scratch"], variants={"paper": {}})
    hashes = [trial_hash(with_variants, s) for s in expand(with_variants)]
    assert [trial_hash(plain, s) for s in expand(plain)] == hashes


def test_rows_keep_the_variant_column_between_axes_and_results(tiny):
    sweep = tiny(methods=["scratch"], variants={"a": {}, "b": {"model.init": "gpt2"}}, axes={"training.lr": [1e-3]})
    table = frame([base_row(sweep, s) | {"status": "pending"} for s in expand(sweep)])
    columns = list(table.columns)
    assert columns.index("training.lr") < columns.index("variant") < columns.index("test_acc")
    assert set(table["variant"]) == {"a", "b"}


@pytest.mark.parametrize(
    "variants, extra, fragments",
    [
        ({"x": {"model.inti": "gpt2"}}, {}, ["variants.x.model.inti", "unknown config path", "model.init"]),
        ({"x": {"training.lr": -1.0}}, {}, ["variants.x", "training.lr", "greater than 0"]),
        ({"x": {"training.lr": 1e-3}}, {"axes": {"training.lr": [1e-3, 2e-3]}}, ["variants.x", "also an axis"]),
        ({"x y": {}}, {}, ["'x y'", "not a usable name"]),
        ({"x": ["model.init", "gpt2"]}, {}, ["variants.x", "mapping of config paths"]),
        ({"x": {"seeds": [1]}}, {}, ["variants.x.seeds", "not an experiment setting"]),
        ({"x": {"model.d_model": 15}}, {}, ["variants.x", "d_model"]),
        ({"x": {"task.name": "shapes"}}, {}, ["variants.x.task.name", "one task"]),
        ({"x": {"model.d_model": 12}}, {"axes": {"model.n_heads": [2, 5]}}, ["variants.x with axes.model.n_heads=5"]),
    ],
)
def test_bad_variants_are_refused_naming_the_variant_and_the_setting(variants, extra, fragments):
    with pytest.raises(ConfigError) as err:
        load_sweep(tiny_raw(variants=variants, **extra))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_variants_cannot_be_an_axis():
    with pytest.raises(ConfigError, match="variants cannot be swept"):
        load_sweep(tiny_raw(axes={"variants": [{}]}))


def test_validate_lists_the_variants(tmp_path, capsys):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(methods=["scratch"], variants=VARIANTS)))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "variant init: model.init=gpt2" in out and "variant paper: the sweep as written" in out
    assert "2 trials" in out  # scratch x {paper, init}: the discovery variant's scratch is paper's trial


def test_a_setting_whose_value_is_null_can_be_varied_and_swept():
    sweep = load_sweep(
        tiny_raw(variants={"stop": {"training.target_val_acc": 0.9}}, axes={"training.patience": [None, 3]})
    )
    values = {(s.axes["variant"], s.axes["training.patience"]) for s in expand(sweep)}
    assert values == {("stop", None), ("stop", 3)}
    spec = next(s for s in expand(sweep) if s.axes["training.patience"] == 3)
    assert sweep.effective(spec.method, spec.axes).training.target_val_acc == 0.9
