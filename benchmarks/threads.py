"""Threads per trial on this machine: what `resources.cpu: auto` measures (orchestrator/threads.py).

For each option t = 1, 2, 4, ... up to the machine's CPUs, CPUs // t processes of t torch threads
each train the sweep's model at once for --window seconds; prints the machine's model-steps/s per
option and the choice (the fewest threads within 5% of the fastest).

    python benchmarks/threads.py configs/quickstart.yaml
"""

import argparse
import json
import os

from orchestrator.config import load_sweep_file
from orchestrator.threads import MARGIN, WINDOW_S, choose, cpu_model, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--window", type=float, default=WINDOW_S, help="seconds each option trains")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sweep = load_sweep_file(args.sweep)
    print(f"machine: {cpu_model()}, {args.cpus} CPUs, load {os.getloadavg()[0]:.1f}; sweep {args.sweep}")
    for repeat in range(args.repeats):
        found = measure(json.dumps(sweep.canonical()), args.cpus, window_s=args.window)
        rates = ", ".join(f"{t} thread(s) x {args.cpus // t}: {r:.0f}" for t, r in found["rates"].items())
        print(f"  run {repeat + 1}: model-steps/s of the machine: {rates} -> {choose(found['rates'])} thread(s)")
    print(f"(the choice: the fewest threads within {MARGIN:.2f}x of the fastest)")


if __name__ == "__main__":
    main()
