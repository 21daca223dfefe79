"""Reports: what a sweep says, as numbers with confidence intervals and as pictures.

`write_report([OUT, ...])` merges the results of one or more output directories and writes
`REPORT/` (default `OUT/report/`):

- `summary.parquet`: per series x budget, for every summarised column: seeds, mean, std and a 95%
  Student t confidence interval of the mean over seeds.
- `headline.parquet`: per series, the budget needed to reach a target accuracy (default 0.9,
  interpolated on the log-budget axis, with a 95% CI), the area under the data-efficiency curve, and
  the sample-efficiency ratio against the no-transfer reference series of the same task (a method
  registered with `reference=True`; of several, the one whose config differs from the series' in
  the fewest fields both have; named in `reference_label`).
- `summary.md`: the tables above in Markdown.
- `data_efficiency.png/.svg` (one panel per value of the axes artifact kinds declare, one line per
  series, CI bands), one `<column>.png/.svg` per column an analysis declares with `plot=True`.
- what the registered report extras return (`methods.reports`, declared by artifact kinds and
  analyses): tables as `<name>.parquet` and sections, figures as `<name>.png/.svg`.
- `index.html`: all of the above on one page that reads offline.

Modules, upstream first: `series` (which rows form a series, its label, which series to compare
with), `statistics` (intervals, thresholds, paired differences), `tables` and `figures` (what
people read), `render` (the files, and the extras).
"""

from orchestrator.report.render import artifact_roots, write_report
from orchestrator.report.series import differing_fields
from orchestrator.report.statistics import (
    budget_interval,
    budget_to_reach,
    curve_area,
    first_crossing,
    headline,
    mean_over,
    mean_over_differences,
    paired_differences,
    summarise,
    t_interval,
)

__all__ = ["artifact_roots", "budget_interval", "budget_to_reach", "curve_area", "differing_fields", "first_crossing",
           "headline", "mean_over", "mean_over_differences", "paired_differences",
           "summarise", "t_interval", "write_report"]  # fmt: skip
