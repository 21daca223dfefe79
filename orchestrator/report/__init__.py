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
- `mask_overlap.parquet`: Jaccard overlap of the discovered masks across seeds and across
  sparsities, beside the overlap two independent random masks of the same densities would have
  (only when the sweep's artifact store holds at least two masks).
- `summary.md`: the tables above in Markdown.
- `data_efficiency.png/.svg` (one panel per sparsity, one line per series, CI bands),
  `sparsity_vs_subtask.png/.svg`, one `<column>.png/.svg` per column an analysis declares with
  `plot=True`, and `mask_overlap.png/.svg`.
- `index.html`: all of the above on one page that reads offline.

Modules, upstream first: `series` (which rows form a series, its label, which series to compare
with), `statistics` (intervals, thresholds, paired differences), `masks` (mask overlap), `tables`
and `figures` (what people read), `render` (the files).
"""

from orchestrator.report.masks import artifact_roots, load_masks, mask_overlap
from orchestrator.report.render import write_report
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
           "headline", "load_masks", "mask_overlap", "mean_over", "mean_over_differences", "paired_differences",
           "summarise", "t_interval", "write_report"]  # fmt: skip
