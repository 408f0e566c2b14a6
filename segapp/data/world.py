"""The synthetic world: seeded scenes of coloured, textured shapes on a pale background.

Pure numpy + OpenCV (no torch), deterministic for a given ``np.random.Generator``.
Conventions: images are ``H x W x 3`` uint8 RGB, masks ``H x W`` bool, points ``(x, y)`` in
pixels with the origin at the top-left corner (y grows downwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

IMAGE_SIZE = 256
SPLITS = ("train", "val", "test")
SPLIT_ID = {"train": 0, "val": 1, "test": 2}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "orange": (245, 130, 20),
    "purple": (130, 50, 175),
    "cyan": (25, 195, 210),
    "pink": (245, 115, 185),
}
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "heart",
    "cross",
    "diamond",
    "octagon",
)
SIZES: tuple[str, ...] = ("small", "medium", "large")
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted")
# radius range (pixels) of each size class; a shape's polygon spans roughly its radius
SIZE_RADII: dict[str, tuple[float, float]] = {
    "small": (14.0, 19.0),
    "medium": (24.0, 31.0),
    "large": (38.0, 46.0),
}
# (colour, shape) combinations that never appear in the train split
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("green", "triangle"),
        ("blue", "star"),
        ("red", "hexagon"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("orange", "heart"),
        ("cyan", "cross"),
        ("pink", "diamond"),
    }
)
# pale, low-saturation backgrounds that cannot be mistaken for an object colour
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (244, 243, 238),
    (236, 236, 236),
    (242, 236, 224),
    (230, 236, 242),
    (234, 242, 232),
    (246, 240, 240),
)
# rotation (degrees) allowed per shape: full symmetry period, or a small wobble where a large
# rotation would change what the shape is called (a square at 45 degrees reads as a diamond)
_ROTATION: dict[str, tuple[float, float]] = {
    "circle": (0.0, 0.0),
    "square": (-15.0, 15.0),
    "triangle": (0.0, 120.0),
    "star": (0.0, 72.0),
    "hexagon": (0.0, 60.0),
    "heart": (-20.0, 20.0),
    "cross": (-15.0, 15.0),
    "diamond": (-15.0, 15.0),
    "octagon": (0.0, 45.0),
}
MIN_VISIBLE = 0.55  # smallest visible fraction of an occluded object
MIN_PIECE = 30  # smallest visible piece (pixels) when an occluded object is split
_SHIFT = 4  # fixed-point bits for cv2 polygon drawing (sub-pixel accuracy)


@dataclass(frozen=True)
class Obj:
    """One object: attributes plus geometry (``center`` is ``(x, y)`` in pixels)."""

    shape: str
    color: str
    size: str
    texture: str
    center: tuple[float, float]
    radius: float
    angle: float  # degrees, counter-clockwise on screen


@dataclass
class Scene:
    """A rendered scene; ``masks[k]`` is the VISIBLE part of ``objects[k]`` (painter's order)."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    objects: list[Obj]
    masks: np.ndarray  # K x H x W bool


def _regular(n: int, radius: float, phase: float = -90.0) -> np.ndarray:
    t = np.deg2rad(phase + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def _unit_polygon(shape: str) -> np.ndarray:
    """N x 2 outline of ``shape`` around the origin for radius 1 (y down)."""
    if shape == "circle":
        return _regular(48, 1.0)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.82
    if shape == "triangle":
        return _regular(3, 1.18)
    if shape == "star":
        outer, inner = _regular(5, 1.2), _regular(5, 0.5, phase=-90.0 + 36.0)
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if shape == "hexagon":
        return _regular(6, 1.0)
    if shape == "octagon":
        return _regular(8, 1.0, phase=-90.0 + 22.5)
    if shape == "heart":
        t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
        x = 16.0 * np.sin(t) ** 3
        y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y - 2.5], axis=1) / 14.5
    if shape == "cross":
        a, w = 1.0, 0.36
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w)]
        pts += [(w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
        return np.array(pts, dtype=np.float64)
    if shape == "diamond":
        return np.array([[0, -1.2], [0.72, 0], [0, 1.2], [-0.72, 0]], dtype=np.float64)
    raise ValueError(f"unknown shape {shape!r}")


_UNIT = {s: _unit_polygon(s) for s in SHAPES}
_EXTENT = {s: float(np.linalg.norm(p, axis=1).max()) for s, p in _UNIT.items()}


def shape_polygon(obj: Obj) -> np.ndarray:
    """N x 2 float outline of ``obj`` in image pixels ``(x, y)``."""
    t = np.deg2rad(obj.angle)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    return _UNIT[obj.shape] @ rot.T * obj.radius + np.asarray(obj.center)


def full_area(obj: Obj) -> float:
    """Area (px^2) of the whole shape, occluded part included: its 'true size'."""
    p = _UNIT[obj.shape]
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) * obj.radius**2


def extent(obj: Obj) -> float:
    """Distance from the centre to the farthest point of the outline, pixels."""
    return _EXTENT[obj.shape] * obj.radius


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * (1 << _SHIFT)).astype(np.int32)


