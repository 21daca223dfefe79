"""The "Write a model" and "Write a task" guides of docs/EXTENDING.md run as written: each
`<!-- example: FILE -->` code block is written to FILE, loaded as a sweep's plug-in, and a sweep of
the example task with the example model (and with built-in models) runs a Subtask Induction trial."""

import re
from pathlib import Path

import pytest

from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import run_trial
from orchestrator.trial.grid import expand

DOC = Path(__file__).resolve().parents[2] / "docs" / "EXTENDING.md"
EXAMPLE = re.compile(r"<!-- example: (?P<file>[\w.]+) -->\n```python\n(?P<code>.*?)\n```", re.S)


def _examples() -> dict[str, str]:
    return {m["file"]: m["code"] + "\n" for m in EXAMPLE.finditer(DOC.read_text())}


def _raw(model: dict) -> dict:
    return {
        "name": "doc-example",
        "plugins": ["bag_of_tokens", "sum_mod"],
        "task": {"name": "sum_mod", "n_train": 300, "pool_size": 100, "n_val": 50},
        "model": model,
        "source": {"epochs": 2, "lr": 1e-3},
        "discovery": {"epochs": 2, "batch_size": 100},
        "training": {"epochs": 2, "lr": 1e-3},
        "methods": ["subtask_induction", "scratch"],
        "sparsities": [0.5],
        "data_fractions": [0.5],
        "seeds": [0],
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    examples = _examples()
    assert set(examples) == {"bag_of_tokens.py", "sum_mod.py"}, "the guides' examples"
    out = tmp_path_factory.mktemp("doc_examples")
    for name, code in examples.items():
        (out / name).write_text(code)
    return out


@pytest.mark.parametrize(
    "model", [{"name": "bag_of_tokens", "width": 16}, {"name": "gpt", "n_layers": 1, "d_model": 16, "n_heads": 2}]
)
def test_the_guides_example_task_and_model_run_a_trial(tmp_path, folder, model):
    sweep = load_sweep(_raw(model), search=(folder,))
    store = ArtifactStore(tmp_path / "store")
    rows = {spec.method: run_trial(sweep, spec, store) for spec in expand(sweep)}
    assert all(0.0 <= row["test_acc"] <= 1.0 for row in rows.values())
    assert rows["subtask_induction"]["mask_density"] == pytest.approx(0.5, abs=1e-3)


def test_a_model_that_does_not_accept_the_tasks_inputs_is_refused_as_the_guide_says(folder):
    with pytest.raises(ValueError) as err:
        load_sweep(_raw({"name": "resnet18"}), search=(folder,))
    quoted = re.search(r"is refused: `(.*?)`", " ".join(DOC.read_text().split()))[1]
    assert quoted.split("models that accept tokens: ")[0] in " ".join(str(err.value).split())
    assert re.search(r"models that accept tokens: .*bag_of_tokens, .*gpt, hf_gpt2, mlp", str(err.value))
