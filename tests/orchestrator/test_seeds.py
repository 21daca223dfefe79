"""Seeds as a precision target: the rounds follow from the rows (a narrow cell stops at `min`, a noisy
one goes on to `max`), a list of seeds plans what it always did, and `instill run` runs the rounds."""

import json

import pytest
import yaml

from orchestrator import results
from orchestrator.cli import main
from orchestrator.config import load_sweep
from orchestrator.outdir import OutDir, prepare_out_dir, write_row
from orchestrator.report.statistics import summarise
from orchestrator.seeds import plan
from orchestrator.trial import base_row, expand, trial_hash
from tests.conftest import tiny_raw

RULE = {"min": 2, "max": 6, "step": 2, "until": {"half_width": 0.02, "metric": "test_acc"}}
# seed_noise's accuracy by seed: wide at every seed count up to 6.
NOISE = [0.3, 0.7, 0.4, 0.6, 0.5, 0.8, 0.2, 0.9]


def _raw(**overrides):
    settings = dict(plugins=["tests.plugins.fixed_accuracy"], methods=["always_right", "seed_noise"],
                    data_fractions=[0.5, 1.0], seeds=RULE, training={"epochs": 1}, resources={"pack": 1})  # fmt: skip
    raw = tiny_raw(**{**settings, **overrides})
    for key in ("source", "discovery", "sparsities"):
        raw.pop(key)
    return raw


def _accuracy(spec) -> float:
    return 1.0 if spec.method == "always_right" else NOISE[spec.seed]


def _finish(sweep, out, specs, status="done"):
    """Rows for `specs` as a run would write them, with `_accuracy` as test accuracy."""
    for spec in specs:
        write_row(out, {**base_row(sweep, spec), "status": status, "test_acc": _accuracy(spec)})


def _run_rounds(sweep, out):
    """Plan and finish rounds until every cell has stopped; the last plan."""
    prepare_out_dir(sweep, out)
    while (current := plan(sweep, out)).cells is None:
        _finish(sweep, out, current.specs)
    return current


def _seeds(current):
    return {(c["label"], c["n_train"]): (c["seeds"], c["stopped"]) for c in current.cells}


def test_a_constant_cell_stops_at_min_and_a_noisy_one_goes_to_max(tmp_path):
    sweep = load_sweep(_raw())
    done = _run_rounds(sweep, OutDir(tmp_path))
    assert _seeds(done) == {("always_right", 50): (2, "narrow"), ("always_right", 100): (2, "narrow"),
                            ("seed_noise", 50): (6, "max"), ("seed_noise", 100): (6, "max")}  # fmt: skip
    assert [(r["round"], [(c["label"], c["seeds"], c["next"]) for c in r["wider"]]) for r in done.rounds] == [
        (1, [("seed_noise", 2, 4)] * 2),
        (2, [("seed_noise", 4, 6)] * 2),
    ]
    assert len(done.specs) == 2 * 2 + 2 * 6
    # The width each round acted on is the report's own interval of those seeds.
    table = results.collect(OutDir(tmp_path), sweep, [s for s in done.specs if s.seed < 2])
    row = summarise(table).query("label == 'seed_noise'").iloc[0]
    assert done.rounds[0]["wider"][0]["half_width"] == pytest.approx((row.test_acc_ci_hi - row.test_acc_ci_lo) / 2)


def test_the_rounds_are_a_function_of_the_rows(tmp_path):
    sweep, out = load_sweep(_raw()), OutDir(tmp_path)
    done = _run_rounds(sweep, out)
    # An interrupted round: its missing rows are what a rerun runs, after the rounds before it.
    for spec in [s for s in done.specs if s.seed >= 4][:3]:
        (tmp_path / "rows" / f"{trial_hash(sweep, spec)}.json").unlink()
    resumed = plan(sweep, out)
    assert resumed.cells is None and len(resumed.rounds) == 2
    assert {trial_hash(sweep, s) for s in resumed.specs} == {trial_hash(sweep, s) for s in done.specs}
    # A trial that failed in this invocation is a missing seed, not a reason to wait.
    missing = [s for s in resumed.specs if not (tmp_path / "rows" / f"{trial_hash(sweep, s)}.json").exists()]
    _finish(sweep, out, missing, status="failed")
    assert plan(sweep, out).cells is None
    assert _seeds(plan(sweep, out, {trial_hash(sweep, s) for s in missing}))[("seed_noise", 50)][0] == 6


