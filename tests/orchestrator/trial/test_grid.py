"""Identity from what a trial reads: the blocks a method, analysis or artifact kind declares (and
nothing else it can read), the source of the plug-in modules it uses, and beside the key the
project's code version, whose other values `--rerun-stale` reruns.

Sweeps here run without Ray: `run_here` decides what to run as `run_sweep` does (`to_run`) and
runs it trial by trial."""

import importlib
import json
import re
import sys
import textwrap
import types

import pytest
import torch
import yaml

import tasks
from common.config import UndeclaredBlock
from common.provenance import code_version, defining_module
from methods import ANALYSES, ARTIFACTS, METHODS
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.outdir import prepare_out_dir, read_row, row_name, store_for, write_row
from orchestrator.sweep import to_run
from orchestrator.trial import TrialSpec, Upstream, expand, identity, run_trial, trial_hash
from tests.conftest import tiny_raw

CPU = torch.device("cpu")


def run_here(sweep, out, rerun_stale=False) -> list[TrialSpec]:
    """Run the trials `instill run` would run in `out` (without Ray); the trials run."""
    prepare_out_dir(sweep, out)
    todo, _ = to_run(sweep, out, expand(sweep), rerun_stale)
    for spec in todo:
        write_row(out, run_trial(sweep, spec, store_for(sweep, out)))
    return todo


