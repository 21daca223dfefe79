import json

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_sweep
from orchestrator.trial import TrialSpec, artifact_key, identity, upstream_keys
from orchestrator.tuning import apply_tuned, method_space
from tests.conftest import tiny_raw


def test_overrides_apply_per_method_and_controls_inherit_discovery(tiny):
    sweep = tiny(
        methods=["subtask_induction", "sampled_subnetwork", "scratch"],
        method_overrides={
            "subtask_induction": {"training.lr": 0.003, "discovery.l0_lambda": 1e-6},
            "sampled_subnetwork": {"training.epochs": 7},
            "scratch": {"training.lr": 0.01},
        },
    )
    si, sampled, scratch = (sweep.effective(m) for m in ("subtask_induction", "sampled_subnetwork", "scratch"))
    assert si.training.lr == 0.003 and si.block("discovery").l0_lambda == 1e-6
    assert sampled.training.epochs == 7 and sampled.training.lr == sweep.training.lr
    assert sampled.block("discovery").l0_lambda == 1e-6, "controls use subtask_induction's mask settings"
    assert scratch.training.lr == 0.01
    assert "discovery" not in identity(sweep, TrialSpec(method="scratch", data_fraction=0.5, seed=0))
    # the controls' mask is the very mask subtask_induction uses
    spec = TrialSpec(method="subtask_induction", axes={"mask.sparsity": 0.5}, data_fraction=0.5, seed=0)
    a = upstream_keys(sweep, spec)
    b = upstream_keys(sweep, spec.model_copy(update={"method": "sampled_subnetwork"}))
    assert a == b
    plain = sweep.model_copy(update={"method_overrides": {}})
    assert artifact_key(sweep, spec, "mask") != artifact_key(plain, spec, "mask"), "tuned discovery changes the mask"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"magic": {"training.lr": 0.1}}, "not in methods"),
        ({"scratch": {"model.d_model": 4}}, "cannot set"),
        (
            {"subtask_induction": {"discovery.l0_lambda": 1e-6}, "sampled_subnetwork": {"discovery.l0_lambda": 1e-3}},
            "shared artifact setting",
        ),
    ],
)
def test_bad_overrides_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_sweep(tiny_raw(methods=["subtask_induction", "sampled_subnetwork", "scratch"], method_overrides=overrides))


def test_bad_tuning_space_is_refused():
    with pytest.raises(ConfigError, match="cannot tune 'model.d_model'"):
        load_sweep(tiny_raw(tuning={"space": {"model.d_model": [8, 64]}}))
    with pytest.raises(ConfigError, match="0 < low < high"):
        load_sweep(tiny_raw(tuning={"space": {"training.lr": [0.1, 0.01]}}))


def test_method_space_tunes_discovery_for_subtask_induction_only(tiny):
    sweep = tiny()
    assert "discovery.l0_lambda" in method_space(sweep, "subtask_induction")
    assert "discovery.l0_lambda" not in method_space(sweep, "scratch")


@pytest.mark.slow  # Ray, a minute or more on two cores
def test_tune_then_run_with_tuned_values(tmp_path, capsys):
    import ray

    raw = tiny_raw(
        methods=["subtask_induction", "scratch"],
        tuning={
            "budget": 3,
            "data_fractions": [0.5],
            "seeds": [0],
            "space": {"training.lr": [1e-4, 1e-2], "training.epochs": [1, 3], "discovery.l0_lambda": [1e-8, 1e-5]},
        },
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["tune", str(path), "--out", str(tmp_path / "tuning"), "--num-cpus", "2"]) == 0
    tuned = yaml.safe_load((tmp_path / "tuning" / "tuned.yaml").read_text())
    assert tuned["budget_per_method"] == 3
    assert set(tuned["method_overrides"]) == {"subtask_induction", "scratch"}
    si = tuned["method_overrides"]["subtask_induction"]
    assert 1e-4 <= si["training.lr"] <= 1e-2 and 1 <= si["training.epochs"] <= 3 and "discovery.l0_lambda" in si
    assert "discovery.l0_lambda" not in tuned["method_overrides"]["scratch"]
    n_trials = {p.name: len([t for t in p.iterdir() if t.is_dir()]) for p in (tmp_path / "tuning" / "tune").iterdir()}
    assert n_trials == {"tune-subtask_induction": 3, "tune-scratch": 3}, "the same effort for every method"

    sweep = apply_tuned(load_sweep(raw), tmp_path / "tuning" / "tuned.yaml")
    assert sweep.effective("scratch").training.lr == tuned["method_overrides"]["scratch"]["training.lr"]
    out = tmp_path / "run"
    assert (
        main(["run", str(path), "--out", str(out), "--tuned", str(tmp_path / "tuning" / "tuned.yaml"), "--no-report"])
        == 0
    )
    ray.shutdown()


