"""Peak memory of the linearised-network GP's fit (methods/linearized_gp.py, `fit_gp`).

One fit in this process on a float32 tanh MLP of compare-arithmetic's shapes (P = 120,513
parameters, a 231-parameter head, C = 7 classes) on N random training examples (50 validation
examples), explicit Jacobian, default evidence search, 100 predictive draws, one torch thread.
Prints the process's peak RSS (`ru_maxrss`) before and after the fit, the sizes of J(X)
(N·C·P·4 bytes) and K (N·C)²·8 bytes, and the fit's measurements row; with `--save FILE`, the
fitted buffers and predictions, to compare two versions of the code bit for bit.

    python benchmarks/linearized_gp_memory.py --n 300 [--save FILE]

Run from another checkout (PYTHONPATH=that checkout) to measure another version of `fit_gp`.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

from methods.linearized_gp import LinearizedGP, LinearizedGPConfig, fit_gp
from tasks.base import Split


class MLP(nn.Module):
    head_name = "head"

    def __init__(self, d: int = 32, width: int = 1850, hidden: int = 32, c: int = 7):
        super().__init__()
        self.layer, self.mid, self.head = nn.Linear(d, width), nn.Linear(width, hidden), nn.Linear(hidden, c)

    def feature_names(self):
        return ("hidden",)

    def forward(self, x, intermediates=False):
        h = torch.tanh(self.mid(torch.tanh(self.layer(x))))
        logits = self.head(h)
        return (logits, {"hidden": h}) if intermediates else logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="training examples")
    parser.add_argument("--save", help="file for the fitted buffers and predictions (torch.save)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LinearizedGP(MLP())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(args.n + 50, 32, generator=gen), torch.randint(7, (args.n + 50,), generator=gen)
    train, val = Split(x[: args.n], {"y": y[: args.n]}), Split(x[args.n :], {"y": y[args.n :]})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start = time.perf_counter()
    cfg = LinearizedGPConfig(jacobian_max_bytes=2**40, samples=100)
    result = fit_gp(model, train, val, cfg, 64, torch.Generator().manual_seed(2))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    nc, p = args.n * 7, model.n_params
    print(f"N={args.n} N·C={nc} P={p} J={nc * p * 4 / 1e9:.3f} GB K={nc * nc * 8 / 1e9:.3f} GB "
          f"peak RSS before fit={before:.2f} GB after={peak:.2f} GB fit={seconds:.1f} s")  # fmt: skip
    print(result.measurements[0])
    if args.save:
        buffers = {name: getattr(model, name) for name in ("gp_delta", "gp_alpha", "gp_head_factor", "gp_draws")}
        torch.save({"row": result.measurements[0], **buffers, "pred": model(val.x).detach()}, args.save)


if __name__ == "__main__":
    main()
