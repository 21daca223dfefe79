"""Seeds as a precision target (`seeds: {min, max, step, until}`): which seeds each cell (series x
budget) runs, recomputed from the rows in OUT, so a resumed run finds the rounds it had reached.

Round 1 runs seeds 0..min-1 in every cell. After a round whose trials have all finished, each cell
whose 95% interval is wider than `until.half_width` ((hi - lo) / 2) gets `step` more seeds, up to
`max`; the others stop. The interval is the report's own (`statistics.summarise` of the mean, or
with `until.versus` `statistics.paired_differences`), so the run and the report agree. With
`versus`, a series with a partner is judged on its difference, and the partner's cell at that
budget gets the seeds too, so the pairs exist; a cell with no interval (under two finished seeds)
counts as too wide. A seed's trial is the same trial in any round (its identity has no round), so
rows are reused. Stopping looks at the width only, never at the sign or significance (docs/CONFIG.md).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any

from orchestrator import results
from orchestrator.config.schema import SeedRule, SweepConfig
from orchestrator.outdir import OutDir
from orchestrator.trial import TrialSpec, expand


@dataclasses.dataclass
class Plan:
    specs: list[TrialSpec]  # the trials that should have rows now: every round so far
    rounds: list[dict[str, Any]]  # the rounds decided, each with its one-line summary (`line`)
    cells: list[dict[str, Any]] | None = None  # per cell, once no cell wants more seeds: seeds, width, why

    def record(self, sweep: SweepConfig) -> str:
        """OUT/seeds.json: the rule, the rounds and (when done) the final seeds of every cell."""
        rule = sweep.seeds.canonical() if isinstance(sweep.seeds, SeedRule) else None
        return json.dumps({"rule": rule, "rounds": self.rounds, "cells": self.cells}, indent=1)


def advance(sweep: SweepConfig, out: OutDir, ran: set[str] = frozenset(), shown: int = 0) -> Plan:
    """`plan`; with a seed rule, also print the rounds after the first `shown` (and the final seeds
    once every cell has stopped) and write OUT/seeds.json."""
    result = plan(sweep, out, ran)
    if isinstance(sweep.seeds, SeedRule):
        for round_ in result.rounds[shown:]:
            print(round_["line"], flush=True)
        if result.cells is not None:
            counts = collections.Counter((c["seeds"], c["stopped"]) for c in result.cells)
            print("[instill] seeds: every cell has stopped: " + ", ".join(
                f"{n} at {k} seeds ({why})" for (k, why), n in sorted(counts.items())), flush=True)  # fmt: skip
        out.write_text("seeds.json", result.record(sweep))
    return result


def plan(sweep: SweepConfig, out: OutDir, ran: set[str] = frozenset()) -> Plan:
    """The seeds each cell runs, from the rows in `out`: a trial counts as finished when its row is
    done, or when it ran in this invocation (`ran`: trial hashes; a failure there is a missing seed)."""
    specs = expand(sweep)
    rule = sweep.seeds
    if not isinstance(rule, SeedRule):
        return Plan(specs, [])
    cells = {_cell(s): s for s in specs}  # one template per cell: the spec of its first seed
    counts = dict.fromkeys(cells, rule.min)
    rounds: list[dict[str, Any]] = []
    while True:
        specs = [_with_seed(t, seed) for key, t in cells.items() for seed in range(counts[key])]
        table = results.collect(out, sweep, specs)
        if not (table["status"].eq("done") | table["trial_hash"].isin(ran)).all():
            return Plan(specs, rounds)
        where = {_cell(s): (row.series, row.n_train) for s, row in zip(specs, table.itertuples(), strict=True)}
        widths, partners, labels = _widths(table, rule)
        judged = {k: widths.get(c, math.nan) for k, c in where.items() if c not in partners.values()}
        # NaN (no interval yet) is not narrow enough.
        wide = [k for k, w in judged.items() if not w <= rule.until.half_width and counts[k] < rule.max]
        if not wide:
            final = [_final(rule, labels, where[k], counts[k], judged.get(k)) for k in cells]
            return Plan(specs, rounds, sorted(final, key=lambda c: (c["label"], c["n_train"])))
        rounds.append(_grow(rule, wide, counts, where, partners, judged, labels, len(rounds) + 1))


def _cell(spec: TrialSpec) -> str:
    return json.dumps([spec.method, spec.data_fraction, spec.axes], sort_keys=True, default=str)


def _with_seed(template: TrialSpec, seed: int) -> TrialSpec:
    # A fresh spec, never a copy: a copy would keep the template's planned identity (its seed).
    return TrialSpec(method=template.method, data_fraction=template.data_fraction, seed=seed, axes=template.axes,
                     code_version=template.code_version)  # fmt: skip


def _widths(table, rule: SeedRule) -> tuple[dict, dict, dict]:
    """({(series, n_train): half-width of the interval judged}, {judged cell: its partner's cell},
    {series: label}), from the report's statistics of the finished rows."""
    from orchestrator.report import statistics
    from orchestrator.report.series import has_versus, partner, prepare

    metric, versus = rule.until.metric, rule.until.versus
    summary = statistics.summarise(table, columns=[metric])  # only the judged metric: planning runs every round
    lo, hi = f"{metric}_ci_lo", f"{metric}_ci_hi"
    widths = {(r["series"], r["n_train"]): (r.get(hi, math.nan) - r.get(lo, math.nan)) / 2
              for r in summary.to_dict("records")}  # fmt: skip
    labels = dict(zip(summary.get("series", []), summary.get("label", []), strict=True))
    partners: dict = {}
    _, info = prepare(table)
    if versus is None or not has_versus(info, versus):
        return widths, partners, labels
    diffs = statistics.paired_differences(table, versus, metric)
    paired = {(r["series"], r["n_train"]): (r["diff_ci_hi"] - r["diff_ci_lo"]) / 2 for r in diffs.to_dict("records")}
    for series, n in list(widths):
        ref = partner(series, info, versus) if info.loc[series, "method"] != versus else None
        if ref is not None:
            widths[series, n], partners[series, n] = paired.get((series, n), math.nan), (ref, n)
    return widths, partners, labels


def _grow(rule: SeedRule, wide, counts, where, partners, judged, labels, number: int) -> dict[str, Any]:
    """Give each wide cell `step` more seeds (and its partner's cell as many); the round's record."""
    by_cell = {c: k for k, c in where.items()}
    grown = []
    for key in wide:
        seeds = min(counts[key] + rule.step, rule.max)
        grown.append({"label": labels.get(where[key][0], where[key][0]), "n_train": where[key][1],
                      "half_width": judged[key], "seeds": counts[key], "next": seeds})  # fmt: skip
        counts[key] = seeds
        if where[key] in partners:
            mate = by_cell[partners[where[key]]]
            counts[mate] = max(counts[mate], seeds)
    widest = max(grown, key=lambda c: math.inf if math.isnan(c["half_width"]) else c["half_width"])
    line = (f"[instill] seeds round {number}: {len(grown)} of {len(judged)} cells wider than "
            f"+-{rule.until.half_width:g} get up to {rule.step} more seed(s) (at most {rule.max}); the widest, "
            f"{widest['label']} at n = {widest['n_train']:g}: +-{widest['half_width']:.3g}")  # fmt: skip
    return {"round": number, "wider": grown, "line": line}


def _final(rule: SeedRule, labels, cell, seeds: int, width: float | None) -> dict[str, Any]:
    why = "partner" if width is None else "narrow" if width <= rule.until.half_width else "max"
    return {"label": labels.get(cell[0], cell[0]), "n_train": cell[1], "seeds": seeds, "half_width": width,
            "stopped": why}  # fmt: skip