def test_with_versus_the_partner_gets_the_seeds_of_the_pairs(tmp_path):
    rule = {**RULE, "until": {**RULE["until"], "versus": "always_right"}}
    done = _run_rounds(load_sweep(_raw(seeds=rule)), OutDir(tmp_path))
    assert _seeds(done) == {("always_right", 50): (6, "partner"), ("always_right", 100): (6, "partner"),
                            ("seed_noise", 50): (6, "max"), ("seed_noise", 100): (6, "max")}  # fmt: skip


def test_a_list_of_seeds_plans_the_grid_as_before(tmp_path):
    listed = load_sweep(_raw(seeds=[0, 1]))
    assert plan(listed, OutDir(tmp_path)).specs == expand(listed) and listed.seeds == (0, 1)
    # A rule's first round is the same trials as the list of its seeds: their rows are shared.
    ruled = load_sweep(_raw())
    assert [trial_hash(ruled, s) for s in expand(ruled)] == [trial_hash(listed, s) for s in expand(listed)]


@pytest.mark.slow
def test_instill_run_takes_noisy_cells_to_max_and_reuses_every_trial(tmp_path, capsys):
    path, out = tmp_path / "sweep.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(_raw()))
    argv = ["run", str(path), "--out", str(out), "--num-cpus", "2", "--no-report"]
    assert main([*argv, "--set", "seeds.max=4"]) == 0
    first = capsys.readouterr().out
    assert "seeds round 1: 2 of 4 cells wider than +-0.02" in first and "12 trials run, 0 already done" in first
    # A higher max continues from the finished rows: only the new seeds run.
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "seeds round 2: 2 of 4 cells" in second and "4 trials run, 12 already done" in second
    table = results.read(out / "results.parquet")
    seeds = table.groupby(["method", "n_train"])["seed"].apply(sorted).to_dict()
    assert seeds == {("always_right", 50): [0, 1], ("always_right", 100): [0, 1],
                     ("seed_noise", 50): list(range(6)), ("seed_noise", 100): list(range(6))}  # fmt: skip
    assert (table.loc[table["method"] == "always_right", "test_acc"] == 1.0).all()
    record = json.loads((out / "seeds.json").read_text())
    assert [c["seeds"] for c in record["cells"]] == [2, 2, 6, 6] and len(record["rounds"]) == 2


def test_status_counts_the_trials_of_every_round_planned_so_far(tmp_path, capsys):
    sweep, out = load_sweep(_raw()), OutDir(tmp_path)
    prepare_out_dir(sweep, out)
    _finish(sweep, out, plan(sweep, out).specs)  # round 1 done: the noisy cells want 2 more seeds each
    assert main(["status", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "8 done" in text and "4 pending" in text, text


@pytest.mark.parametrize(("axis", "versus"), [
    ({"training.lr": [0.1, 0.2]}, "training.lr=0.1"),
    ({"training.epochs": [1, 2]}, "training.epochs=1.0"),  # a number pairs by value, whatever its type
])  # fmt: skip
def test_versus_an_axis_value_judges_each_series_on_its_difference_to_that_value(tmp_path, axis, versus):
    # seed_noise's accuracy depends on the seed only, so each series minus its twin at VALUE is 0 at
    # every seed: narrow at `min`, where each series alone is wide and goes to `max`.
    rule = {**RULE, "until": {**RULE["until"], "versus": versus}}
    raw = _raw(methods=["seed_noise"], seeds=rule, axes=axis)
    done = _run_rounds(load_sweep(raw), OutDir(tmp_path))
    assert sorted(set(_seeds(done).values())) == [(2, "narrow"), (2, "partner")]
    alone = _run_rounds(load_sweep({**raw, "seeds": RULE}), OutDir(tmp_path / "alone"))
    assert set(_seeds(alone).values()) == {(6, "max")}


@pytest.mark.parametrize(("versus", "message"), [
    ("training.lr=0.3", "0.3 is not a value of training.lr"),
    ("training.lr=1e-1", "'1e-1' is not a value of training.lr .* write VALUE as the axis lists it"),
    ("training.lr=true", "True is not a value of training.lr"),
    ("training.epochs=2", "'training.epochs' is not an axis of this sweep"),
    ("scratch", "'scratch' is not one of methods"),
])  # fmt: skip
def test_versus_names_a_method_or_a_value_of_an_axis(versus, message):
    rule = {**RULE, "until": {**RULE["until"], "versus": versus}}
    with pytest.raises(ValueError, match=message):
        load_sweep(_raw(methods=["seed_noise"], seeds=rule, axes={"training.lr": [0.1, 0.2]}))
