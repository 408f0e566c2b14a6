"""Instructions, answers and training samples for the synthetic world.

``generate_sample(split, index)`` is a pure function of its arguments, so training data can be
made on the fly and every split is reproducible. The query makers live in
:mod:`segapp.data.queries`; this module is the public entry point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from segapp.data import knowledge as kb
from segapp.data.answers import SEG, in_order
from segapp.data.queries import KINDS, MAKERS, Query
from segapp.data.world import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    SPLIT_ID,
    SPLITS,
    TEXTURES,
    Scene,
    generate_scene,
)

__all__ = [
    "KINDS",
    "SEG",
    "Query",
    "Sample",
    "generate_sample",
    "iter_corpus",
    "make_queries",
    "make_query",
]


def make_query(
    scene: Scene, rng: np.random.Generator, kind: str, split: str = "train"
) -> Query | None:
    """One query of ``kind`` about ``scene``, or None when the scene does not allow one."""
    if kind not in MAKERS:
        raise ValueError(f"unknown query kind {kind!r}; expected one of {KINDS}")
    if split not in SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return MAKERS[kind](scene, rng, split)


def make_queries(
    scene: Scene,
    rng: np.random.Generator,
    n: int,
    split: str = "train",
    kinds: Sequence[str] | None = None,
) -> list[Query]:
    """Up to ``n`` distinct queries, each of a kind drawn uniformly from those possible."""
    pool = list(kinds if kinds is not None else KINDS)
    out: list[Query] = []
    seen: set[str] = set()
    for _ in range(3 * n):
        if len(out) >= n or not pool:
            break
        kind = pool[int(rng.integers(len(pool)))]
        q = make_query(scene, rng, kind, split)
        if q is None:
            pool.remove(kind)  # impossible here: keep the draw uniform over the possible kinds
        elif q.instruction not in seen:
            seen.add(q.instruction)
            out.append(q)
    return out


@dataclass
class Sample:
    """One training / evaluation example; ``target_masks[t]`` belongs to the t-th ``[SEG]``."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    instruction: str
    answer: str
    kind: str
    is_sentence: bool
    target_masks: np.ndarray  # T x H x W bool (T may be 0)
    ignore: np.ndarray | None  # H x W bool, pixels excluded from the loss / metric, or None
    scene: Scene | None


def generate_sample(split: str, index: int) -> Sample:
    """Deterministic sample ``index`` of ``split``; kinds cycle so each is well represented."""
    if split not in SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([SPLIT_ID[split], index])
    scene = generate_scene(rng, split)
    start = index % len(KINDS)
    for kind in KINDS[start:] + KINDS[:start]:  # fall back to the next kind if impossible
        q = make_query(scene, rng, kind, split)
        if q is not None:
            break
    else:  # pragma: no cover - 'none' is possible in every scene
        raise RuntimeError(f"no query possible for {split} sample {index}")
    masks = (
        scene.masks[list(q.targets)] if q.targets else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), bool)
    )
    return Sample(
        image=scene.image,
        instruction=q.instruction,
        answer=q.answer,
        kind=q.kind,
        is_sentence=q.is_sentence,
        target_masks=masks,
        ignore=None,
        scene=scene,
    )


def _vocabulary() -> Iterator[str]:
    """Every word and template of the world at least once, whatever the scenes drawn."""
    for c in COLORS:
        for s in SHAPES:
            yield f"the {c} {s}, all the {c} {kb.PLURALS[s]}, every {c} {s}"
    yield " ".join(SIZES + TEXTURES + kb.NUMBERS + kb.NOUNS)
    yield ", ".join(phrase for _, phrase in kb.LOCATIONS)
    for facts in list(kb.SHAPE_KNOWLEDGE.values()) + list(kb.COLOR_KNOWLEDGE.values()):
        for clause, reason in facts:
            yield f"the object that {clause}. {kb.sentence(reason)}."
    for template, _ in kb.PHRASE_WRAPPERS + kb.PLURAL_WRAPPERS:
        yield kb.sentence(template.format(np="the red circle"))
    for template in kb.IMPLICIT_TEMPLATES:
        yield template.format(np="the thing that could roll")
    for template in kb.IMPLICIT_QUESTIONS:
        yield template.format(clause="could roll")
    yield f"Sure, {SEG}. There is no blue star in the image. Sorry, I cannot find a red heart."


def iter_corpus(
    n_scenes: int,
    seed: int = 0,
    answer_order: str = "seg_first",
    multi_order: str = "count_first",
) -> Iterator[str]:
    """Instruction and answer strings for tokenizer training (all splits, all kinds)."""
    yield from _vocabulary()
    rng = np.random.default_rng([7, seed])
    for i in range(n_scenes):
        split = SPLITS[i % len(SPLITS)]
        scene = generate_scene(rng, split)
        for kind in KINDS:
            q = make_query(scene, rng, kind, split)
            if q is not None:
                yield q.instruction
                yield in_order(q.answer, answer_order, q.phrase, multi_order)
