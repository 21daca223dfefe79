"""`instill status` of a sweep whose plug-in is gone: a warning naming it, and the trials of the
last results.parquet counted from their rows; exit 0, not 2."""

import json

import pandas as pd

from orchestrator.cli import main
from orchestrator.status import sweep_status


def test_status_counts_from_the_rows_when_a_plugin_is_gone(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "rows").mkdir(parents=True)
    config = {"name": "gone", "plugins": ["instill_gone_plugin"], "methods": ["gone_method"]}
    record = {"name": "gone", "config_hash": "0", "config": config, "overrides": ["training.lr=0.004"],
              "plugin_paths": {"instill_gone_plugin": str(tmp_path / "lab")}}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(record))
    pd.DataFrame({"trial": ["a", "b", "c"], "trial_hash": ["ha", "hb", "hc"]}).to_parquet(out / "results.parquet")
    (out / "rows" / "ha.json").write_text(json.dumps({"status": "done", "total_s": 2.0}))
    (out / "rows" / "hb.json").write_text(json.dumps({"status": "failed", "error": "boom"}))

    text, failed = sweep_status(out)
    assert "warning: plugins: cannot import 'instill_gone_plugin'" in text and str(tmp_path / "lab") in text
    assert "1 done, 0 running, 1 pending, 1 failed" in text and "b: boom" in text and failed == 1
    assert "--set training.lr=0.004" in text
    assert main(["status", str(out)]) == 0
    assert "3 trials" in capsys.readouterr().out
