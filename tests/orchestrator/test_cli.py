"""Bad input: one clear message naming the field or path, exit code 2, nothing written or lost.
Then `--set` and plug-ins beside the sweep file, end to end."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
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
    ("report-versus-unknown", _yaml(report={"versus": "l2sp"}), ["report.versus", "'l2sp' is not one of methods"]),
    ("report-margin-zero", _yaml(report={"margin": 0}), ["report.margin", "greater than 0"]),
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


# (case id, --set arguments, fragments the message must contain)
SET_CASES = [
    ("no-equals", ["--set", "training.lr"], ["--set 'training.lr'", "expected PATH=VALUE"]),
    ("bad-yaml", ["--set", "seeds=[0,"], ["--set 'seeds=[0,'", "not valid YAML"]),
    ("unknown-path", ["--set", "training.lrr=0.1"], ["--set training.lrr=0.1", "training.lrr", "Extra inputs"]),
    ("bad-value", ["--set", "training.lr=-1"], ["training.lr", "greater than 0"]),
    ("into-a-value", ["--set", "task.name.x=1"], ["task.name is not a mapping", "set task.name itself"]),
    ("bare-bad-axis", ["axes.model.n_layerz=[1, 2]"], ["axes.model.n_layerz", "did you mean model.n_layers"]),
]


@pytest.mark.parametrize("args, fragments", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_set_exits_2_with_a_clear_message(tmp_path, capsys, command, args, fragments):
    path = tmp_path / "sweep.yaml"
    path.write_text(_yaml())
    out = tmp_path / "out"
    argv = [command, str(path), *args] + (["--out", str(out)] if command == "run" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not out.exists(), "a rejected sweep must write nothing"


def test_a_stray_argument_suggests_set(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(_yaml())
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(path), "training.lr", "0.1"])
    assert exit_.value.code == 2 and "--set PATH=VALUE" in capsys.readouterr().err
    assert main(["validate", str(path), "training.lr=0.004", "--set", "seeds=[3, 4]"]) == 0
    assert "seeds [3, 4]" in capsys.readouterr().out


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


def _instill(*args, cwd: Path) -> subprocess.CompletedProcess:
    """The `instill` command in a subprocess, in `cwd`, with no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [str(Path(sys.executable).parent / "instill"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_set_and_a_plugin_beside_the_sweep_file_end_to_end(tmp_path):
    lab, elsewhere, out = tmp_path / "lab", tmp_path / "elsewhere", tmp_path / "out"
    lab.mkdir()
    elsewhere.mkdir()
    shutil.copy(Path(__file__).parents[1] / "plugins" / "probe_analysis.py", lab / "probe_analysis.py")
    sweep = lab / "sweep.yaml"
    sweep.write_text(_yaml(methods=["scratch"], plugins=["probe_analysis"], analyses=["probe"]))
    sets = ["--set", "training.lr=0.004", "--set", "seeds=[0, 1]"]

    validated = _instill("validate", sweep, *sets, cwd=elsewhere)
    assert validated.returncode == 0, validated.stderr
    assert "seeds [0, 1]" in validated.stdout
    ran = _instill("run", sweep, "--out", out, "--num-cpus", "1", *sets, cwd=elsewhere)
    assert ran.returncode == 0, ran.stderr
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["seed"]) == [0, 1] and (table["status"] == "done").all()
    assert {json.loads(c)["training"]["lr"] for c in table["config_json"]} == {0.004}
    assert table["probe_norm"].notna().all(), "the plug-in analysis ran in the Ray workers"
    record = json.loads((out / "sweep.json").read_text())
    assert record["overrides"] == ["training.lr=0.004", "seeds=[0, 1]"]
    assert record["plugin_paths"] == {"probe_analysis": str(lab.resolve())}

    reported = _instill("report", out, cwd=elsewhere)
    assert reported.returncode == 0, reported.stderr
    assert pd.read_parquet(out / "report" / "summary.parquet")["probe_norm_mean"].notna().all()
    summary = (out / "report" / "summary.md").read_text()
    assert "training.lr=0.004 seeds=[0, 1]" in summary and f"probe_analysis ({lab.resolve()})" in summary
    status = _instill("status", out, cwd=elsewhere)
    assert status.returncode == 0 and "2 done" in status.stdout and "warning" not in status.stdout, status

    (lab / "probe_analysis.py").rename(lab / "moved_away.py")
    status = _instill("status", out, cwd=elsewhere)
    assert status.returncode == 0, status.stderr
    assert "cannot import 'probe_analysis'" in status.stdout and "2 done" in status.stdout
    reported = _instill("report", out, cwd=elsewhere)
    assert reported.returncode == 0, reported.stderr
    assert "cannot import 'probe_analysis'" in reported.stdout and "not summarised" in reported.stdout
