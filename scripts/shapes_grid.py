"""Write docs/shapes_splits.png: a grid of each split of the `shapes` task, as the model sees it.

python scripts/shapes_grid.py [--classes 10] [--size 32] [--out docs/shapes_splits.png]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from common.seeding import numpy_generator
from tasks.shapes_render import SHAPES, TEXTURES, render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", default="docs/shapes_splits.png")
    parser.add_argument("--texture-rotation", type=float, default=0.0, help="as the task's texture_rotation")
    args = parser.parse_args()
    k, size, zoom, pad, label_w = args.classes, args.size, 3, 4, 120
    ids = np.arange(k)
    rot = args.texture_rotation
    rows = {
        "textured": render(ids, ids, numpy_generator(0, "grid:t"), size, k, texture_rotation=rot),
        "silhouette": render(ids, None, numpy_generator(0, "grid:s"), size, k, mode="silhouette"),
        "cue_conflict": render(ids, (ids + 1) % k, numpy_generator(0, "grid:c"), size, k, texture_rotation=rot),
        "texture_only": render(
            ids, ids, numpy_generator(0, "grid:o"), size, k, mode="texture_only", texture_rotation=rot
        ),
    }
    cell = size * zoom + pad
    canvas = Image.new("RGB", (label_w + k * cell, 24 + len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    names = list(SHAPES)[:k]
    for c in range(k):
        draw.text((label_w + c * cell, 4), names[c][:9], fill="black")
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, 24 + r * cell + cell // 2 - 6), name, fill="black")
        for c, img in enumerate(images):
            tile = Image.fromarray(img.transpose(1, 2, 0)).resize((size * zoom, size * zoom), Image.NEAREST)
            canvas.paste(tile, (label_w + c * cell, 24 + r * cell))
    canvas.save(args.out)
    print(f"wrote {args.out}: columns are classes (shape k with texture k: {', '.join(TEXTURES[:k])});")
    print("cue_conflict shows shape k with texture k+1")


if __name__ == "__main__":
    main()
