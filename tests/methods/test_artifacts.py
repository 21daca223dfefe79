"""An artifact kind with a settings block of its own: validated under its name, in the key and the
identity of what needs it, sweepable by path, computed once per key."""

import yaml

from orchestrator.artifacts import ArtifactStore
from orchestrator.cli import main
from orchestrator.trial import TrialSpec, expand, identity, run_trial, upstream_keys
from tests.conftest import tiny_raw

PLUGIN = ["tests.plugins.guide_kind"]


def test_the_block_is_validated_and_defaults_when_needed(tiny, tmp_path, capsys):
    sweep = tiny(plugins=PLUGIN, methods=["uses_guide", "scratch"])
    assert sweep.block("probe_guide").scale == 1.0, "a needed kind's block defaults"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(plugins=PLUGIN, methods=["uses_guide"], probe_guide={"scale": -1})))
    assert main(["validate", str(path)]) == 2
    assert "probe_guide.scale: Input should be greater than 0" in capsys.readouterr().err


def test_the_block_enters_the_key_and_identity_of_what_needs_it_only(tiny):
    a = tiny(plugins=PLUGIN, methods=["uses_guide", "scratch"], probe_guide={"scale": 1.0})
    b = tiny(plugins=PLUGIN, methods=["uses_guide", "scratch"], probe_guide={"scale": 2.0})
    guide = TrialSpec(method="uses_guide", data_fraction=0.5, seed=0)
    scratch = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    assert identity(a, guide)["probe_guide"] == {"scale": 1.0}
    assert identity(a, guide) != identity(b, guide) and identity(a, scratch) == identity(b, scratch)
    keys_a, keys_b = dict(upstream_keys(a, guide)), dict(upstream_keys(b, guide))
    assert keys_a["source"] == keys_b["source"] and keys_a["probe_guide"] != keys_b["probe_guide"]


def test_the_block_is_an_axis_and_the_kind_runs_in_a_trial(tiny, tmp_path):
    sweep = tiny(plugins=PLUGIN, methods=["uses_guide"], axes={"probe_guide.scale": [1.0, 0.5]})
    specs = expand(sweep)
    assert sorted(s.axes["probe_guide.scale"] for s in specs) == [0.5, 1.0]
    rows = [run_trial(sweep, s, ArtifactStore(tmp_path)) for s in specs]
    assert sorted(r["probe_guide_scale"] for r in rows) == [0.5, 1.0]
    assert all(r["probe_guide_computed"] for r in rows) and all(r["status"] == "done" for r in rows)


def test_a_source_that_never_learnt_gates_its_trials_and_their_findings(tiny, tmp_path):
    """Quality gates (`ArtifactKind.gates`): the tiny source at a learning rate far too small stays
    near chance (1/7), so its trials record `source.learnt` and `mask.computes_subtask` as failed,
    and its findings are gated; an accuracy halfway from chance to 1 passes. Scratch needs no
    artifact and records none."""
    from orchestrator.report import findings, paired_differences
    from orchestrator.results import frame

    spec = TrialSpec(method="subtask_induction", data_fraction=0.5, seed=0, axes={"mask.sparsity": 0.5})
    stuck = run_trial(tiny(source={"lr": 1e-7, "epochs": 1}), spec, ArtifactStore(tmp_path / "a"))
    assert stuck["source_val_acc"] < (1 + 1 / 7) / 2
    assert stuck["gates_failed"] == "source.learnt,mask.computes_subtask"
    from methods import ARTIFACTS

    assert ARTIFACTS.get("source").gates({"val_acc": 0.6}, 1 / 7) == {"learnt": True}  # halfway: 0.571
    assert ARTIFACTS.get("mask").gates({"subtask_acc": 0.5}, 1 / 7) == {"computes_subtask": False}
    scratch = run_trial(tiny(source={"lr": 1e-7, "epochs": 1}), TrialSpec(method="scratch", data_fraction=0.5, seed=0),
                        ArtifactStore(tmp_path / "a"))  # fmt: skip
    assert "gates_failed" not in scratch
    table = frame([stuck, {**scratch, "seed": 0}])
    assert list(findings(paired_differences(table, "scratch"))["verdict"]) == ["gated"]
