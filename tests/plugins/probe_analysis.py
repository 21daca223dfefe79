"""A test-only analysis, loaded through a sweep's `plugins:`: an analysis is one file and its
registration."""

import torch

from methods.analysis import Column, register_analysis
from methods.masking import effective_state_dict


@register_analysis("probe", columns={"probe_norm": Column()}, description="test: L2 norm of the effective weights")
def probe(ctx, model, config) -> dict[str, float]:
    """L2 norm over every floating tensor of the model's effective state dict."""
    tensors = [t.double() for t in effective_state_dict(model).values() if t.is_floating_point()]
    return {"probe_norm": float(torch.sqrt(sum((t**2).sum() for t in tensors)))}