def full_mask(obj: Obj, size: int = IMAGE_SIZE) -> np.ndarray:
    """H x W bool mask of the whole shape (plain fill, no anti-aliasing)."""
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [_fixed(shape_polygon(obj))], 1, cv2.LINE_8, _SHIFT)
    return canvas.astype(bool)


def _shade(color: str) -> np.ndarray:
    """Darker shade of ``color`` used for stripes and dots (the hue stays recognisable)."""
    return np.asarray(COLORS[color], np.float32) * 0.62


def _texture(obj: Obj, x0: int, y0: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """h x w x 3 float32 fill of ``obj`` for the box at (x0, y0)."""
    base = np.asarray(COLORS[obj.color], np.float32)
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = base
    if obj.texture == "solid":
        return tex
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
    if obj.texture == "striped":
        t = np.deg2rad(rng.uniform(0.0, 180.0))
        period = rng.uniform(8.0, 10.0)
        u = xx * np.cos(t) + yy * np.sin(t) + rng.uniform(0.0, period)
        on = np.mod(u, period) < 0.42 * period
    else:  # dotted
        step = rng.uniform(8.0, 9.5)
        dx = np.mod(xx - obj.center[0], step) - step / 2
        dy = np.mod(yy - obj.center[1], step) - step / 2
        on = dx * dx + dy * dy < 2.3**2
    tex[on] = _shade(obj.color)
    return tex


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.asarray(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = base
    if rng.random() < 0.4:  # soft gradient along a random direction
        t = rng.uniform(0.0, 2.0 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        img += (rng.uniform(6.0, 14.0) * (xx * np.cos(t) + yy * np.sin(t)))[..., None]
    img += rng.normal(0.0, rng.uniform(1.5, 4.0), size=(size, size, 1)).astype(np.float32)
    return img


def render(objects: list[Obj], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Paint ``objects`` in order (later ones on top) with anti-aliased edges; H x W x 3 uint8."""
    img = _background(rng, size)
    for obj in objects:
        pts = shape_polygon(obj)
        x0, y0 = np.floor(pts.min(axis=0)).astype(int) - 2
        x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 3
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
        alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
        local = _fixed(pts - np.array([x0, y0]))
        cv2.fillPoly(alpha, [local], 255, cv2.LINE_AA, _SHIFT)
        a = (alpha.astype(np.float32) / 255.0)[..., None]
        tex = _texture(obj, x0, y0, x1 - x0, y1 - y0, rng)
        region = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = region * (1.0 - a) + tex * a
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def visible_ok(visible: np.ndarray, full_area_px: int) -> bool:
    """True if a visible mask is big enough, has no hole and no tiny split-off piece."""
    area = int(visible.sum())
    if area < MIN_VISIBLE * full_area_px:
        return False
    m = visible.astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n > 2 and stats[1:, cv2.CC_STAT_AREA].min() < MIN_PIECE:
        return False
    _, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is None or bool((hierarchy[0][:, 3] < 0).all())


def _sample_attributes(
    rng: np.random.Generator, split: str, placed: list[Obj], held_out: bool
) -> tuple[str, str, str, str]:
    colors, shapes = list(COLORS), list(SHAPES)
    while True:
        if held_out:
            color, shape = sorted(HELD_OUT)[rng.integers(len(HELD_OUT))]
        else:
            color = colors[rng.integers(len(colors))]
            shape = shapes[rng.integers(len(shapes))]
            if placed and rng.random() < 0.35:  # share an attribute: makes distractors
                other = placed[rng.integers(len(placed))]
                if rng.random() < 0.5:
                    color = other.color
                else:
                    shape = other.shape
        if split == "train" and (color, shape) in HELD_OUT:
            continue
        size = SIZES[rng.integers(len(SIZES))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        return color, shape, size, texture


def _try_place(
    rng: np.random.Generator,
    attrs: tuple[str, str, str, str],
    objects: list[Obj],
    fulls: list[np.ndarray],
    visibles: list[np.ndarray],
    size: int,
) -> tuple[Obj, np.ndarray, dict[int, np.ndarray]] | None:
    """Find a position for a new top object; returns it, its mask and updated visible masks."""
    color, shape, size_name, texture = attrs
    lo, hi = SIZE_RADII[size_name]
    radius = float(rng.uniform(lo, hi))
    may_overlap = rng.random() < 0.35
    for _ in range(25):
        angle = float(rng.uniform(*_ROTATION[shape]))
        probe = Obj(shape, color, size_name, texture, (0.0, 0.0), radius, angle)
        ext = extent(probe) + 2.0
        cx, cy = rng.uniform(ext, size - ext, size=2)
        obj = Obj(shape, color, size_name, texture, (float(cx), float(cy)), radius, angle)
        updated: dict[int, np.ndarray] = {}
        ok = True
        for k, other in enumerate(objects):
            dist = float(np.hypot(cx - other.center[0], cy - other.center[1]))
            reach = extent(obj) + extent(other)
            if dist > reach + 3.0:
                continue
            # same-colour objects must not touch: their outlines would merge
            if not may_overlap or other.color == color:
                ok = False
                break
            updated[k] = np.empty(0)  # filled below once the mask exists
        if not ok:
            continue
        mask = full_mask(obj, size)
        for k in updated:
            vis = visibles[k] & ~mask
            if not visible_ok(vis, int(fulls[k].sum())):
                ok = False
                break
            updated[k] = vis
        if ok:
            return obj, mask, updated
    return None


def generate_scene(rng: np.random.Generator, split: str) -> Scene:
    """2-6 objects; ``val``/``test`` scenes hold at least one held-out (colour, shape) object."""
    if split not in SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    size = IMAGE_SIZE
    n = int(rng.integers(2, 7))
    objects: list[Obj] = []
    fulls: list[np.ndarray] = []
    visibles: list[np.ndarray] = []
    need_held_out = split != "train"
    for _ in range(4 * n + 8):
        if len(objects) >= n:
            break
        attrs = _sample_attributes(rng, split, objects, held_out=need_held_out and not objects)
        placed = _try_place(rng, attrs, objects, fulls, visibles, size)
        if placed is None:
            continue
        obj, mask, updated = placed
        for k, vis in updated.items():
            visibles[k] = vis
        objects.append(obj)
        fulls.append(mask)
        visibles.append(mask.copy())
    if len(objects) < 2:  # practically unreachable: the first two placements nearly always fit
        return generate_scene(rng, split)
    image = render(objects, rng, size)
    return Scene(image=image, objects=objects, masks=np.stack(visibles))
