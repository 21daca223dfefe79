"""Framework-wide pieces every layer may import: frozen configs, stable hashes, registries, seeding."""

from common.config import Frozen, stable_hash
from common.registry import Registry
from common.seeding import numpy_generator, seeded_init, stage_seed, torch_generator

__all__ = ["Frozen", "Registry", "numpy_generator", "seeded_init", "stable_hash", "stage_seed", "torch_generator"]
