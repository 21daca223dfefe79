"""Methods: the training loop, mask discovery, transfer, and the registries of compared methods,
artifact kinds, analyses and report extras. Importing this package registers the built-in ones."""

from methods import analyses as _analyses  # noqa: F401  (registers the built-in analyses)
from methods import cbft as _cbft  # noqa: F401  (registers the cbft method)
from methods import finetune as _finetune  # noqa: F401  (naive_finetune, llrt, lpft: the CBFT baselines)
from methods import guidance as _guidance  # noqa: F401  (the guide artifact kind and the guidance method)
from methods import hard_concrete as _hard_concrete  # noqa: F401  (registers the hard_concrete discoverer)
from methods import l2sp as _l2sp  # noqa: F401  (registers the l2sp method)
from methods import linearized_gp as _linearized_gp  # noqa: F401  (registers the linearized_gp method)
from methods import mask_reports as _mask_reports  # noqa: F401  (the mask kind's report extras)
from methods import occam_reports as _occam_reports  # noqa: F401  (OccamNets: the occam_exits analysis and table)
from methods.analysis import ANALYSES, AnalysisContext, Column, Profile, register_analysis
from methods.artifacts import ARTIFACTS, ArtifactContext, ArtifactKind, register_artifact
from methods.discovery import DISCOVERERS, Discovery, DiscoveryConfig, discover
from methods.masking import Mask, MaskedModel, MaskSelection, effective_state_dict, maskable_names, topk_mask
from methods.packing import NotPackable, fit_packed, packable
from methods.registry import METHODS, Method, MethodContext, get_method, register_method
from methods.training import NonFiniteLoss, Objective, TrainConfig, cross_entropy, evaluate, fit, train
from methods.transfer import TransferConfig, transfer

__all__ = [
    "ANALYSES",
    "ARTIFACTS",
    "DISCOVERERS",
    "METHODS",
    "AnalysisContext",
    "ArtifactContext",
    "ArtifactKind",
    "Column",
    "Discovery",
    "DiscoveryConfig",
    "Mask",
    "MaskSelection",
    "MaskedModel",
    "Method",
    "MethodContext",
    "NonFiniteLoss",
    "NotPackable",
    "Objective",
    "Profile",
    "TrainConfig",
    "TransferConfig",
    "cross_entropy",
    "discover",
    "effective_state_dict",
    "evaluate",
    "fit",
    "fit_packed",
    "get_method",
    "maskable_names",
    "packable",
    "register_analysis",
    "register_artifact",
    "register_method",
    "topk_mask",
    "train",
    "transfer",
]
