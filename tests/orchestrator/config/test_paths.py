"""Any config path as a sweep axis, trial identity, and reuse of finished trials one by one."""

import json

import pytest
import yaml

from orchestrator.artifacts import ArtifactStore
from orchestrator.cli import main
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, base_row, expand, identity, run_trial, trial_hash, upstream_keys
from tests.conftest import tiny_raw


def test_axes_expand_to_the_product_and_skip_axes_a_method_ignores(tiny):
    sweep = tiny(
        methods=["subtask_induction", "scratch"],
        seeds=[0, 1],
        axes={"model.n_layers": [1, 2], "transfer.unmasked": ["keep", "reinit"]},
    )
    specs = expand(sweep)
    si = [s for s in specs if s.method == "subtask_induction"]
    scratch = [s for s in specs if s.method == "scratch"]
    assert len(si) == 2 * 2 * 2  # depths x unmasked x seeds
    assert len(scratch) == 2 * 2  # scratch transfers nothing: transfer.unmasked is not its axis
    assert {(s.axes["model.n_layers"], s.axes["transfer.unmasked"]) for s in si} == {
        (1, "keep"), (1, "reinit"), (2, "keep"), (2, "reinit")
    }  # fmt: skip
    assert all("transfer.unmasked" not in s.axes for s in scratch)
    assert len({s.name for s in specs}) == len(specs)


def test_each_row_carries_its_axis_values_and_its_effective_config(tiny):
    sweep = tiny(
        methods=["subtask_induction", "scratch"],
        axes={"model.n_layers": [1, 2], "transfer.unmasked": ["keep", "reinit"]},
    )
    for spec in expand(sweep):
        row = base_row(sweep, spec)
        config = json.loads(row["config_json"])
        assert row["model.n_layers"] == spec.axes["model.n_layers"] == config["model"]["n_layers"]
        if spec.method == "scratch":
            assert row["transfer.unmasked"] is None and "transfer" not in config
        else:
            assert row["transfer.unmasked"] == config["transfer"]["unmasked"] == spec.axes["transfer.unmasked"]


def test_artifacts_change_only_where_the_axis_enters_their_key(tiny):
    lr = tiny(axes={"training.lr": [1e-3, 3e-3]})
    keys = {s.axes["training.lr"]: upstream_keys(lr, s) for s in expand(lr) if s.method == "subtask_induction"}
    assert keys[1e-3] == keys[3e-3], "downstream lr does not touch the source model or the mask"
    depth = tiny(axes={"model.n_layers": [1, 2]})
    keys = {
        s.axes["model.n_layers"]: dict(upstream_keys(depth, s))
        for s in expand(depth)
        if s.method == "subtask_induction"
    }
    assert keys[1]["source"] != keys[2]["source"] and keys[1]["mask"] != keys[2]["mask"]
    sparse = tiny(axes={"discovery.l0_lambda": [1e-7, 1e-6]})
    keys = {
        s.axes["discovery.l0_lambda"]: dict(upstream_keys(sparse, s))
        for s in expand(sparse)
        if s.method == "subtask_induction"
    }
    assert keys[1e-7]["source"] == keys[1e-6]["source"] and keys[1e-7]["mask"] != keys[1e-6]["mask"]


def test_an_axis_run_uses_its_value(tiny, tmp_path):
    sweep = tiny(methods=["scratch"], axes={"model.n_layers": [1, 2]})
    rows = {s.axes["model.n_layers"]: run_trial(sweep, s, ArtifactStore(tmp_path)) for s in expand(sweep)}
    assert rows[1]["val_acc"] != rows[2]["val_acc"] or rows[1]["measurements_json"] != rows[2]["measurements_json"]
    sweep_2 = tiny(methods=["scratch"], model={"n_layers": 2})
    plain = run_trial(sweep_2, TrialSpec(method="scratch", data_fraction=0.5, seed=0), ArtifactStore(tmp_path))
    assert plain["val_acc"] == rows[2]["val_acc"], "an axis value runs exactly like the same value in the block"