def _forget(module: str) -> None:
    """Unregister what `module` registered and unload it, so importing it again runs its new source."""
    for registry in (METHODS, ANALYSES, ARTIFACTS, tasks.TASKS, tasks.MODELS):
        for name, obj in registry.items():
            if defining_module(obj) == module:
                del registry._items[name]  # registries refuse duplicates: a test's reload only
    sys.modules.pop(module, None)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """`write(name, source)` puts module `name` on the path; `reload(name)` imports its current
    source; what they registered is forgotten after the test."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an edit within a second must not load a stale .pyc
    names: list[str] = []

    def write(name: str, source: str) -> None:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)

    def reload(name: str):
        _forget(name)
        importlib.invalidate_caches()
        return importlib.import_module(name)

    yield types.SimpleNamespace(write=write, reload=reload)
    for name in names:
        _forget(name)


def _finished(out, sweep) -> dict[str, float]:
    return {s.name: read_row(out, sweep, s)["finished_at"] for s in expand(sweep)}


# --- declared blocks ---------------------------------------------------------------------------


def test_changing_l2sp_alpha_reruns_only_the_l2sp_trials(tmp_path):
    raw = tiny_raw(methods=["l2sp", "scratch", "full_transfer"], l2sp={"alpha": 0.01}, seeds=[0, 1])
    first = load_sweep(raw)
    assert len(run_here(first, tmp_path)) == 6
    before = _finished(tmp_path, first)
    assert run_here(first, tmp_path) == [], "a finished sweep runs nothing"

    changed = load_sweep({**raw, "l2sp": {"alpha": 0.1}})
    ran = run_here(changed, tmp_path)
    assert sorted(s.name for s in ran) == sorted(s.name for s in expand(changed) if s.method == "l2sp")
    after = _finished(tmp_path, changed)
    for name, finished in after.items():
        assert (finished == before[name]) == (not name.startswith("l2sp")), name


def test_a_kind_that_reads_an_undeclared_block_raises_naming_the_declaration(plugins, tiny):
    plugins.write(
        "peeking_kind",
        """
        from methods.artifacts import ArtifactKind, register_artifact
        from methods.registry import register_method


        @register_artifact("peeking", needs=("source",))
        class Peeking(ArtifactKind):
            def key(self, ctx):
                return {"source": ctx.key_of("source"), "epochs": ctx.settings.discovery.epochs}


        @register_artifact("declaring", needs=("source",), blocks=("discovery",))
        class Declaring(ArtifactKind):
            def key(self, ctx):
                return {"source": ctx.key_of("source"), "epochs": ctx.settings.block("discovery").epochs}


        @register_method("peeks", needs=("peeking",), description="test: needs a kind that peeks")
        def _peeks(ctx):
            return ctx.fresh


        @register_method("declares", needs=("declaring",), description="test: needs a kind that declares")
        def _declares(ctx):
            return ctx.fresh
        """,
    )
    plugins.reload("peeking_kind")
    sweep = tiny(plugins=["peeking_kind"], methods=["peeks", "declares"])
    message = (
        "artifact kind 'peeking' reads block 'discovery' but does not declare it: "
        "add it to blocks= in its @register_artifact"
    )
    with pytest.raises(UndeclaredBlock, match=re.escape(message)):
        Upstream(sweep, TrialSpec(method="peeks", data_fraction=0.5, seed=0), None, CPU).key("peeking")

    # Declared, the block is readable, in the kind's key and in its trials' identity.
    spec = TrialSpec(method="declares", data_fraction=0.5, seed=0)
    key = Upstream(sweep, spec, None, CPU).key("declaring")
    assert key["reads"]["discovery"] == sweep.block("discovery").canonical() and "model" in key["reads"]
    other = tiny(plugins=["peeking_kind"], methods=["peeks", "declares"], discovery={"l0_lambda": 1e-6})
    assert Upstream(other, spec, None, CPU).key("declaring") != key
    assert identity(other, spec)["discovery"] != identity(sweep, spec)["discovery"]


def test_a_method_or_analysis_reading_an_undeclared_block_raises(plugins, tiny, tmp_path):
    plugins.write(
        "peeking_method",
        """
        from methods.analysis import Column, register_analysis
        from methods.registry import register_method


        @register_method("peeks_at_transfer", description="test: reads transfer undeclared")
        def _peeks(ctx):
            assert ctx.block("transfer").unmasked
            return ctx.fresh


        @register_analysis("peekprobe", columns={"peekprobe_lr": Column()})
        def _peekprobe(ctx, model, config):
            return {"peekprobe_lr": ctx.block("source").lr}


        @register_analysis("readprobe", reads=("source",), columns={"readprobe_lr": Column()})
        def _readprobe(ctx, model, config):
            return {"readprobe_lr": ctx.block("source").lr + ctx.block("training").lr}
        """,
    )
    plugins.reload("peeking_method")
    sweep = tiny(plugins=["peeking_method"], methods=["peeks_at_transfer"])
    spec = TrialSpec(method="peeks_at_transfer", data_fraction=0.5, seed=0)
    store = ArtifactStore(tmp_path)
    message = (
        "method 'peeks_at_transfer' reads block 'transfer' but does not declare it: "
        "add it to reads= in its @register_method"
    )
    with pytest.raises(UndeclaredBlock, match=re.escape(message)):
        run_trial(sweep, spec, store)

    scratch = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    peeking = tiny(plugins=["peeking_method"], methods=["scratch"], analyses=["peekprobe"])
    message = (
        "analysis 'peekprobe' reads block 'source' but does not declare it: add it to reads= in its @register_analysis"
    )
    row = run_trial(peeking, scratch, store)  # an analysis's error is recorded, not the trial's
    assert json.loads(row["analysis_errors"])["peekprobe"].endswith(f"UndeclaredBlock: {message}")

    reading = tiny(plugins=["peeking_method"], methods=["scratch"], analyses=["readprobe"])
    assert run_trial(reading, scratch, store)["readprobe_lr"] == reading.block("source").lr + reading.training.lr
    assert "source" in identity(reading, scratch), "a block an analysis reads is in its trials' identity"
    faster = tiny(plugins=["peeking_method"], methods=["scratch"], analyses=["readprobe"], source={"lr": 1e-2})
    assert trial_hash(faster, scratch) != trial_hash(reading, scratch)


# --- plug-in source --------------------------------------------------------------------------

METHOD_PLUGIN = """
from edited_helper import SCALE
from methods.registry import register_method


