"""Drawing the synthetic "shapes" scenes: coloured geometric shapes on textured backgrounds, with occlusion.

Everything is drawn from a `numpy.random.Generator` passed in, so a scene is a pure function of its seed. Shapes are
rasterised by PIL at 4x and box-filtered down: the image gets anti-aliased edges, the labels get the hard mask
(coverage >= 1/2), and both come from the same drawing. This module knows nothing about file layouts
(see `synthetic.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Shapes chosen to be told apart by outline alone, under any rotation and colour (no diamond: it is a rotated square).
CLASSES = ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "crescent")
_SUPERSAMPLE = 4


@dataclass
class Shape:
    kind: int  # index into CLASSES
    cx: float
    cy: float
    radius: float
    angle: float  # radians
    colour: np.ndarray  # (3,) float in 0..255


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    shapes: list[Shape]  # drawing order: later shapes occlude earlier ones
    owner: np.ndarray  # (H, W) int: index into `shapes` of the visible shape, -1 for background


def _ngon(n: int, cx: float, cy: float, r: float, angle: float, radii=(1.0,)) -> list[tuple[float, float]]:
    """Vertices of an n-gon (or a star, with alternating `radii`) around (cx, cy)."""
    k = np.arange(n)
    theta = angle + 2 * np.pi * k / n
    rr = r * np.asarray(radii)[k % len(radii)]
    return list(zip(cx + rr * np.cos(theta), cy + rr * np.sin(theta)))


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    w = 0.34 * r  # half the arm width
    pts = np.array([(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w),
                    (-w, w), (-w, r)])
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def shape_alpha(shape: Shape, size: tuple[int, int]) -> np.ndarray:
    """Coverage in [0, 1] of `shape` over an image of `size` = (width, height)."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (size[0] * ss, size[1] * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r, a = shape.cx * ss, shape.cy * ss, shape.radius * ss, shape.angle
    name = CLASSES[shape.kind]

    def disc(x, y, rad, fill):
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)

    if name == "circle":
        disc(cx, cy, r, 255)
    elif name == "square":
        draw.polygon(_ngon(4, cx, cy, r, a), fill=255)
    elif name == "triangle":
        draw.polygon(_ngon(3, cx, cy, r, a), fill=255)
    elif name == "hexagon":
        draw.polygon(_ngon(6, cx, cy, r, a), fill=255)
    elif name == "star":
        draw.polygon(_ngon(10, cx, cy, r, a, radii=(1.0, 0.45)), fill=255)
    elif name == "cross":
        draw.polygon(_cross(cx, cy, r, a), fill=255)
    elif name == "ring":
        disc(cx, cy, r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif name == "crescent":
        disc(cx, cy, r, 255)
        disc(cx + 0.5 * r * np.cos(a), cy + 0.5 * r * np.sin(a), 0.85 * r, 0)
    small = canvas.resize(size, Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A textured background (H, W, 3) float: a two-colour gradient, stripes or smooth noise. The second colour is
    pulled towards the first (15-50% of the way to a random one), so texture never outshouts the shapes: at full
    contrast a small CNN stayed near chance on 1,000 images."""
    c1 = rng.uniform(0, 255, 3)
    c2 = c1 + (rng.uniform(0, 255, 3) - c1) * rng.uniform(0.15, 0.5)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(height, width), xx / max(height, width)
    a = rng.uniform(0, 2 * np.pi)
    along = np.cos(a) * xx + np.sin(a) * yy
    kind = rng.integers(3)
    if kind == 0:  # gradient
        t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    elif kind == 1:  # stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 8) * along + rng.uniform(0, 2 * np.pi))
    else:  # smooth noise: a coarse random grid upsampled
        g = int(rng.integers(3, 8))
        grid = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8), "L")
        t = np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def pick_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A random colour at a clear distance from the mean colour `behind` it (a few tries, then the farthest)."""
    best, best_d = None, -1.0
    for _ in range(10):
        c = rng.uniform(0, 255, 3)
        d = float(np.abs(c - behind).sum())
        if d > best_d:
            best, best_d = c, d
        if d >= 200:
            break
    return best


def compose(rng: np.random.Generator, width: int, height: int, shapes: list[Shape], alphas: list[np.ndarray],
            base: np.ndarray) -> Scene:
    """Paint `shapes` over `base` in order, each with a soft linear shading; add sensor noise."""
    img = base.copy()
    owner = np.full((height, width), -1, dtype=np.int64)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i, (shape, alpha) in enumerate(zip(shapes, alphas)):
        a = rng.uniform(0, 2 * np.pi)  # light direction: shading varies across the shape, not a flat fill
        ramp = ((xx - shape.cx) * np.cos(a) + (yy - shape.cy) * np.sin(a)) / max(shape.radius, 1.0)
        fill = shape.colour[None, None, :] * (1.0 + 0.2 * np.clip(ramp, -1, 1))[..., None]
        img = img * (1 - alpha[..., None]) + fill * alpha[..., None]
        owner[alpha >= 0.5] = i
    img = img + rng.normal(0.0, rng.uniform(0, 6), img.shape)
    return Scene(np.clip(np.rint(img), 0, 255).astype(np.uint8), shapes, owner)


def random_shape(rng: np.random.Generator, kind: int, width: int, height: int, radius: float, margin: float,
                 base: np.ndarray) -> Shape:
    """A shape of class `kind` whose centre keeps `margin` * radius from the borders, coloured against `base`."""
    m = min(margin * radius, width / 2, height / 2)
    cx, cy = rng.uniform(m, width - m), rng.uniform(m, height - m)
    y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius, height)) + 1
    x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius, width)) + 1
    behind = base[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    return Shape(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi), pick_colour(rng, behind))


