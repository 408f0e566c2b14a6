"""The synthetic video world: short clips of moving shapes whose target needs the video.

Each clip is a pure function of (split, index). Objects come from the image world
(`segapp.data.world`) and follow a trajectory over T frames: translation, growth, a colour
change, appearing, or disappearing behind an opaque square drawn on top. The instruction
names the target only by what happens over time ("the shape that moves fastest"), so one frame
is not enough to answer it. Ground truth: the target's VISIBLE mask in every frame (empty
while it is hidden or not yet there). Conventions as in `segapp.data.world`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from segapp.data.world import (
    COLORS,
    HELD_OUT,
    IMAGE_SIZE,
    SHAPES,
    SIZE_RADII,
    SPLIT_ID,
    TEXTURES,
    Obj,
    extent,
    full_mask,
    render,
)

VIDEO_KINDS = ("fastest", "colour_change", "disappears", "appears", "grows")
FRAMES = 16
# per kind: (instruction, its noun phrase, which a `restate` answer repeats before [SEG])
_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "fastest": (
        ("the shape that moves fastest", "the shape that moves fastest"),
        ("segment the object moving the fastest", "the object moving the fastest"),
        ("which shape is the quickest?", "the quickest shape"),
    ),
    "colour_change": (
        ("the object that changes colour", "the object that changes colour"),
        ("segment the shape whose colour changes", "the shape whose colour changes"),
        ("which object switches colour?", "the object that switches colour"),
    ),
    "disappears": (
        ("the one that disappears behind the square", "the one that disappears behind the square"),
        (
            "segment the shape that hides behind the square",
            "the shape that hides behind the square",
        ),
        ("which object goes behind the square?", "the object that goes behind the square"),
    ),
    "appears": (
        ("the shape that appears later", "the shape that appears later"),
        (
            "segment the object that shows up during the video",
            "the object that shows up during the video",
        ),
        ("which shape appears?", "the shape that appears"),
    ),
    "grows": (
        ("the shape that grows", "the shape that grows"),
        ("segment the object that gets bigger", "the object that gets bigger"),
        ("which shape is growing?", "the shape that is growing"),
    ),
}


@dataclass
class Track:
    """One object's path: attributes at frame 0, then per-frame centre, radius, colour, shown."""

    obj: Obj
    centers: np.ndarray  # T x 2
    radii: np.ndarray  # T
    colors: list[str]  # T
    shown: np.ndarray  # T bool

    def at(self, t: int) -> Obj:
        cx, cy = self.centers[t]
        return replace(
            self.obj,
            center=(float(cx), float(cy)),
            radius=float(self.radii[t]),
            color=self.colors[t],
        )


@dataclass
class VideoClip:
    """A clip with one target: frames T x H x W x 3 uint8, target masks T x H x W bool."""

    frames: np.ndarray
    masks: np.ndarray
    instruction: str
    answer: str
    kind: str
    phrase: str = ""  # the instruction's noun phrase ("the shape that grows")


def _attrs(rng: np.random.Generator, split: str, used: set[str]) -> tuple[str, str, str, str]:
    while True:
        color = list(COLORS)[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if (split == "train" and (color, shape) in HELD_OUT) or color in used:
            continue
        size = ("small", "medium")[rng.integers(2)]
        return color, shape, size, TEXTURES[rng.integers(len(TEXTURES))]


def _track(
    rng: np.random.Generator, attrs: tuple[str, str, str, str], speed: float, frames: int
) -> Track:
    color, shape, size, texture = attrs
    radius = float(rng.uniform(*SIZE_RADII[size]))
    obj = Obj(shape, color, size, texture, (0.0, 0.0), radius, 0.0)
    margin = extent(obj) * 1.7 + 2.0
    start = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    step = np.array([np.cos(angle), np.sin(angle)]) * speed
    end = np.clip(start + step * (frames - 1), margin, IMAGE_SIZE - margin)
    t = np.linspace(0.0, 1.0, frames)[:, None]
    centers = start + (end - start) * t
    return Track(obj, centers, np.full(frames, radius), [color] * frames, np.ones(frames, bool))


def generate_clip(split: str, index: int, *, frames: int = FRAMES) -> VideoClip:
    """Clip `index` of `split` (deterministic): 2-4 objects, one of them the target."""
    if split not in SPLIT_ID:
        raise ValueError(f"unknown split {split!r}")
    rng = np.random.default_rng([7, SPLIT_ID[split], index])
    kind = VIDEO_KINDS[int(rng.integers(len(VIDEO_KINDS)))]
    used: set[str] = set()
    tracks: list[Track] = []
    n = int(rng.integers(2, 5))
    for k in range(n):
        attrs = _attrs(rng, split, used)
        used.add(attrs[0])
        fast = kind == "fastest" and k == 0
        speed = rng.uniform(4.0, 6.0) if fast else rng.uniform(0.0, 1.2)
        tracks.append(_track(rng, attrs, float(speed), frames))
    target = tracks[0]
    occluder: Obj | None = None
    if kind == "colour_change":
        new = [c for c in COLORS if c not in used][int(rng.integers(len(COLORS) - len(used)))]
        flip = frames // 2
        target.colors = [target.obj.color] * flip + [new] * (frames - flip)
    elif kind == "grows":
        target.radii = target.obj.radius * np.linspace(1.0, 1.6, frames)
    elif kind == "appears":
        target.shown[: frames // 3] = False
    elif kind == "disappears":
        side = 52.0
        centre = rng.uniform(side + 4, IMAGE_SIZE - side - 4, size=2)
        occ_color = [c for c in COLORS if c not in used][0]
        occluder = Obj("square", occ_color, "large", "solid", tuple(centre), side / 0.82, 0.0)
        angle = rng.uniform(0, 2 * np.pi)
        start = np.clip(centre + 95.0 * np.array([np.cos(angle), np.sin(angle)]), 30, 226)
        t = np.minimum(np.linspace(0.0, 1.0, frames) * 1.5, 1.0)[:, None]
        target.centers = start + (centre - start) * t
        target.radii = np.full(frames, min(target.obj.radius, 20.0))
        used.add(occ_color)
    seed = int(rng.integers(2**31))
    images, masks = [], []
    for t_ in range(frames):
        objs = [tr.at(t_) for tr in tracks if tr.shown[t_]]
        order = objs + ([occluder] if occluder is not None else [])
        images.append(render(order, np.random.default_rng(seed)))
        if target.shown[t_]:
            visible = full_mask(target.at(t_))
            for other in order[1:]:
                visible &= ~full_mask(other)
        else:
            visible = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
        masks.append(visible)
    # the target is painted first (under everything): draw order hides nothing else
    t0 = target.obj
    colour = t0.color if kind != "colour_change" else f"{t0.color}-to-{target.colors[-1]}"
    answer = f"It is [SEG], the {colour.replace('-', ' ')} {t0.shape}."  # [SEG] first: see queries
    text, phrase = _TEMPLATES[kind][int(rng.integers(len(_TEMPLATES[kind])))]
    return VideoClip(np.stack(images), np.stack(masks), text, answer, kind, phrase)
