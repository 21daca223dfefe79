"""A test-only analysis that needs the discovered mask, and returns numpy scalars (cast to its
declared dtypes): loaded through `plugins:`."""

import numpy as np

from methods.analysis import Column, register_analysis


@register_analysis(
    "maskprobe",
    needs=("mask",),
    columns={"maskprobe_density": Column("float64"), "maskprobe_tensors": Column("int64", summarise=False)},
)
def maskprobe(ctx, model, config):
    mask = ctx.artifact("mask")
    ones = sum(int(m.sum()) for m in mask.values())
    return {
        "maskprobe_density": np.float32(ones / sum(m.numel() for m in mask.values())),
        "maskprobe_tensors": np.int64(len(mask)),
    }
