"""`instill analyse`: analyses added to finished trials from the models they kept (`keep: {models:
true}`) give the columns a sweep that ran them from the start gives; the rows stay valid for
`instill report` and are not rerun by `instill run`. Analysis errors reach status and the report."""

import json

import pytest
import yaml

from orchestrator import results
from orchestrator.cli import main
from orchestrator.config import load_sweep
from orchestrator.outdir import OutDir, prepare_out_dir, store_for, write_row
from orchestrator.sweep import write_results
from orchestrator.trial import expand, run_trial
from tests.conftest import tiny_raw

PLUGINS = ["tests.plugins.probe_analysis", "tests.plugins.brittle_analysis"]
ADDED = ["probe", "lmc_barrier"]
COLUMNS = ["probe_norm", "lmc_barrier", "lmc_barrier_loss_mid", "lmc_barrier_acc_mid"]


def _ran_here(raw: dict, out) -> None:
    """OUT as `instill run` leaves it, its trials run here one by one (no Ray)."""
    sweep = load_sweep(raw)
    prepare_out_dir(sweep, out)
    store, specs = store_for(sweep, out), expand(sweep)
    for spec in specs:
        write_row(out, run_trial(sweep, spec, store))
    write_results(OutDir(out), results.collect(out, sweep, specs))


@pytest.mark.slow
def test_analyse_adds_the_columns_the_analyses_give_inside_the_trial(tmp_path, capsys):
    kept, ahead = tmp_path / "kept", tmp_path / "ahead"
    raws = {
        kept: tiny_raw(plugins=PLUGINS, keep={"models": True}, seeds=[0, 1]),
        # the same trials with the analyses from the start (the same upstream artifacts: storage is no setting)
        ahead: tiny_raw(plugins=PLUGINS, analyses=ADDED, seeds=[0, 1], storage={"artifacts": str(kept / "artifacts")}),
    }
    argv = {}
    for out, raw in raws.items():
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        argv[out] = ["run", str(path), "--out", str(out), "--num-cpus", "2", "--no-report"]
        assert main(argv[out]) == 0
    assert main(["analyse", str(kept), "--analyses", *ADDED]) == 0
    got = results.read(kept / "results.parquet").set_index("trial").sort_index()
    want = results.read(ahead / "results.parquet").set_index("trial").sort_index()
    assert len(got) == 4 and list(got.index) == list(want.index)
    for column in COLUMNS + ["test_acc", "splits_test_acc"]:
        assert got[column].tolist() == want[column].tolist(), column

    capsys.readouterr()
    assert main(argv[kept]) == 0  # the analysed rows are neither rerun nor stale
    assert "0 trials run, 4 already done, 0 failed" in capsys.readouterr().out
    again = results.read(kept / "results.parquet").set_index("trial").sort_index()
    assert again[COLUMNS].equals(got[COLUMNS]) and again["finished_at"].equals(got["finished_at"])

    assert main(["report", str(kept)]) == 0
    assert "lmc_barrier (mean [95% CI] over seeds)" in (kept / "report" / "summary.md").read_text()
    summary = results.read(kept / "report" / "summary.parquet")
    assert summary["probe_norm_mean"].notna().all() and summary["lmc_barrier_mean"].notna().all()


def test_analyse_needs_kept_models_and_registered_analyses(tmp_path, capsys):
    out = tmp_path / "out"
    _ran_here(tiny_raw(plugins=PLUGINS, methods=["scratch"]), out)
    before = (out / "results.parquet").read_bytes()
    assert main(["analyse", str(out), "--analyses", "probe"]) == 2
    err = capsys.readouterr().err
    assert "1 of 1 finished trials kept no trained model" in err and "keep: {models: true}" in err
    assert main(["analyse", str(out), "--analyses", "nonesuch"]) == 2
    assert "--analyses: unknown analysis 'nonesuch'; valid names:" in capsys.readouterr().err
    assert (out / "results.parquet").read_bytes() == before, "a refused analyse changes nothing"


def test_analysis_errors_are_recorded_and_reported(tmp_path, capsys):
    out = tmp_path / "out"
    _ran_here(tiny_raw(plugins=PLUGINS, methods=["scratch"], keep={"models": True}), out)
    assert main(["analyse", str(out), "--analyses", "brittle", "probe"]) == 1
    assert "1 finished row(s) have analysis errors" in capsys.readouterr().err
    row = results.read(out / "results.parquet").iloc[0]
    assert json.loads(row["analysis_errors"]) == {"brittle": "RuntimeError: deliberate analysis failure"}
    assert row["probe_norm"] > 0 and row["status"] == "done"
    assert main(["status", str(out)]) == 0
    assert "first: scratch-f0.5-seed0: brittle: RuntimeError: deliberate analysis failure" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "1 finished row(s) have analysis errors" in (out / "report" / "summary.md").read_text()