@register_method("edited", description="test: a fresh model, scaled")
def _edited(ctx):
    model = ctx.fresh
    for p in model.parameters():
        p.data.mul_(SCALE * FACTOR)
    return model


FACTOR = {factor}
"""


def test_editing_a_plugin_method_reruns_only_its_trials(plugins, tmp_path):
    plugins.write("edited_helper", "SCALE = 1.0\n")
    plugins.write("edited_method", METHOD_PLUGIN.format(factor=1.0))
    plugins.reload("edited_method")
    raw = tiny_raw(plugins=["edited_method"], methods=["edited", "scratch", "full_transfer"])
    sweep = load_sweep(raw)
    edited = TrialSpec(method="edited", data_fraction=0.5, seed=0)
    assert set(identity(sweep, edited)["code"]) == {"edited_method"}
    for method in ("scratch", "full_transfer"):  # the project's own code is not in identities
        assert "code" not in identity(sweep, TrialSpec(method=method, data_fraction=0.5, seed=0))
    assert len(run_here(sweep, tmp_path)) == 3
    before = _finished(tmp_path, sweep)

    for step in (
        lambda: plugins.write("edited_method", METHOD_PLUGIN.format(factor=0.5)),  # the plug-in's file
        lambda: plugins.write("edited_helper", "SCALE = 0.5\n"),  # a module it imports
    ):
        step()
        plugins.reload("edited_helper")
        plugins.reload("edited_method")
        sweep = load_sweep(raw)
        assert [s.method for s in run_here(sweep, tmp_path)] == ["edited"]
        after = _finished(tmp_path, sweep)
        assert {n for n in after if after[n] != before[n]} == {n for n in after if n.startswith("edited")}
        before = after
    assert run_here(sweep, tmp_path) == [], "unedited, nothing reruns"


ANALYSIS_PLUGIN = """
from methods.analysis import Column, register_analysis


@register_analysis("edprobe", columns={{"edprobe_value": Column()}})
def _edprobe(ctx, model, config):
    return {{"edprobe_value": {value}}}
"""

KIND_PLUGIN = """
import torch

from methods.artifacts import ArtifactKind, register_artifact
from methods.registry import register_method


@register_artifact("edkind", needs=("source",))
class EdKind(ArtifactKind):
    def key(self, ctx):
        return {{"source": ctx.key_of("source")}}

    def compute(self, ctx):
        return {{"value": torch.tensor([{value}])}}, {{"value": {value}}}

    def load(self, ctx, tensors, meta):
        return meta["value"]

    def columns(self, meta):
        return {{"edkind_value": meta["value"]}}


@register_method("uses_edkind", needs=("edkind",), description="test: scratch that needs edkind")
def _uses(ctx):
    return ctx.fresh
