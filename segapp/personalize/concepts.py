"""Novel concepts for personalization: shapes and textures the base model never saw in training.

A Concept is one specific object (shape + colour + texture) drawn with the synthetic world's
painter conventions (H x W x 3 uint8 RGB, H x W bool masks, (x, y) pixels). `concept_scene`
puts it among the world's objects and hard distractors (same colour, or same shape in another
colour); `augment` makes fitting examples from a user's shots by copy-paste.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from segapp.data.world import COLORS, IMAGE_SIZE, generate_scene

_SHIFT = 4
JITTER_HUE = 3.0  # a fitting copy's hue shift, at most (OpenCV units: 180 to the turn)
JITTER_VALUE = 0.1  # and its brightness factor's distance from 1, at most
NEAR_MISS_FROM = 0.375  # augment's draw: [0.375, 0.5) stretched copies; 0.5 turns them off
NEAR_MISS_STRETCH = (1.6, 2.2)  # their aspect factor


def _regular(n: int, radius: float, phase: float = -90.0) -> np.ndarray:
    t = np.deg2rad(phase + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def _circle(cx: float, cy: float, r: float) -> np.ndarray:
    return _regular(48, r) + np.array([cx, cy])


# shape -> [(polygon in unit coordinates, fill 1 or carve 0)], none of them in world.SHAPES
NOVEL_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "pentagon": [(_regular(5, 1.05), 1)],
    "trapezoid": [(np.array([[-1, 0.6], [1, 0.6], [0.55, -0.6], [-0.55, -0.6]]), 1)],
    "arrow": [
        (
            np.array(
                [[-1, -0.3], [0.15, -0.3], [0.15, -0.75], [1, 0], [0.15, 0.75], [0.15, 0.3]]
                + [[-1, 0.3]]
            ),
            1,
        )
    ],
    "tee": [
        (
            np.array(
                [[-1, -0.9], [1, -0.9], [1, -0.4], [0.28, -0.4], [0.28, 1], [-0.28, 1]]
                + [[-0.28, -0.4], [-1, -0.4]]
            ),
            1,
        )
    ],
    "crescent": [(_circle(0, 0, 1.0), 1), (_circle(0.55, -0.15, 0.78), 0)],
    "bolt": [
        (
            np.array(
                [[-0.2, -1.1], [0.55, -1.1], [0.1, -0.15], [0.6, -0.15], [-0.4, 1.1]]
                + [[-0.05, 0.1], [-0.5, 0.1]]
            ),
            1,
        )
    ],
}
NOVEL_TEXTURES: tuple[str, ...] = ("checkered", "ringed", "halved")


@dataclass(frozen=True)
class Concept:
    """One personal object: a novel shape, a world colour, a novel texture (+ second colour)."""

    shape: str
    color: str
    texture: str
    second: str  # colour of the 'halved' texture's other half (unused otherwise)
    radius: tuple[float, float] = (22.0, 34.0)

    @property
    def slug(self) -> str:
        return f"{self.color}-{self.texture}-{self.shape}"


def sample_concepts(n: int, seed: int = 0) -> list[Concept]:
    """``n`` distinct concepts, each with a novel shape and a novel texture."""
    rng = np.random.default_rng([11, seed])
    shapes, colors = list(NOVEL_SHAPES), list(COLORS)
    out: list[Concept] = []
    while len(out) < n:
        shape = shapes[len(out) % len(shapes)]
        color, second = (colors[i] for i in rng.choice(len(colors), 2, replace=False))
        c = Concept(shape, color, NOVEL_TEXTURES[int(rng.integers(3))], second)
        if c not in out:
            out.append(c)
    return out


def draw(
    image: np.ndarray,
    concept: Concept,
    center: tuple[float, float],
    radius: float,
    angle: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Paint ``concept`` onto ``image`` in place (anti-aliased); returns its H x W bool mask."""
    h, w = image.shape[:2]
    t = np.deg2rad(angle)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    alpha = np.zeros((h, w), np.uint8)
    for poly, value in NOVEL_SHAPES[concept.shape]:
        pts = poly @ rot.T * radius + np.asarray(center)
        fixed = np.round(pts * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(alpha, [fixed], 255 * value, cv2.LINE_AA, _SHIFT)
    base = np.asarray(COLORS[concept.color], np.float32)
    shade = base * 0.62
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - center[0], yy - center[1]
    tex = np.empty((h, w, 3), np.float32)
    tex[:] = base
    if concept.texture == "checkered":
        period = rng.uniform(9.0, 11.0)
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        on = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
        tex[on] = shade
    elif concept.texture == "ringed":
        period = rng.uniform(8.0, 10.0)
        on = np.mod(np.hypot(dx, dy), period) < 0.45 * period
        tex[on] = shade
    else:  # halved: the other colour on one side of a line through the centre
        on = dx * np.cos(t + np.pi / 2) + dy * np.sin(t + np.pi / 2) > 0
        tex[on] = np.asarray(COLORS[concept.second], np.float32)
    a = (alpha.astype(np.float32) / 255.0)[..., None]
    image[:] = np.clip(np.round(image * (1.0 - a) + tex * a), 0, 255).astype(np.uint8)
    return alpha >= 128


def _free_spot(
    occupied: np.ndarray, radius: float, rng: np.random.Generator, size: int
) -> tuple[float, float]:
    """A centre whose disc of ``radius`` overlaps occupied pixels least (of a few tries)."""
    best, best_overlap = (size / 2, size / 2), np.inf
    for _ in range(20):
        cx, cy = rng.uniform(radius + 2, size - radius - 2, size=2)
        y0, y1 = int(max(cy - radius, 0)), int(min(cy + radius, size))
        x0, x1 = int(max(cx - radius, 0)), int(min(cx + radius, size))
        overlap = float(occupied[y0:y1, x0:x1].mean()) if y1 > y0 and x1 > x0 else 1.0
        if overlap < best_overlap:
            best, best_overlap = (float(cx), float(cy)), overlap
        if overlap == 0:
            break
    return best


def lookalike(concept: Concept, rng: np.random.Generator) -> Concept:
    """A hard distractor: same shape in other colours, or same colour/texture, other shape."""
    colors = [c for c in COLORS if c != concept.color]
    if rng.random() < 0.5:
        return Concept(
            concept.shape,
            colors[int(rng.integers(len(colors)))],
            concept.texture,
            concept.second,
            concept.radius,
        )
    shapes = [s for s in NOVEL_SHAPES if s != concept.shape]
    return Concept(
        shapes[int(rng.integers(len(shapes)))],
        concept.color,
        concept.texture,
        concept.second,
        concept.radius,
    )


def concept_scene(
    concept: Concept, rng: np.random.Generator, *, present: bool = True, split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """A world scene (+ maybe a look-alike) with ``concept`` on top when ``present``.

    Returns (image H x W x 3 uint8, mask H x W bool; all False when absent).
    """
    scene = generate_scene(rng, split)
    image = scene.image.copy()
    occupied = np.asarray(scene.masks.any(0), dtype=bool)
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], bool)
    extras: list[Concept] = []
    if rng.random() < 0.6:
        extras.append(lookalike(concept, rng))
    if present:
        extras.append(concept)
    for item in extras:
        radius = float(rng.uniform(*item.radius))
        center = _free_spot(occupied, radius, rng, size)
        drawn = draw(image, item, center, radius, float(rng.uniform(0, 360)), rng)
        occupied |= drawn
        mask = drawn if item is concept and present else mask & ~drawn
    return image, mask


