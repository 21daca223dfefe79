"""Vectorised procedural images in the style of Trifeature (Hermann & Lampinen 2020).

An image is a shape (a set of polygons in unit coordinates, rotated, scaled and placed at random)
filled with a texture (a binary pattern in rotated, phase-shifted texture coordinates) in one colour,
on a grey background:

    pixel = mask * texture * colour + (1 - mask * texture) * grey

A silhouette uses texture = 1 (a flat fill); a texture-only image uses mask = 1 (no shape).
Rendering works on whole batches at once in torch: every pixel of every image is tested against
every polygon edge (crossing-number rule), and every texture is a closed-form function of its
coordinates.
"""

from __future__ import annotations

import math

import numpy as np
import torch

GREY = 0.5


def _regular(n: int, radius: float = 1.0, start: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(start + 2 * math.pi * i / n), radius * math.sin(start + 2 * math.pi * i / n))
            for i in range(n)]  # fmt: skip


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner, strict=True) for p in pair]


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int = 16) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a0 + (a1 - a0) * i / (n - 1)), cy + r * math.sin(a0 + (a1 - a0) * i / (n - 1)))
            for i in range(n)]  # fmt: skip


# Each shape: a list of disjoint polygons in unit coordinates (inside the unit disc). The first ten
# are Trifeature's; the rest extend the set to 16 classes. No shape is another rotated by <= 45
# degrees (an X would be a rotated plus, so there is none).
SHAPES: dict[str, list[list[tuple[float, float]]]] = {
    "triangle": [_regular(3)],
    "square": [_rect(-0.72, -0.72, 0.72, 0.72)],
    "plus": [
        [
            (-0.3, -1),
            (0.3, -1),
            (0.3, -0.3),
            (1, -0.3),
            (1, 0.3),
            (0.3, 0.3),
            (0.3, 1),
            (-0.3, 1),
            (-0.3, 0.3),
            (-1, 0.3),
            (-1, -0.3),
            (-0.3, -0.3),
        ]
    ],  # fmt: skip
    "circle": [_regular(24, 0.9)],
    "tee": [
        [(-1, -0.9), (1, -0.9), (1, -0.35), (0.28, -0.35), (0.28, 0.95), (-0.28, 0.95), (-0.28, -0.35), (-1, -0.35)]
    ],  # fmt: skip
    "rhombus": [[(0, -1), (0.5, 0), (0, 1), (-0.5, 0)]],
    "pentagon": [_regular(5, 0.95)],
    "star": [_star()],
    "fivesquare": [
        _rect(-0.22, -0.22, 0.22, 0.22),
        _rect(-0.95, -0.95, -0.45, -0.45),
        _rect(0.45, -0.95, 0.95, -0.45),
        _rect(-0.95, 0.45, -0.45, 0.95),
        _rect(0.45, 0.45, 0.95, 0.95),
    ],  # fmt: skip
    "trapezoid": [[(-1, 0.6), (1, 0.6), (0.45, -0.6), (-0.45, -0.6)]],
    "hexagon": [_regular(6, 0.95, 0.0)],
    "arrow": [[(-1, -0.25), (0.15, -0.25), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.25), (-1, 0.25)]],
    # a disc of radius 0.95 less a disc of radius 0.8 centred 0.4 to the right
    "crescent": [
        _arc(0, 0, 0.95, math.radians(56.2), math.radians(303.8), 20)
        + _arc(0.4, 0, 0.8, math.radians(279.2), math.radians(80.8), 14)
    ],  # fmt: skip
    "ell": [[(-0.75, -1), (-0.2, -1), (-0.2, 0.45), (0.8, 0.45), (0.8, 1), (-0.75, 1)]],
    "hourglass": [[(-0.8, -1), (0.8, -1), (0.12, 0), (0.8, 1), (-0.8, 1), (-0.12, 0)]],
    "semicircle": [_arc(0, 0.3, 1.0, math.pi, 2 * math.pi, 18)],
}

TEXTURES = (
    "stripes",
    "grid",
    "hexgrid",
    "dots",
    "noise",
    "triangles",
    "zigzags",
    "rain",
    "pluses",
    "checker",
    "crosshatch",
    "waves",
    "rings",
    "bricks",
    "diamonds",
    "squares",
)  # fmt: skip  ("solid" is left out: a flat fill would make every silhouette look like its class)

COLOURS = torch.tensor(
    [
        [0.90, 0.10, 0.10], [0.10, 0.60, 0.10], [0.15, 0.25, 0.95], [0.95, 0.80, 0.05], [0.70, 0.10, 0.80],
        [0.05, 0.80, 0.80], [0.95, 0.50, 0.05], [0.10, 0.10, 0.10], [0.98, 0.98, 0.98], [0.55, 0.30, 0.10],
    ]
)  # fmt: skip