def test_missing_tuned_file(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw()))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--tuned", str(tmp_path / "nope.yaml")]) == 2
    assert "no such tuned-values file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- tuned values end to end, and tuning never reads test data ---------------------------

MASK_METHODS = ("subtask_induction", "sampled_subnetwork")


@pytest.fixture
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
def test_tuned_values_reach_every_trial_of_the_run(tmp_path, ray_shutdown):
    from orchestrator.sweep import run_sweep
    from orchestrator.trial import expand
    from orchestrator.tuning import tune_methods

    raw = tiny_raw(
        methods=["subtask_induction", "sampled_subnetwork", "scratch"],
        tuning={
            "budget": 2,
            "data_fractions": [0.5],
            "seeds": [0],
            "space": {"training.lr": [1e-4, 1e-2], "discovery.l0_lambda": [1e-8, 1e-5]},
        },
    )
    sweep = load_sweep(raw)
    path = tune_methods(sweep, tmp_path / "tuning", num_cpus=2)
    tuned = yaml.safe_load(path.read_text())["method_overrides"]
    assert set(tuned) == set(sweep.methods)
    assert "discovery.l0_lambda" in tuned["subtask_induction"]
    assert all("discovery.l0_lambda" not in tuned[m] for m in ("sampled_subnetwork", "scratch"))
    lrs = {m: tuned[m]["training.lr"] for m in sweep.methods}
    assert len(set(lrs.values())) == 3 and sweep.training.lr not in lrs.values(), "otherwise the check below is void"
    l0 = tuned["subtask_induction"]["discovery.l0_lambda"]
    assert l0 != sweep.block("discovery").l0_lambda

    run = apply_tuned(sweep, path)
    outcome = run_sweep(run, tmp_path / "run", num_cpus=2)
    table = outcome.table
    assert len(table) == len(expand(run)) and (table["status"] == "done").all()
    for _, row in table.iterrows():
        config = json.loads(row["config_json"])
        assert config["training"]["lr"] == lrs[row["method"]], row["trial"]
        if row["method"] in MASK_METHODS:
            # the control's mask is subtask_induction's: it runs with the discovery values tuned for it
            assert config["discovery"]["l0_lambda"] == l0, row["trial"]
    masks = {m: table.loc[table["method"] == m, ["mask_density", "subtask_acc"]].values.tolist() for m in MASK_METHODS}
    assert masks["subtask_induction"] == masks["sampled_subnetwork"]


def _no_test_raw(**overrides):
    raw = tiny_raw(plugins=["tests.plugins.no_test_data"], **overrides)
    raw["task"] = {**raw["task"], "name": "arithmetic_no_test"}
    return raw


def test_the_guarded_task_refuses_test_reads(tmp_path):
    """The guard of the tests below works: an ordinary trial, which evaluates on test, trips it."""
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import run_trial
    from tests.plugins.no_test_data import TestDataRead

    sweep = load_sweep(_no_test_raw(methods=["scratch"]))
    spec = TrialSpec(method="scratch", data_fraction=0.5, seed=0)
    with pytest.raises(TestDataRead):
        run_trial(sweep, spec, ArtifactStore(tmp_path))


@pytest.mark.parametrize("method", ["subtask_induction", "sampled_subnetwork", "scratch"])
def test_a_tuning_trial_reads_no_test_data(tmp_path, method):
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.trial import expand, run_trial

    sweep = load_sweep(_no_test_raw(methods=[method]))
    spec = expand(sweep)[0]
    row = run_trial(sweep, spec, ArtifactStore(tmp_path), tuning=True)
    assert row["status"] == "done" and 0.0 <= row["val_acc"] <= 1.0
    assert not [k for k in row if k.startswith("test") or "_test_" in k], "no test metric in a tuning row"