# ---- fitting examples from a user's shots (copy-paste augmentation) ------------------------
@dataclass
class Cutout:
    """One shot's object: its pixels and mask cropped to the mask's box."""

    rgb: np.ndarray  # h x w x 3 uint8
    mask: np.ndarray  # h x w bool


def cutout(image: np.ndarray, mask: np.ndarray) -> Cutout:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return Cutout(image[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy())


def _rotate(rgb: np.ndarray, mask: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a cut-out by ``angle`` degrees on a canvas large enough to hold it."""
    h, w = mask.shape
    side = int(np.ceil(np.hypot(h, w))) + 2
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    m[:, 2] += ((side - w) / 2, (side - h) / 2)
    rgb = cv2.warpAffine(rgb, m, (side, side), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(mask.astype(np.float32), m, (side, side), flags=cv2.INTER_LINEAR)
    keep = alpha >= 0.5
    ys, xs = np.nonzero(keep)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return rgb[y0:y1, x0:x1], keep[y0:y1, x0:x1]


def _resized(
    rgb: np.ndarray, mask: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A cut-out's pixels (bilinear) and mask (nearest) at ``size`` = (width, height)."""
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
    return rgb, cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0


def _transform(
    cut: Cutout, rng: np.random.Generator, max_side: int, hue: float = 0.0, main_only: bool = False
) -> Cutout:
    """Scaled (0.75-1.3), flipped, rotated by any angle, colour-jittered (hue shifted by
    ``hue`` degrees for a look-alike: every pixel, or with ``main_only`` only the pixels of the
    object's main colour, as a look-alike that shares a second colour or a pattern)."""
    scale = float(rng.uniform(0.75, 1.3))
    h, w = cut.mask.shape
    scale = min(scale, max_side / max(h, w))
    size = (max(4, int(round(w * scale))), max(4, int(round(h * scale))))
    rgb, mask = _resized(cut.rgb, cut.mask, size)
    if rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    rgb, mask = _rotate(np.ascontiguousarray(rgb), np.ascontiguousarray(mask), rng.uniform(0, 360))
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV).astype(np.float32)
    shift = np.full(mask.shape, hue / 2, np.float32)
    if main_only:
        main = np.median(hsv[..., 0][mask])
        gap = np.abs(np.mod(hsv[..., 0] - main + 90, 180) - 90)  # hue distance, OpenCV units
        shift[gap > 10] = 0.0
    hsv[..., 0] = np.mod(hsv[..., 0] + shift + rng.uniform(-JITTER_HUE, JITTER_HUE), 180)
    hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(1 - JITTER_VALUE, 1 + JITTER_VALUE), 0, 255)
    rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return Cutout(np.ascontiguousarray(rgb), np.ascontiguousarray(mask))


