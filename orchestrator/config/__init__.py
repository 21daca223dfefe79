"""The sweep file: the grid (methods x data fractions x seeds x any `axes:` path) and one block per
stage, plus the blocks plug-ins declare (`<method>: {<field>: ...}`, an artifact kind's own block).
Modules: `schema` (`SweepConfig` and its blocks), `paths` (config paths, the overlay), `loading`."""

from orchestrator.config.loading import import_plugins, load_sweep, load_sweep_file, plugin_paths
from orchestrator.config.paths import resolve_path
from orchestrator.config.schema import VARIANT, ConfigError, SweepConfig, needed_kinds, shared_blocks

__all__ = ["VARIANT", "ConfigError", "SweepConfig", "import_plugins", "load_sweep", "load_sweep_file", "needed_kinds",
           "plugin_paths", "resolve_path", "shared_blocks"]  # fmt: skip
