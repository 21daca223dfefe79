"""`instill analyse OUT --analyses NAME...`: more analyses on a sweep's finished trials without
training them again. Each trial's model is rebuilt by its method from its upstream artifacts and
given the weights the trial kept (`keep: {models: true}`); the analyses run as inside the trial
(`Trial.analyse`), and its row gains their columns. The row keeps its name (its identity's hash),
series and code version, so `instill run` neither reruns it nor counts it stale."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from methods.analysis import parse_analysis
from orchestrator import results
from orchestrator.config import ConfigError, load_sweep
from orchestrator.outdir import OutDir, as_outdir, read_row, read_sweep, store_for, write_row
from orchestrator.sweep import write_results
from orchestrator.trial import KEPT_MODELS, analyse_trial, expand, kept_key


def analyse_sweep(out_dir: str | Path | OutDir, names: list[str]) -> pd.DataFrame:
    """Run the analyses `names` on every finished trial of OUT's sweep; rewrite their rows and
    OUT/results.parquet, and return the table. Raises ConfigError, before anything is changed, on
    an unknown analysis or a finished trial whose model was not kept."""
    out = as_outdir(out_dir)
    record, problems = read_sweep(out)  # its plug-ins imported from where the run found them
    if record is None:
        raise ConfigError(f"{out}: not a sweep output directory (no sweep.json); give the --out of `instill run`")
    if problems:
        raise ConfigError("\n".join(problems))
    sweep = load_sweep(record["config"], out.join("sweep.json"))
    try:
        analyses = [parse_analysis(name, "--analyses") for name in names]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    store, specs = store_for(sweep, out), expand(sweep)
    with out.lease():
        finished = [(spec, row) for spec in specs if (row := read_row(out, sweep, spec)) and row["status"] == "done"]
        if not finished:
            raise ConfigError(f"{out}: no finished trial to analyse; first run: instill run SWEEP --out {out}")
        missing = [spec.name for spec, row in finished if not store.exists(KEPT_MODELS, kept_key(row["trial_hash"]))]
        if missing:
            raise ConfigError(
                f"{out}: {len(missing)} of {len(finished)} finished trials kept no trained model (e.g. {missing[0]}); "
                "`instill analyse` needs `keep: {models: true}` in the sweep file when the trials run: add it and "
                "run the sweep into a new --out (finished trials are not trained again, so their models are lost)"
            )
        for spec, row in finished:
            write_row(out, analyse_trial(sweep, spec, store, row, analyses))
        table = results.collect(out, sweep, specs)
        write_results(out, table)
    return table