@pytest.mark.parametrize(
    "axes, fragments",
    [
        ({"training.lr": [1e-3, -1.0]}, ["axes.training.lr", "-1.0", "greater than 0"]),
        ({"transfer.unmasked": ["keep", "zero"]}, ["axes.transfer.unmasked", "'zero'", "'keep' or 'reinit'"]),
        ({"model.d_model": [16, 15]}, ["axes.model.d_model", "divisible by n_heads"]),
        ({"training.lrr": [1e-3]}, ["training.lrr", "unknown config path", "training.lr"]),
        ({"model.n_layer": [1, 2]}, ["model.n_layer", "did you mean", "model.n_layers"]),
        ({"resources.cpu": [1, 2]}, ["resources.cpu cannot be an axis", "do not change results"]),
        ({"seeds": [0, 1]}, ["seeds cannot be an axis", "seeds:"]),
    ],
)
def test_bad_axes_exit_2_naming_the_path_and_the_rule(tmp_path, capsys, axes, fragments):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(axes=axes)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_identity_ignores_resources_and_names_but_not_results(tiny):
    base = tiny(methods=["subtask_induction", "scratch"])
    same = tiny(methods=["subtask_induction", "scratch"], name="renamed", max_failures=3,
                resources={"cpu": 2, "max_concurrent": 1}, storage={"artifacts": "/tmp/elsewhere"})  # fmt: skip
    for spec in expand(base):
        assert trial_hash(base, spec) == trial_hash(same, spec)
    lr = tiny(methods=["subtask_induction", "scratch"], method_overrides={"scratch": {"training.lr": 0.01}})
    changed = [s.method for s in expand(base) if trial_hash(base, s) != trial_hash(lr, s)]
    assert changed == ["scratch"], "a setting reruns exactly the trials it affects"
    discovery = tiny(methods=["subtask_induction", "scratch"], discovery={"epochs": 3})
    changed = [s.method for s in expand(base) if trial_hash(base, s) != trial_hash(discovery, s)]
    assert changed == ["subtask_induction"], "scratch does not depend on mask discovery"
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    assert "source" not in identity(base, spec) and "discovery" not in identity(base, spec)


def test_plugin_analysis_runs_through_the_sweep_file(tiny, tmp_path):
    sweep = tiny(methods=["scratch"], plugins=["tests.plugins.probe_analysis"], analyses=["probe"])
    row = run_trial(sweep, TrialSpec(method="scratch", data_fraction=0.5, seed=0), ArtifactStore(tmp_path))
    assert row["probe_norm"] > 0
    assert json.loads(row["config_json"])["analyses"][-1]["name"] == "probe"


def test_unknown_analysis_lists_the_valid_ones(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(analyses=["lmc_barier"])))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "analyses[0]" in err and "lmc_barier" in err and "splits" in err


def test_a_reused_row_takes_the_current_versions_name_and_axis_values(tiny, tmp_path):
    from orchestrator import results
    from orchestrator.outdir import prepare_out_dir, write_row

    first = tiny(methods=["scratch"], training={"lr": 1e-3})
    prepare_out_dir(first, tmp_path)
    spec = expand(first)[0]
    write_row(tmp_path, run_trial(first, spec, ArtifactStore(tmp_path / "store")))
    grown = tiny(methods=["scratch"], axes={"training.lr": [1e-3, 3e-3]})
    table = results.collect(tmp_path, grown, expand(grown)).set_index("training.lr")
    assert table.loc[1e-3, "status"] == "done", "the same trial under an axis is reused"
    assert table.loc[3e-3, "status"] == "pending"
    assert "training.lr=0.001" in table.loc[1e-3, "trial"]


