"""Trials: the grid and each trial's identity (`grid`), its upstream artifacts and supervision
(`upstream`), one trial in its stages (`run`), and trials that train as one pack (`packs`).

Upstream work comes from the artifact store, keyed by exactly the config fields that determine it,
so it is computed once per key whatever the number of trials that need it. Nothing here knows a
method, artifact kind or analysis by name: it follows what their registrations declare.
"""

from orchestrator.trial.grid import TrialSpec, expand, identity, identity_blocks, kind_uses, trial_hash, trial_needs
from orchestrator.trial.packs import near_equal, pack_keys, run_pack
from orchestrator.trial.run import KEPT_MODELS, analyse_trial, base_row, failed_row, kept_key, own_settings, run_trial
from orchestrator.trial.upstream import TrialSupervisor, Upstream, artifact_key, fresh_model, pick_device, upstream_keys

__all__ = ["KEPT_MODELS", "TrialSpec", "TrialSupervisor", "Upstream", "analyse_trial", "artifact_key", "base_row",
           "expand", "failed_row", "fresh_model", "identity", "identity_blocks", "kept_key", "kind_uses", "near_equal",
           "own_settings", "pack_keys", "pick_device", "run_pack", "run_trial", "trial_hash", "trial_needs",
           "upstream_keys"]  # fmt: skip
