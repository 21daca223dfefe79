"""Transfer of a subnetwork into a freshly initialised model (METHOD.md, stage 3).

For each masked weight: W_eff = where(m, W_sub, W_new), W_sub the source weights (frozen unless
`trainable_subnetwork`), W_new the fresh model's own default init. Unmasked parameters (biases,
norms, embeddings, head) are kept from the source (`unmasked: keep`, what the paper's code does) or
left at their fresh init (`unmasked: reinit`, what the paper's text says).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from common.config import Frozen, declare_block
from methods.masking import Mask, MaskedModel, Transplant


@declare_block("transfer")
class TransferConfig(Frozen):
    """The `transfer:` block, read by the methods that transfer a subnetwork (`reads=("transfer",)`)."""

    trainable_subnetwork: bool = False
    unmasked: Literal["keep", "reinit"] = "keep"


def transfer(source: nn.Module, fresh: nn.Module, mask: Mask, cfg: TransferConfig) -> MaskedModel:
    """A model whose masked weights come from `source` where `mask` is 1 and from `fresh` elsewhere.

    `fresh` is consumed (wrapped, and its unmasked parameters overwritten when `unmasked: keep`);
    `source` is only read.
    """
    source_params = dict(source.named_parameters())
    fresh_params = dict(fresh.named_parameters())
    if source_params.keys() != fresh_params.keys():
        raise ValueError("source and fresh models have different parameters; transfer needs one architecture")
    if cfg.unmasked == "keep":
        with torch.no_grad():
            for name, p in fresh_params.items():
                if name not in mask:
                    p.copy_(source_params[name])
            fresh_buffers = dict(fresh.named_buffers())
            for name, b in source.named_buffers():  # batch-norm statistics travel with their norms
                fresh_buffers[name].copy_(b)
    fns = {
        name: Transplant(source_params[name], m.to(source_params[name].device), cfg.trainable_subnetwork)
        for name, m in mask.items()
    }
    return MaskedModel(fresh, fns)
