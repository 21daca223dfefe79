"""Methods: mask discovery, transfer, training, and the registry of compared methods."""

from methods.discovery import Discovery, DiscoveryConfig, discover
from methods.masking import Mask, MaskedModel, MaskSelection, maskable_names, topk_mask
from methods.registry import METHODS, Method, MethodInputs, get_method, register_method
from methods.training import NonFiniteLoss, TrainConfig, evaluate, train
from methods.transfer import TransferConfig, transfer

__all__ = [
    "METHODS",
    "Discovery",
    "DiscoveryConfig",
    "Mask",
    "MaskSelection",
    "MaskedModel",
    "Method",
    "MethodInputs",
    "NonFiniteLoss",
    "TrainConfig",
    "TransferConfig",
    "discover",
    "evaluate",
    "get_method",
    "maskable_names",
    "register_method",
    "topk_mask",
    "train",
    "transfer",
]