@pytest.mark.slow
def test_tuning_never_reads_test_data(tmp_path, ray_shutdown):
    from orchestrator.tuning import tune_methods

    raw = _no_test_raw(
        methods=["subtask_induction", "sampled_subnetwork", "scratch"],
        tuning={"budget": 1, "data_fractions": [0.5], "seeds": [0], "space": {"training.lr": [1e-4, 1e-2]}},
    )
    path = tune_methods(load_sweep(raw), tmp_path / "tuning", num_cpus=2)
    tuned = yaml.safe_load(path.read_text())
    assert set(tuned["method_overrides"]) == set(raw["methods"])
    assert all(0.0 <= v <= 1.0 for v in tuned["best_val_acc"].values())


def test_tuning_in_run_needs_a_local_out(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tuning={"in_run": True})))
    assert main(["run", str(path), "--out", "s3://bucket/run"]) == 2
    assert "tuning.in_run tunes into OUT/tuning/, which needs a local --out" in capsys.readouterr().err


@pytest.mark.slow  # Ray twice (the tuning stage, then the run), a minute or more on two cores
def test_tuning_in_run_tunes_every_method_first_and_reuses_it(tmp_path, capsys, ray_shutdown):
    import json

    import pandas as pd

    space = {"training.lr": [1e-4, 1e-2]}
    raw = tiny_raw(methods=["subtask_induction", "scratch"],
                   tuning={"in_run": True, "budget": 2, "data_fractions": [0.5], "space": space})  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-report", "--num-cpus", "2"]) == 0
    (tuned_file,) = (out / "tuning").glob("*/tuned.yaml")
    tuned = yaml.safe_load(tuned_file.read_text())["method_overrides"]
    rows = pd.read_parquet(out / "results.parquet")
    for method, config in zip(rows["method"], rows["config_json"], strict=True):
        assert json.loads(config)["training"]["lr"] == tuned[method]["training.lr"], "rows record the tuned values"
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(out), "--no-report", "--num-cpus", "2"]) == 0
    text = capsys.readouterr().out
    assert "tuned before, for this config" in text and "0 trials run" in text


def test_methods_tuned_apart_still_pair_by_every_other_setting(tiny):
    # Each method at its own tuned learning rate: the report pairs it with the other method's series
    # of the same settings (the axis value here), counting the tuned value as part of the method.
    from orchestrator.report import paired_differences
    from orchestrator.results import frame
    from orchestrator.trial import base_row, expand

    sweep = tiny(
        methods=["full_transfer", "scratch"],
        axes={"training.epochs": [2, 3]},
        seeds=[0, 1, 2],
        method_overrides={"full_transfer": {"training.lr": 0.003}, "scratch": {"training.lr": 0.01}},
    )
    assert sweep.own_settings("scratch") == ("training.lr",)
    rows = []
    for spec in expand(sweep):
        row = base_row(sweep, spec)
        assert row["own_settings"] == "training.lr"
        epochs = spec.axes["training.epochs"]
        acc = 0.5 + 0.1 * (epochs - 2) + 0.01 * spec.seed + (0.2 if spec.method == "full_transfer" else 0.0)
        rows.append({**row, "status": "done", "test_acc": acc, "val_acc": acc})
    diffs = paired_differences(frame(rows, axes=list(sweep.grid)), "scratch")
    assert len(diffs) == 2  # one pair per axis value, never across them
    assert diffs["diff_mean"].tolist() == pytest.approx([0.2, 0.2])
    assert (diffs["pairs"] == 3).all() and "own" not in diffs
    # Without the column (rows from before it), a differing learning rate is a differing setting: no pair.
    old = [{k: v for k, v in r.items() if k != "own_settings"} for r in rows]
    assert paired_differences(frame(old, axes=list(sweep.grid)), "scratch").empty


