"""Overlap of the discovered masks: do seeds, or sparsities, find the same weights?

Masks are read from the sweeps' artifact stores (the kinds registered with `is_mask`) and paired
when they differ only in their seed (same sparsity) or only in their sparsity (same seed), beside
the overlap two independent random masks of the same densities would have.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import stable_hash
from methods import ARTIFACTS
from orchestrator.artifacts import ArtifactStore, CorruptArtifact
from orchestrator.report.series import differing_fields, flatten

log = logging.getLogger(__name__)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks; NaN when both are empty."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else float("nan")


def random_jaccard(d1, d2):
    """Expected Jaccard overlap of two independent uniformly random masks of densities d1, d2."""
    d1, d2 = np.asarray(d1, dtype=float), np.asarray(d2, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return d1 * d2 / (d1 + d2 - d1 * d2)


def artifact_roots(out_dirs: list) -> list[str]:
    """Each output directory's artifact store: sweep.json's storage.artifacts, else OUT/artifacts."""
    from orchestrator.outdir import as_outdir

    roots = []
    for location in out_dirs:
        out = as_outdir(location)
        text = out.read_text("sweep.json")
        config = (json.loads(text).get("config") or {}) if text else {}
        root = str((config.get("storage") or {}).get("artifacts") or out.join("artifacts"))
        if root not in roots:
            roots.append(root)
    return roots


def load_masks(roots: list[str]) -> list[dict[str, Any]]:
    """Every readable mask in the stores at `roots`: {family, seed, sparsity, bits (flat bool), density}.

    A store that does not exist or cannot be reached contributes nothing (the figure is optional).
    """
    kinds = [kind for _, kind in ARTIFACTS.items() if kind.is_mask]
    masks, seen = [], set()
    for root in roots:
        if "://" not in root and not Path(root.removeprefix("file://")).is_dir():
            continue
        try:
            store = ArtifactStore(root)
            entries = [(kind, e) for kind in kinds for e in store.entries(kind.name)]
        except (OSError, ValueError) as err:  # unreachable or unauthorised remote store
            log.info("mask overlap: skipping artifact store %s (%s)", root, err)
            continue
        for kind, (key, _meta, path) in entries:
            if path in seen:
                continue
            seen.add(path)
            try:
                tensors, _ = store.load(kind.name, key)
                where = kind.describe(key)
                seed, sparsity, family = where["seed"], float(where["sparsity"]), where["family"]
            except (OSError, CorruptArtifact, KeyError, TypeError) as err:
                log.warning("mask overlap: skipping %s (%s)", path, err)
                continue
            flat = np.concatenate([tensors[name].reshape(-1).numpy() != 0 for name in sorted(tensors)])
            masks.append({"family": {"kind": kind.name, **family}, "seed": seed, "sparsity": sparsity,
                          "bits": flat, "density": float(flat.mean())})  # fmt: skip
    return masks


def mask_overlap(masks: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per pair of masks that differ only in their seed, or only in their sparsity."""
    families = {stable_hash(m["family"]): m["family"] for m in masks}
    family_flats = {f: flatten(k) for f, k in families.items()}
    names = dict(zip(family_flats, differing_fields(list(family_flats.values())), strict=True))
    rows = []
    for pair, same in (("across seeds", "sparsity"), ("across sparsities", "seed")):
        groups: dict[str, list[dict]] = {}
        for m in masks:
            groups.setdefault(stable_hash([m["family"], m[same]]), []).append(m)
        for group in groups.values():
            for a, b in itertools.combinations(sorted(group, key=lambda m: (m["sparsity"], m["seed"])), 2):
                if a["bits"].shape != b["bits"].shape:
                    continue
                family = stable_hash(a["family"])
                rows.append(
                    {
                        "pair": pair,
                        "masks": ", ".join(names[family]) or "all",
                        "family": family,
                        "sparsity_a": a["sparsity"],
                        "sparsity_b": b["sparsity"],
                        "seed_a": a["seed"],
                        "seed_b": b["seed"],
                        "density_a": a["density"],
                        "density_b": b["density"],
                        "jaccard": jaccard(a["bits"], b["bits"]),
                        "jaccard_random": float(random_jaccard(a["density"], b["density"])),
                    }
                )
    return pd.DataFrame(rows)
