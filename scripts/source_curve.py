"""How fast a sweep's source model learns its base task: one source trained as the sweep would train
it, printing validation accuracy and loss after every epoch (no early stop, so the whole curve).

    python scripts/source_curve.py SWEEP.yaml [--set PATH=VALUE ...] [--seed 0] [--threads 1]

`--set` changes any config path for this run (`--set task.loss=all_positions --set
model.n_layers=2`); values are read as YAML (`null`, numbers, strings). Used to size
configs/arithmetic-paper-cpu.yaml (docs/REPRODUCTION.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="a config path's value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from common.seeding import torch_generator
    from methods.training import train
    from orchestrator.config import load_sweep_file
    from orchestrator.trial import fresh_model

    torch.set_num_threads(args.threads)
    values = {}
    for item in args.set:
        path, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: write PATH=VALUE, e.g. --set task.loss=all_positions")
        values[path] = yaml.safe_load(text)
    sweep = load_sweep_file(args.sweep)
    sweep = sweep.with_values({**values, "source.patience": None, "source.target_val_acc": None})
    task = sweep.build_task()
    model = fresh_model(sweep, task, args.seed, "source_init")
    data, source = task.base_data(args.seed), sweep.block("source")
    print(f"source of {args.sweep} with {values or 'no changes'}: {len(data.train)} samples, "
          f"{source.epochs} epochs, lr {source.lr} ({source.lr_schedule})", flush=True)  # fmt: skip
    start = time.perf_counter()

    def on_epoch(epoch: int, score: float) -> None:
        print(f"epoch {epoch:3d}  val_acc {score:.3f}  {time.perf_counter() - start:7.1f} s", flush=True)

    result = train(model, data, source, torch_generator(args.seed, "source_train"), on_epoch=on_epoch)
    losses = [round(m.get("val_loss", float("nan")), 4) for m in result.measurements]
    print(f"best epoch {result.best_epoch} ({source.select}): val_acc {result.best_val_acc:.3f}")
    if any(v == v for v in losses):
        print(f"val_loss per epoch: {losses}")


if __name__ == "__main__":
    main()