def _edge_table(names: list[str]) -> torch.Tensor:
    """[K, E, 4] edges (x1, y1, x2, y2) per shape, padded with zero-length edges that never cross."""
    edges = []
    for name in names:
        shape_edges = []
        # every shape is scaled to touch the unit circle, so `radius` below is its true extent
        reach = max(math.hypot(x, y) for poly in SHAPES[name] for x, y in poly)
        for poly in SHAPES[name]:
            for i, (x1, y1) in enumerate(poly):
                x2, y2 = poly[(i + 1) % len(poly)]
                shape_edges.append((x1 / reach, y1 / reach, x2 / reach, y2 / reach))
        edges.append(shape_edges)
    width = max(len(e) for e in edges)
    table = torch.zeros(len(names), width, 4)
    for k, e in enumerate(edges):
        table[k, : len(e)] = torch.tensor(e)
    return table


def _inside(u: torch.Tensor, v: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Crossing-number test. u, v: [N, P]; edges: [N, E, 4] -> [N, P] bool (even-odd rule)."""
    x1, y1, x2, y2 = (edges[..., i].unsqueeze(1) for i in range(4))  # [N, 1, E]
    u, v = u.unsqueeze(-1), v.unsqueeze(-1)  # [N, P, 1]
    straddles = (y1 > v) != (y2 > v)
    dy = torch.where(y2 == y1, torch.ones_like(y1), y2 - y1)
    x_cross = (x2 - x1) * (v - y1) / dy + x1
    crossings = (straddles & (u < x_cross)).sum(-1)
    return crossings % 2 == 1


def _fract(x: torch.Tensor) -> torch.Tensor:
    return x - torch.floor(x)


def _hash(a: torch.Tensor, b: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """A deterministic pseudo-random value in [0, 1) per integer cell (a, b) and image salt."""
    return _fract(torch.sin(a * 12.9898 + b * 78.233 + salt * 37.719) * 43758.5453)


def _patterns(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> dict:
    """Each texture as a function of texture coordinates (u, v) in periods and a per-image salt s."""
    fu, fv = _fract(u), _fract(v)
    cu, cv = torch.floor(u), torch.floor(v)

    def hexgrid():
        hv = v * 1.1547  # 2 / sqrt(3)
        a = (fu - 0.5) ** 2 + (_fract(hv) - 0.5) ** 2
        b = (_fract(u + 0.5) - 0.5) ** 2 + (_fract(hv + 0.5) - 0.5) ** 2
        return (a.sqrt() - b.sqrt()).abs() < 0.12

    return {
        "stripes": lambda: fu < 0.5,
        "grid": lambda: (fu < 0.3) | (fv < 0.3),
        "hexgrid": hexgrid,
        "dots": lambda: (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.09,
        "noise": lambda: _hash(cu, cv, s) < 0.5,
        "triangles": lambda: fu + fv < 0.9,
        "zigzags": lambda: _fract(v + (2 * fu - 1).abs()) < 0.4,
        "rain": lambda: (fu < 0.25) & (_fract(v * 0.5 + _hash(cu, cu * 0, s)) < 0.5),
        "pluses": lambda: (
            (((fu - 0.5).abs() < 0.12) & ((fv - 0.5).abs() < 0.38))
            | (((fv - 0.5).abs() < 0.12) & ((fu - 0.5).abs() < 0.38))
        ),
        "checker": lambda: (cu + cv) % 2 == 0,
        "crosshatch": lambda: (_fract(u + v) < 0.28) | (_fract(u - v) < 0.28),
        "waves": lambda: _fract(v + 0.35 * torch.sin(2 * math.pi * u)) < 0.5,
        "rings": lambda: _fract(torch.sqrt(u * u + v * v) * 0.8) < 0.5,
        "bricks": lambda: (fv < 0.25) | (_fract(u * 0.5 + 0.5 * (cv % 2)) < 0.12),
        "diamonds": lambda: (fu - 0.5).abs() + (fv - 0.5).abs() < 0.3,
        "squares": lambda: ((fu - 0.5).abs() < 0.22) & ((fv - 0.5).abs() < 0.22),
    }


def texture_values(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """Binary texture per pixel. kind: [N] texture index; u, v: [N, P] texture coordinates in periods.
    Each texture is computed only for the images that carry it."""
    out = torch.zeros_like(u)
    for index in kind.unique().tolist():
        rows = kind == index
        pattern = _patterns(u[rows], v[rows], salt[rows].unsqueeze(1))[TEXTURES[index]]
        out[rows] = pattern().to(u.dtype)
    return out


def render(
    shape_ids: np.ndarray,
    texture_ids: np.ndarray | None,
    rng: np.random.Generator,
    size: int,
    n_classes: int,
    mode: str = "textured",
    chunk: int = 512,
    texture_rotation: float = 180.0,
    shape_radius: tuple[float, float] = (0.30, 0.42),
    colour_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Render images as uint8 [N, 3, size, size].

    mode: 'textured' (shape filled with texture), 'silhouette' (shape, flat fill) or 'texture_only'
    (texture over the whole frame). All randomness (colour, pose, texture phase and rotation) comes
    from `rng`, drawn up front, so a given rng state always gives the same images. Textures turn by
    up to `texture_rotation` degrees; shapes by up to +-45 degrees, with a radius drawn from
    `shape_radius` (fractions of the image size).

    colour_ids: [N] indices into COLOURS that replace the random colour draw (a biased split sets the
    colour by class). The draw is made and discarded all the same, so the rest of the stream (jitter,
    pose, texture phase) and every image without `colour_ids` stay as they were.
    """
    n = len(shape_ids)
    names = list(SHAPES)[:n_classes]
    table = _edge_table(names)
    n_edges = [sum(len(poly) for poly in SHAPES[name]) for name in names]
    # Per-image random parameters.
    drawn = rng.integers(0, len(COLOURS), n)  # always drawn: the stream must not depend on colour_ids
    index = drawn if colour_ids is None else np.asarray(colour_ids)
    if len(index) != n or not ((index >= 0) & (index < len(COLOURS))).all():
        raise ValueError(f"colour_ids: give {n} indices in [0, {len(COLOURS)})")
    colour = COLOURS[index] + torch.from_numpy(rng.uniform(-0.05, 0.05, (n, 3))).float()
    colour = colour.clamp(0, 1)
    radius = torch.from_numpy(rng.uniform(*shape_radius, n) * size).float()
    centre = torch.from_numpy(rng.uniform(0, 1, (n, 2))).float() * (size - 2 * radius).unsqueeze(1) + radius.unsqueeze(
        1
    )
    angle = torch.from_numpy(rng.uniform(-math.pi / 4, math.pi / 4, n)).float()
    tex_angle = torch.from_numpy(rng.uniform(0, math.radians(texture_rotation), n)).float()
    tex_phase = torch.from_numpy(rng.uniform(0, 1, (n, 2))).float()
    period = torch.from_numpy(rng.uniform(4.0, 6.0, n) * size / 32).float()
    salt = torch.from_numpy(rng.uniform(0, 100, n)).float()

    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")  # fmt: skip
    xs, ys = xs.reshape(1, -1), ys.reshape(1, -1)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    shape_t = torch.as_tensor(shape_ids, dtype=torch.long)
    tex_t = torch.as_tensor(texture_ids if texture_ids is not None else shape_ids, dtype=torch.long)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        dx = (xs - centre[sl, :1]) / radius[sl, None]
        dy = (ys - centre[sl, 1:]) / radius[sl, None]
        c, s = torch.cos(-angle[sl])[:, None], torch.sin(-angle[sl])[:, None]
        u, v = c * dx - s * dy, s * dx + c * dy
        if mode == "texture_only":
            mask = torch.ones_like(u)
        else:
            mask = torch.zeros_like(u)
            for k in shape_t[sl].unique().tolist():  # each shape with its own edge count
                rows = shape_t[sl] == k
                mask[rows] = _inside(
                    u[rows], v[rows], table[k : k + 1, : n_edges[k]].expand(int(rows.sum()), -1, -1)
                ).float()
        if mode == "silhouette":
            fill = torch.ones_like(u)
        else:
            tc, ts = torch.cos(tex_angle[sl])[:, None], torch.sin(tex_angle[sl])[:, None]
            tu = (tc * xs - ts * ys) / period[sl, None] + tex_phase[sl, :1]
            tv = (ts * xs + tc * ys) / period[sl, None] + tex_phase[sl, 1:]
            fill = texture_values(tex_t[sl], tu, tv, salt[sl])
        alpha = (mask * fill).unsqueeze(1)  # [n, 1, P]
        pixels = alpha * colour[sl].unsqueeze(-1) + (1 - alpha) * GREY
        out[sl] = (pixels.reshape(-1, 3, size, size) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


# --- the cue box (seed 003, CBFT) ----------------------------------------------------------------


def box_layout(size: int, n_classes: int) -> tuple[int, np.ndarray]:
    """(box side in px, [K, 2] top-left (row, col) of each class's box).

    The side is 3 px at 32 px, scaled with the image (at least 2). CBFT places 10 classes on 9 fixed
    positions; here every class gets its own: the image is cut into a g x g grid, g = ceil(sqrt(K)),
    and class k's box is centred in cell k (row-major). A cell is at least size / 4 >= box side, so
    boxes never overlap.
    """
    side = max(2, round(3 * size / 32))
    g = math.ceil(math.sqrt(n_classes))
    start = np.floor((np.arange(g) + 0.5) * size / g - side / 2).astype(np.int64)  # per grid row / column
    cells = np.arange(n_classes)
    return side, np.stack([start[cells // g], start[cells % g]], axis=1)


def paint_boxes(x: torch.Tensor, box_class: np.ndarray, size: int, n_classes: int, value: float) -> torch.Tensor:
    """A copy of images x [N, C, S, S] with, on every image i with box_class[i] >= 0, the box of
    class box_class[i] set to `value` in every channel (images with -1 are left as they are)."""
    side, corner = box_layout(size, n_classes)
    out = x.clone()
    box_class = np.asarray(box_class)
    for k in np.unique(box_class[box_class >= 0]).tolist():
        rows = torch.from_numpy(np.nonzero(box_class == k)[0])
        (r, c) = corner[k].tolist()
        out[rows, :, r : r + side, c : c + side] = value
    return out
