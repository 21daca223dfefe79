"""Methods whose test accuracy is set, not learnt (loaded through `plugins:`), for the seed-rule tests:
`always_right` answers every test input right at every seed; `seed_noise` answers a share of them
right drawn from the trial's seed (uniform in [0.2, 0.8]). Training leaves both unchanged."""

import torch
import torch.nn.functional as F
from torch import nn

from methods.registry import MethodContext, register_method


class Answers(nn.Module):
    """Looks each input up in the test split: the first `right` test inputs get their label, the
    others a wrong one; inputs it has not seen get class 0."""

    def __init__(self, ctx: MethodContext, right: int):
        super().__init__()
        test = ctx.data.evals["test"]
        self.classes = int(max(int(y.max()) for y in test.labels.values())) + 2
        labels = [int(y) if i < right else int(y) + 1 for i, y in enumerate(test.y)]
        self.answers = {tuple(x.tolist()): y for x, y in zip(test.x, labels, strict=True)}
        self.unused = nn.Parameter(torch.zeros(()))  # something for the optimiser; the answers do not depend on it

    def forward(self, x, **kwargs):
        picked = torch.tensor([self.answers.get(tuple(row.tolist()), 0) for row in x], device=x.device)
        return F.one_hot(picked, self.classes).float() + 0.0 * self.unused


@register_method("always_right", description="test: every test input right, at every seed")
def _always_right(ctx: MethodContext) -> nn.Module:
    return Answers(ctx, len(ctx.data.evals["test"].y))


@register_method("seed_noise", description="test: a share of the test inputs right drawn from the seed")
def _seed_noise(ctx: MethodContext) -> nn.Module:
    share = 0.2 + 0.6 * float(torch.rand((), generator=ctx.generator))
    return Answers(ctx, round(share * len(ctx.data.evals["test"].y)))