def classification_scene(rng: np.random.Generator, size: int, label: int) -> Scene:
    """One dominant shape of class `label` and 0-2 smaller distractors of other classes, some drawn over it."""
    base = background(rng, size, size)
    main = random_shape(rng, label, size, size, rng.uniform(0.26, 0.42) * size, 0.95, base)
    shapes = [main]
    for _ in range(int(rng.integers(0, 3))):
        kind = int(rng.choice([k for k in range(len(CLASSES)) if k != label]))
        d = random_shape(rng, kind, size, size, rng.uniform(0.06, 0.11) * size, 0.5, base)
        shapes.insert(int(rng.integers(0, 2)) * len(shapes), d)  # behind or in front of the main shape
    alphas = [shape_alpha(s, (size, size)) for s in shapes]
    return compose(rng, size, size, shapes, alphas, base)


def multi_object_scene(rng: np.random.Generator, size: int, max_objects: int, radius_range: tuple[float, float],
                       min_visible: float = 0.5) -> Scene:
    """1..max_objects shapes of random classes; a shape left less than `min_visible` of its in-frame area by the
    ones in front is removed, so every drawn shape can be labelled."""
    base = background(rng, size, size)
    n = int(rng.integers(1, max_objects + 1))
    shapes = [random_shape(rng, int(rng.integers(len(CLASSES))), size, size,
                           rng.uniform(*radius_range) * size, 0.0, base) for _ in range(n)]
    alphas = [shape_alpha(s, (size, size)) for s in shapes]
    while True:
        owner = np.full((size, size), -1)
        for i, a in enumerate(alphas):
            owner[a >= 0.5] = i
        full = np.array([(a >= 0.5).sum() for a in alphas])
        visible = np.array([(owner == i).sum() for i in range(len(alphas))])
        ok = (visible >= min_visible * full) & (visible >= 12)
        if ok.all():
            break
        worst = int(np.argmin(np.where(full > 0, visible / np.maximum(full, 1), -1.0)))
        del shapes[worst], alphas[worst]
    return compose(rng, size, size, shapes, alphas, base)