def test_a_tuned_series_pairs_with_the_tuned_partner_of_a_merged_untuned_run(tiny):
    # A tuned run and an untuned run of one sweep, reported together: each method's series has two
    # partners of `versus` at distance 0 (the tuned rate is part of the method). The tuned series pairs
    # with the tuned partner, the untuned with the untuned, never across (whichever label sorts first).
    from orchestrator.report import paired_differences
    from orchestrator.report.series import partner, prepare
    from orchestrator.results import frame
    from orchestrator.trial import base_row, expand

    def rows_of(sweep, gain):
        for spec in expand(sweep):
            acc = 0.5 + 0.01 * spec.seed + gain[spec.method]
            yield {**base_row(sweep, spec), "status": "done", "test_acc": acc, "val_acc": acc}

    methods, seeds = ["full_transfer", "scratch"], [0, 1, 2]
    untuned = tiny(methods=methods, seeds=seeds, axes={"training.epochs": [2, 3]})
    lrs = {"full_transfer": {"training.lr": 0.003}, "scratch": {"training.lr": 0.01}}
    tuned = tiny(methods=methods, seeds=seeds, axes={"training.epochs": [2, 3]}, method_overrides=lrs)
    untuned_rows = rows_of(untuned, {"full_transfer": 0.1, "scratch": 0.0})
    rows = [*untuned_rows, *rows_of(tuned, {"full_transfer": 0.2, "scratch": 0.15})]
    table = frame(rows)
    diffs = paired_differences(table, "scratch")
    assert len(diffs) == 4 and sorted(diffs["diff_mean"]) == pytest.approx([0.05, 0.05, 0.1, 0.1])
    # The same for a partner of another value at a path: a tuned series pairs with the tuned one there.
    _, info = prepare(table)
    for series in info.index:
        ref = partner(series, info, "training.epochs=3")
        if ref is not None:
            assert info.loc[ref, "own"] == info.loc[series, "own"]


def test_a_report_fills_own_settings_of_rows_written_before_the_column(tiny, tmp_path):
    # A run whose results.parquet predates `own_settings`: the report recomputes the column from the
    # run's sweep.json, so a method with its own learning rate pairs as a run collected today would.
    from orchestrator.outdir import prepare_out_dir
    from orchestrator.report import paired_differences
    from orchestrator.report.render import load_tables
    from orchestrator.results import frame, write
    from orchestrator.trial import base_row, expand

    sweep = tiny(methods=["full_transfer", "scratch"], seeds=[0, 1, 2],
                 method_overrides={"full_transfer": {"training.lr": 0.003}})  # fmt: skip
    rows = []
    for spec in expand(sweep):
        acc = 0.5 + 0.01 * spec.seed + (0.2 if spec.method == "full_transfer" else 0.0)
        row = {k: v for k, v in base_row(sweep, spec).items() if k != "own_settings"}
        rows.append({**row, "status": "done", "test_acc": acc, "val_acc": acc})
    out = tmp_path / "run"
    prepare_out_dir(sweep, out)
    write(frame(rows, axes=list(sweep.grid)).drop(columns="own_settings"), out / "results.parquet")
    table = load_tables([out])
    assert table.groupby("method")["own_settings"].unique().map(list).to_dict() == {
        "full_transfer": ["training.lr"], "scratch": [""]}  # fmt: skip
    diffs = paired_differences(table, "scratch")
    assert len(diffs) == 1 and diffs["diff_mean"].tolist() == pytest.approx([0.2])
    # Rows that have the column keep their value; only the missing ones are filled.
    partial = frame(rows, axes=list(sweep.grid)).assign(own_settings=None)
    partial.loc[0, "own_settings"] = "kept"
    write(partial, out / "results.parquet")
    filled = load_tables([out])["own_settings"]
    assert filled[0] == "kept" and filled[1:].notna().all()
    # A sweep.json that does not load here leaves the rows as they are (and says so), never fails.
    write(frame(rows, axes=list(sweep.grid)).drop(columns="own_settings"), out / "results.parquet")
    (out / "sweep.json").write_text(json.dumps({"name": sweep.name}))
    assert "own_settings" not in load_tables([out])
    (out / "sweep.json").write_text(json.dumps({"name": sweep.name, "config": {"name": sweep.name, "task": 3}}))
    assert "own_settings" not in load_tables([out])
    # Without a sweep.json to read it from, the rows stay as they are and do not pair.
    (out / "sweep.json").unlink()
    assert "own_settings" not in load_tables([out])
    assert paired_differences(load_tables([out]), "scratch").empty