def test_an_analysis_that_needs_a_mask_puts_every_method_on_the_sparsity_axis(tiny, tmp_path):
    sweep = tiny(methods=["scratch"], plugins=["tests.plugins.mask_analysis"], analyses=["maskprobe"], sparsities=[0.5])
    (spec,) = expand(sweep)
    assert spec.axes == {"mask.sparsity": 0.5}
    row = run_trial(sweep, spec, ArtifactStore(tmp_path))
    assert type(row["maskprobe_density"]) is float and row["maskprobe_density"] == pytest.approx(0.5, abs=0.01)
    assert type(row["maskprobe_tensors"]) is int
    json.dumps(row)  # numpy scalars would not serialise


@pytest.mark.parametrize(
    "raw, fragments",
    [
        (tiny_raw(axes={"task.name": ["modular_arithmetic"]}), ["task.name cannot be an axis"]),
        (tiny_raw(axes={"model.name": ["gpt", "mlp"]}), ["axes.model.name: value 'mlp' is invalid", "model.d_model"]),
        (tiny_raw(methods=["l2sp"], l2sp={1: 2}), ["l2sp"]),
        (tiny_raw(analyses=[{"name": "lmc_barrier", 1: 2}]), ["analyses[0]"]),
    ],
)
def test_odd_input_is_a_clear_error_not_a_traceback(tmp_path, capsys, raw, fragments):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err


def test_a_date_as_an_axis_value_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()) + "axes:\n  task.modulus: [2024-01-01]\n")
    assert main(["validate", str(path)]) == 2
    assert "axes.task.modulus" in capsys.readouterr().err


def test_the_architecture_is_an_axis(tmp_path):
    raw = tiny_raw(methods=["full_transfer", "scratch"], axes={"model.name": ["gpt", "mlp"]})
    raw["model"] = {"name": "gpt", "n_layers": 1, "dropout": 0.1}  # fields both architectures take
    sweep = load_sweep(raw)
    specs = expand(sweep)
    assert sorted((s.method, s.axes["model.name"]) for s in specs) == [
        ("full_transfer", "gpt"), ("full_transfer", "mlp"), ("scratch", "gpt"), ("scratch", "mlp")
    ]  # fmt: skip
    mlp = sweep.effective("scratch", {"model.name": "mlp"}).model
    assert mlp.name == "mlp" and mlp.n_layers == 1 and mlp.dropout == 0.1  # the file's settings carry over
    keys = {s.axes["model.name"]: upstream_keys(sweep, s) for s in specs if s.method == "full_transfer"}
    assert keys["gpt"] != keys["mlp"]  # each architecture has its own source
    rows = [run_trial(sweep, s, ArtifactStore(tmp_path)) for s in specs]
    assert len({r["trial_hash"] for r in rows}) == 4
    assert {json.loads(r["config_json"])["model"]["name"] for r in rows} == {"gpt", "mlp"}


def test_select_on_a_split_the_task_lacks_exits_2_before_anything_runs(tmp_path, capsys):
    """`training.select: {split, label}` is checked against the task's data when the file is read,
    for every method whose effective settings select so (a method override included)."""
    path = tmp_path / "sweep.yaml"
    raw = tiny_raw(method_overrides={"scratch": {"training.select": {"split": "cue_conflict_val", "label": "shape"}}})
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "training.select (scratch): this task has no validation split 'cue_conflict_val'; it has: val" in err
    # Set by an axis alike.
    select = {"split": "cue_conflict_val", "label": "shape"}
    path.write_text(yaml.safe_dump(tiny_raw(axes={"training.select": ["val_acc", select]})))
    assert main(["validate", str(path)]) == 2
    assert "training.select (subtask_induction, scratch): this task has no validation split" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(tiny_raw(training={**tiny_raw()["training"], "select": {"split": "test"}})))
    assert main(["validate", str(path)]) == 2
    assert "'test' is not a validation split" in capsys.readouterr().err
    path.write_text(yaml.safe_dump(tiny_raw(method_overrides={"scratch": {"training.select": {"split": "val"}}})))
    assert main(["validate", str(path)]) == 0