def _paste(image: np.ndarray, cut: Cutout, occupied: np.ndarray, rng: np.random.Generator):
    h, w = cut.mask.shape
    size = image.shape[0]
    cx, cy = _free_spot(occupied, max(h, w) / 2, rng, size)
    x0 = int(np.clip(round(cx - w / 2), 0, image.shape[1] - w))
    y0 = int(np.clip(round(cy - h / 2), 0, image.shape[0] - h))
    region = image[y0 : y0 + h, x0 : x0 + w]
    region[cut.mask] = cut.rgb[cut.mask]
    full = np.zeros(image.shape[:2], bool)
    full[y0 : y0 + h, x0 : x0 + w] = cut.mask
    return full


def _reskin(image: np.ndarray, silhouette: np.ndarray, cut: Cutout) -> None:
    """Paint ``cut``'s pixels (stretched to fit, its median colour where it has none) over
    another object's ``silhouette``, in place: same look, other form."""
    ys, xs = np.nonzero(silhouette)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    size = (int(x1 - x0), int(y1 - y0))
    rgb, inside = _resized(cut.rgb, cut.mask, size)
    fill = np.where(inside[..., None], rgb, np.median(cut.rgb[cut.mask], axis=0).astype(np.uint8))
    region, where = image[y0:y1, x0:x1], silhouette[y0:y1, x0:x1]
    region[where] = fill[where]


def _silhouette(rng: np.random.Generator, side: int) -> np.ndarray:
    """A random closed form about ``side`` pixels across: 3-9 vertices at random angles and
    radii around a centre, so convex, concave and ragged forms all turn up."""
    n = int(rng.integers(3, 10))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.35, 1.0, n) * side / 2
    pts = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1) + side / 2
    mask = np.zeros((side, side), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask > 0


def _stretched(cut: Cutout, rng: np.random.Generator) -> Cutout:
    """A near miss of ``cut``: its own pixels stretched along a random axis (aspect x 1.6-2.2,
    area kept), so colour and texture match while the outline does not."""
    rgb, mask = _rotate(cut.rgb, cut.mask, rng.uniform(0, 180))
    factor = float(rng.uniform(*NEAR_MISS_STRETCH)) ** 0.5
    h, w = mask.shape
    size = (max(4, int(round(w * factor))), max(4, int(round(h / factor))))
    rgb, mask = _resized(rgb, mask, size)
    return Cutout(np.ascontiguousarray(rgb), np.ascontiguousarray(mask))


def augment(
    cuts: list[Cutout], rng: np.random.Generator, *, present: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A training scene: a world scene with one shot's object pasted on top (``present``), and
    often a hard distractor: a hue-shifted copy of a shot (all of it or its main colour only),
    one of the scene's objects or a random form painted with a shot's pixels, or a shot
    stretched to another aspect (same look, other form). Returns (image, mask)."""
    scene = generate_scene(rng, "train")
    image = scene.image.copy()
    occupied = np.asarray(scene.masks.any(0), dtype=bool)
    mask = np.zeros(image.shape[:2], bool)
    max_side = int(0.45 * IMAGE_SIZE)
    if rng.random() < (0.4 if present else 0.6):
        cut = cuts[int(rng.integers(len(cuts)))]
        largest = int(scene.masks.reshape(len(scene.masks), -1).sum(1).argmax())
        kind = rng.random()
        if kind < 0.25 and scene.masks[largest].sum() > 50:
            _reskin(image, scene.masks[largest], cut)
        elif kind < NEAR_MISS_FROM:
            side = int(np.sqrt(cut.mask.sum()) * rng.uniform(1.1, 1.6))
            form = _silhouette(rng, max(side, 8))
            blank = Cutout(np.zeros((*form.shape, 3), np.uint8), form)
            where = _paste(image, blank, occupied, rng)
            _reskin(image, where, cut)
            occupied |= where
        elif kind < 0.5:
            fake = _transform(_stretched(cut, rng), rng, max_side)
            occupied |= _paste(image, fake, occupied, rng)
        else:
            fake = _transform(cut, rng, max_side, rng.uniform(60, 300), rng.random() < 0.5)
            occupied |= _paste(image, fake, occupied, rng)
    if present:
        cut = _transform(cuts[int(rng.integers(len(cuts)))], rng, max_side)
        mask = _paste(image, cut, occupied, rng)
    return image, mask
