"""Is a scratch CNN texture-biased on the `shapes` data? Train one, print its shape bias.

Trains a ResNet-18 (width given) from scratch on textured images, without Ray, and prints textured,
silhouette and texture-only accuracy and shape bias on cue-conflict images, for each
texture rotation given. This is the calibration behind the `texture_rotation` default (docs/VISION.md).

    python benchmarks/texture_bias_probe.py --rotations 180 20 0 [--n 2000] [--epochs 10] [--width 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rotations", type=float, nargs="+", default=[180.0, 20.0, 0.0])
    parser.add_argument("--n", type=int, default=2000, help="training images")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from common.seeding import seeded_init, torch_generator
    from methods import TrainConfig, evaluate, train
    from tasks.models.vision import SmallImageResNet
    from tasks.shapes import Shapes, ShapesConfig

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        for rotation in args.rotations:
            cfg = ShapesConfig(n_classes=10, n_base=100, n_subtask=100, pool_size=args.n, n_val=300, n_test=600,
                               texture_rotation=rotation, cache_dir=cache)  # fmt: skip
            data = Shapes(cfg).downstream_data(args.seed, 1.0)
            with seeded_init(args.seed, "probe"):
                model = SmallImageResNet(args.width, 10)
            start = time.perf_counter()
            result = train(model, data, TrainConfig(lr=2e-3, batch_size=64, epochs=args.epochs),
                           torch_generator(args.seed, "probe"))  # fmt: skip
            acc = {name: evaluate(model, split) for name, split in data.evals.items()}
            shape, texture = acc["cue_conflict"]["shape"], acc["cue_conflict"]["texture"]
            print(
                f"texture_rotation {rotation:5.0f}: val {result.best_val_acc:.3f}, "
                f"textured test {acc['test']['y']:.3f}, "
                f"silhouette {acc['silhouette']['y']:.3f}, texture-only {acc['texture_only']['y']:.3f}, "
                f"shape bias {shape / (shape + texture):.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