"""


def test_editing_a_plugin_analysis_or_kind_reruns_the_trials_using_it(plugins, tmp_path):
    plugins.write("edited_analysis", ANALYSIS_PLUGIN.format(value=1.0))
    plugins.write("edited_kind", KIND_PLUGIN.format(value=1.0))
    for name in ("edited_analysis", "edited_kind"):
        plugins.reload(name)
    raw = tiny_raw(plugins=["edited_analysis", "edited_kind"], methods=["scratch", "uses_edkind"], analyses=["edprobe"])
    sweep = load_sweep(raw)
    assert len(run_here(sweep, tmp_path)) == 2
    (kind_key,) = [k for k, _, _ in ArtifactStore(tmp_path / "artifacts").entries("edkind")]
    assert set(kind_key["code"]) == {"edited_kind"}

    plugins.write("edited_analysis", ANALYSIS_PLUGIN.format(value=2.0))
    plugins.reload("edited_analysis")
    sweep = load_sweep(raw)
    assert sorted(s.method for s in run_here(sweep, tmp_path)) == ["scratch", "uses_edkind"], "both run it"
    assert {read_row(tmp_path, sweep, s)["edprobe_value"] for s in expand(sweep)} == {2.0}

    plugins.write("edited_kind", KIND_PLUGIN.format(value=3.0))
    plugins.reload("edited_kind")
    sweep = load_sweep(raw)
    assert [s.method for s in run_here(sweep, tmp_path)] == ["uses_edkind"]
    row = read_row(tmp_path, sweep, TrialSpec(method="uses_edkind", data_fraction=0.5, seed=0))
    assert row["edkind_value"] == 3.0 and row["edkind_computed"], "the edited kind's artifact is recomputed"
    assert len(ArtifactStore(tmp_path / "artifacts").entries("source")) == 1, "the source is not"


# --- the project's code version ----------------------------------------------------------------


def test_rows_and_artifacts_record_the_code_version_outside_the_identity(tiny, tmp_path):
    version = code_version()
    assert re.fullmatch(r"git [\w.\-]+|instill .+", version), version
    sweep = tiny(methods=["subtask_induction"])
    (spec,) = expand(sweep)
    assert spec.code_version == version
    row = run_trial(sweep, spec, ArtifactStore(tmp_path))
    assert row["code_version"] == version
    for kind in ("source", "mask"):
        assert [meta["code_version"] for _, meta, _ in ArtifactStore(tmp_path).entries(kind)] == [version]
    other = spec.model_copy(update={"code_version": "git 0123456789ab"})
    assert trial_hash(sweep, other) == trial_hash(sweep, spec) and "0123456789ab" not in json.dumps(
        identity(sweep, other)
    )
    assert TrialSpec(**json.loads(json.dumps(other.model_dump()))).code_version == "git 0123456789ab", "it travels"


def _set_version(out, sweep, spec, version: str) -> None:
    path = out / row_name(trial_hash(sweep, spec))
    row = json.loads(path.read_text())
    path.write_text(json.dumps({**row, "code_version": version}))


def test_rerun_stale_reruns_exactly_the_rows_of_other_code_versions(tiny, tmp_path):
    sweep = tiny(methods=["scratch"], seeds=[0, 1, 2])
    run_here(sweep, tmp_path)
    specs = expand(sweep)
    _set_version(tmp_path, sweep, specs[0], "git 0123456789ab")
    _set_version(tmp_path, sweep, specs[2], "git 0123456789ab-dirty")
    before = _finished(tmp_path, sweep)

    todo, stale = to_run(sweep, tmp_path, specs)
    assert todo == [] and stale == [specs[0], specs[2]], "counted, not rerun by default"
    assert run_here(sweep, tmp_path) == []
    assert run_here(sweep, tmp_path, rerun_stale=True) == [specs[0], specs[2]]
    for spec in specs:
        row = read_row(tmp_path, sweep, spec)
        assert row["code_version"] == code_version()
        assert (row["finished_at"] == before[spec.name]) == (spec is specs[1])
    assert to_run(sweep, tmp_path, specs, rerun_stale=True) == ([], [])


@pytest.mark.slow
def test_instill_run_counts_and_reruns_stale_rows(tmp_path, capsys):
    import ray

    from orchestrator import results
    from orchestrator.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(methods=["scratch"], seeds=[0, 1])))
    out = tmp_path / "out"
    argv = ["run", str(path), "--out", str(out), "--num-cpus", "2", "--no-report"]
    ray.shutdown()
    try:
        assert main(argv) == 0
        sweep = load_sweep(tiny_raw(methods=["scratch"], seeds=[0, 1]))
        _set_version(out, sweep, expand(sweep)[0], "git 0123456789ab")
        capsys.readouterr()
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert "0 trials run, 2 already done" in text
        assert "1 of 2 finished trial(s) came from other code versions" in text and "--rerun-stale" in text
        assert main([*argv, "--rerun-stale"]) == 0
        text = capsys.readouterr().out
        assert "1 trials run, 1 already done" in text and "1 finished trial(s) from other code versions" in text
    finally:
        ray.shutdown()
    table = results.read(out / "results.parquet")
    assert (table["code_version"] == code_version()).all()
