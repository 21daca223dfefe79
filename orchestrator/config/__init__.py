"""The sweep file: the grid (methods x data fractions x seeds x any `axes:` path) and one block per
stage, plus the blocks plug-ins declare (`<method>: {<field>: ...}`, an artifact kind's own block).
Modules: `schema` (`SweepConfig` and its blocks), `paths` (config paths, the overlay), `loading`."""

from orchestrator.config.loading import load_sweep, load_sweep_file
from orchestrator.config.paths import resolve_path
from orchestrator.config.schema import VARIANT, ConfigError, SweepConfig, needed_kinds, shared_blocks

__all__ = ["VARIANT", "ConfigError", "SweepConfig", "load_sweep", "load_sweep_file", "needed_kinds", "resolve_path",
           "shared_blocks"]  # fmt: skip
