"""Reports: what a sweep says, as numbers with confidence intervals and as pictures.

`write_report([OUT, ...])` merges the results of output directories into `REPORT/` (default
`OUT/report/`): `summary.parquet` (per series x budget and summarised column: seeds, mean, std, 95%
CI over seeds, `statistics.interval`), `headline.parquet` (per series: budget to reach a target accuracy with a
95% CI, curve area, data saved against its no-transfer reference), both in `summary.md`; figures
(`data_efficiency.png/.svg`, one per column an analysis plots); what the report extras
(`methods.reports`) return; and `index.html`, all of it on one page that reads offline.

Modules, upstream first: `series`, `statistics`, `tables` and `figures`, `render`."""

from orchestrator.report.render import artifact_roots, write_report
from orchestrator.report.series import differing_fields
from orchestrator.report.statistics import (
    budget_interval,
    budget_to_reach,
    curve_area,
    findings,
    first_crossing,
    headline,
    headline_differences,
    headline_metric,
    mean_over,
    mean_over_differences,
    paired_differences,
    summarise,
    t_interval,
    verdict,
)

__all__ = ["artifact_roots", "budget_interval", "budget_to_reach", "curve_area", "differing_fields", "findings",
           "first_crossing", "headline", "headline_differences", "headline_metric", "mean_over",
           "mean_over_differences", "paired_differences", "summarise", "t_interval", "verdict",
           "write_report"]  # fmt: skip
