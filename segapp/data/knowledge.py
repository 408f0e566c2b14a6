"""Vocabulary of the synthetic world: names, plurals, locations and world knowledge.

Kept small and regular on purpose: a BPE tokenizer is trained on the generated corpus.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segapp.data.world import IMAGE_SIZE, Obj

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "hexagon": "hexagons",
    "heart": "hearts",
    "cross": "crosses",
    "diamond": "diamonds",
    "octagon": "octagons",
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
NOUNS = ("shape", "object")  # generic nouns when the shape is not named
ATTRIBUTES = ("size", "texture", "color", "shape")  # order of words in a description

# 3 x 3 location grid, row-major from the top-left; phrases read "it is the X <phrase>"
LOCATIONS = (
    ("top left", "at the top left"),
    ("top", "at the top"),
    ("top right", "at the top right"),
    ("left", "on the left"),
    ("center", "in the center"),
    ("right", "on the right"),
    ("bottom left", "at the bottom left"),
    ("bottom", "at the bottom"),
    ("bottom right", "at the bottom right"),
)

# world knowledge: (clause completing "the object that ...", reason given in the answer)
SHAPE_KNOWLEDGE: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (
        ("could roll", "a round thing can roll"),
        ("is shaped like a coin", "a coin is round"),
        ("is shaped like a wheel", "a wheel is round"),
    ),
    "square": (
        ("looks like a chessboard cell", "a chessboard cell is a square"),
        ("looks like a dice face", "a dice face is a square"),
    ),
    "triangle": (
        ("has three corners", "a triangle has three corners"),
        ("looks like a slice of pizza", "a slice of pizza is a triangle"),
        ("is shaped like a yield sign", "a yield sign is a triangle"),
    ),
    "star": (
        ("twinkles in the night sky", "stars twinkle in the night sky"),
        ("looks like a sheriff's badge", "a sheriff's badge is a star"),
    ),
    "hexagon": (
        ("looks like a honeycomb cell", "a honeycomb cell is a hexagon"),
        ("has six sides", "a hexagon has six sides"),
    ),
    "heart": (
        ("is a symbol of love", "the heart is a symbol of love"),
        ("is shaped like a symbol of love", "the heart is a symbol of love"),
    ),
    "cross": (
        ("looks like a plus sign", "a plus sign is a cross"),
        ("looks like a first-aid symbol", "the first-aid symbol is a cross"),
    ),
    "diamond": (
        ("is shaped like a kite", "a kite is a diamond"),
        ("is shaped like a rhombus", "a rhombus is a diamond"),
    ),
    "octagon": (
        ("is what a stop sign is shaped like", "a stop sign is an octagon"),
        ("is shaped like a stop sign", "a stop sign is an octagon"),
        ("has eight sides", "an octagon has eight sides"),
    ),
}
COLOR_KNOWLEDGE: dict[str, tuple[tuple[str, str], ...]] = {
    "green": (("is the colour of grass", "grass is green"),),
    "blue": (("is the colour of the sky", "the sky is blue"),),
    "yellow": (("is the colour of a banana", "a banana is yellow"),),
    "red": (("is the colour of a fire truck", "a fire truck is red"),),
    "orange": (("is the colour of an orange", "an orange is orange"),),
    "purple": (("is the colour of lavender", "lavender is purple"),),
    "pink": (("is the colour of a flamingo", "a flamingo is pink"),),
    "cyan": (("is the colour of a turquoise sea", "a turquoise sea is cyan"),),
}

# wrappers around a noun phrase; (template, is_sentence)
PHRASE_WRAPPERS: tuple[tuple[str, bool], ...] = (
    ("{np}", False),
    ("segment {np}", True),
    ("please segment {np}.", True),
    ("Can you segment {np} in this image?", True),
    ("Where is {np}? Please output the segmentation mask.", True),
    ("What is {np} in this image? Please respond with the segmentation mask.", True),
)
PLURAL_WRAPPERS: tuple[tuple[str, bool], ...] = (
    ("{np}", False),
    ("segment {np}", True),
    ("please segment {np}.", True),
    ("Can you segment {np} in this image?", True),
)
IMPLICIT_TEMPLATES: tuple[str, ...] = (
    "Please segment {np}.",
    "Can you segment {np}?",
    "Segment {np} in this image.",
    "Find {np} and segment it.",
    "Which part of the image shows {np}? Please output the segmentation mask.",
)
IMPLICIT_QUESTIONS: tuple[str, ...] = (
    "What in this image {clause}? Please segment it.",
    "Which object {clause}? Please output the segmentation mask.",
)


def pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def attr(obj: Obj, name: str) -> str:
    return str(getattr(obj, name))


def describe(obj: Obj, attrs: Sequence[str], noun: str = "shape") -> str:
    """Words for ``obj`` restricted to ``attrs`` (e.g. 'small striped green triangle').

    ``noun`` is used when the shape is not among ``attrs``; the solid texture is left implicit
    unless it is the distinguishing attribute.
    """
    words = []
    for a in ATTRIBUTES[:3]:
        if a in attrs:
            words.append(attr(obj, a))
    words.append(obj.shape if "shape" in attrs else noun)
    return " ".join(words)


def full_name(obj: Obj) -> str:
    """The complete name used in answers: size, texture (unless solid), colour, shape."""
    attrs = ["size", "color", "shape"] + ([] if obj.texture == "solid" else ["texture"])
    return describe(obj, attrs)


def location(center: tuple[float, float], size: int = IMAGE_SIZE) -> str:
    """Grid phrase for a point: 'at the top left', 'in the center', ..."""
    col = min(int(center[0] * 3 / size), 2)
    row = min(int(center[1] * 3 / size), 2)
    return LOCATIONS[3 * row + col][1]


def count_word(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def join_and(parts: Sequence[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def sentence(text: str) -> str:
    return text[:1].upper() + text[1:]
