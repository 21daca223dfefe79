"""Bad input: one clear message naming the field or path, exit code 2, nothing written or lost."""

import json

import pytest
import yaml

from orchestrator.cli import main
from tests.conftest import tiny_raw


def _yaml(**overrides):
    return yaml.safe_dump(tiny_raw(**overrides), sort_keys=False)


def _replace(key, value):
    raw = tiny_raw()
    raw[key] = value
    return yaml.safe_dump(raw)


def _drop(key):
    raw = tiny_raw()
    del raw[key]
    return yaml.safe_dump(raw)


# (case id, file text, fragments the message must contain)
CASES = [
    ("malformed-yaml", "name: x\ntask: [unclosed\n", ["malformed YAML", "line"]),
    ("not-a-mapping", "- just\n- a list\n", ["top level must be a mapping"]),
    ("unknown-top-key", _yaml(colour="blue"), ["colour", "Extra inputs are not permitted"]),
    ("unknown-task", _yaml(task={"name": "sorting"}), ["task.name", "unknown task 'sorting'", "modular_arithmetic"]),
    ("unknown-model", _yaml(model={"name": "lstm"}), ["model.name", "unknown model 'lstm'", "gpt"]),
    ("unknown-method", _yaml(methods=["subtask_induction", "magic"]), ["methods", "magic", "scratch"]),
    ("bad-expression", _yaml(task={"base": "a + + "}), ["task.base", "expected a number"]),
    ("smuggled-code", _yaml(task={"subtask": "__import__('os').system('ls')"}), ["task.subtask", "unknown name"]),
    ("sparsity-one", _yaml(sparsities=[0.5, 1.0]), ["axes.mask.sparsity", "value 1.0", "less than 1"]),
    ("sparsity-negative", _yaml(sparsities=[-0.1]), ["axes.mask.sparsity", "greater than or equal to 0"]),
    ("fraction-above-one", _yaml(data_fractions=[0.5, 1.5]), ["data_fractions", "[0, 1]"]),
    ("fraction-negative", _yaml(data_fractions=[-0.2]), ["data_fractions", "[0, 1]"]),
    ("empty-methods", _yaml(methods=[]), ["methods", "at least 1"]),
    ("empty-fractions", _yaml(data_fractions=[]), ["data_fractions", "at least 1"]),
    ("empty-seeds", _yaml(seeds=[]), ["seeds", "at least 1"]),
    ("empty-sparsities", _yaml(sparsities=[]), ["mask.sparsity", "give at least one value"]),
    ("sparsities-and-axis", _yaml(sparsities=[0.5], axes={"mask.sparsity": [0.9]}), ["sparsities", "keep one"]),
    ("unknown-training-key", _yaml(training={"learning_rate": 0.1}), ["training.learning_rate", "Extra inputs"]),
    ("negative-lr", _yaml(source={"lr": -1}), ["source.lr", "greater than 0"]),
    ("wrong-type", _yaml(training={"epochs": "ten"}), ["training.epochs", "integer"]),
    ("heads-do-not-divide", _yaml(model={"d_model": 15}), ["d_model (15) must be divisible by n_heads"]),
    ("too-many-samples", _yaml(task={"n_base": 10**6}), ["distinct (a, b) pairs", "operand_range"]),
    ("not-a-competing-reading", _yaml(task={"competing": ["a + b"]}), ["not a competing reading"]),
    ("missing-task", _drop("task"), ["task: missing", "modular_arithmetic"]),
    ("task-not-a-mapping", _yaml(task="modular_arithmetic"), ["task: expected a mapping with a 'name' key"]),
    ("duplicate-seeds", _yaml(seeds=[0, 0]), ["seeds", "more than once"]),
    ("zero-cpu", _yaml(resources={"cpu": 0}), ["resources.cpu", "greater than 0"]),
    ("bad-unmasked", _yaml(transfer={"unmasked": "zero"}), ["transfer.unmasked", "'keep' or 'reinit'"]),
    ("bad-name", _yaml(name="../escape"), ["name", "not a usable name"]),
    ("model-does-not-fit-task", _replace("model", {"name": "resnet18"}), ["model 'resnet18' does not fit task", "gpt"]),
    ("bad-selection-key", _yaml(discovery={"selection": {"heads": True}}), ["discovery.selection.heads"]),
    ("same-budget-twice", _yaml(data_fractions=[0.5, 0.501]), ["data_fractions", "n = 50", "drop one"]),
]


@pytest.mark.parametrize("text, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_sweep_files_exit_2_with_a_clear_message(tmp_path, capsys, command, text, fragments):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    argv = [command, str(path)] + (["--out", str(out)] if command == "run" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not out.exists(), "a rejected sweep must write nothing"


def test_missing_sweep_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such sweep file" in capsys.readouterr().err


def test_out_dir_holding_another_sweep_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rows").mkdir()
    precious = out / "rows" / "other.json"
    precious.write_text("{}")
    (out / "sweep.json").write_text(json.dumps({"name": "other", "config_hash": "0000", "config": {}}))
    path = tmp_path / "sweep.yaml"
    path.write_text(_yaml())
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep" in err and "--force" in err
    assert precious.read_text() == "{}"
    assert json.loads((out / "sweep.json").read_text())["name"] == "other"


def test_status_of_a_non_sweep_dir(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a sweep output directory" in capsys.readouterr().err


def test_case_table_is_large_enough():
    assert len(CASES) >= 20
