"""Queries about a scene: an instruction, the answer with one ``[SEG]`` per target, the targets.

Every query is checked against the scene so that it has exactly the targets it claims (unique
descriptions, clear spatial relations and size winners). Targets are listed left to right by
the centroid x of their visible mask, the same order as the ``[SEG]`` tokens in the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from segapp.data import knowledge as kb
from segapp.data.answers import SEG
from segapp.data.world import COLORS, HELD_OUT, SHAPES, Obj, Scene, full_area

KINDS: tuple[str, ...] = (
    "referring",
    "spatial",
    "superlative",
    "counting",
    "implicit",
    "multi",
    "none",
)
# how a no-target answer begins (`none`); a model trained here is told them (ModelConfig)
NO_TARGET_OPENINGS = ("There is no", "Sorry, I cannot find")
HELD_OUT_PREFERENCE = 0.75  # val/test: chance to aim a query at a held-out-combo object first


@dataclass(frozen=True)
class Query:
    """One instruction about a scene; ``targets`` are object indices in ``[SEG]`` order."""

    kind: str
    instruction: str
    answer: str
    targets: tuple[int, ...]
    is_sentence: bool
    phrase: str = ""  # the noun phrase the instruction asks about (one-target kinds)


def centroids(scene: Scene) -> np.ndarray:
    """K x 2 ``(x, y)`` centroids of the visible masks."""
    out = np.zeros((len(scene.objects), 2))
    for k, m in enumerate(scene.masks):
        ys, xs = np.nonzero(m)
        out[k] = (xs.mean(), ys.mean()) if xs.size else scene.objects[k].center
    return out


def matching(objects: Sequence[Obj], ref: Obj, attrs: Sequence[str]) -> list[int]:
    """Indices of the objects that agree with ``ref`` on every attribute in ``attrs``."""
    return [
        i for i, o in enumerate(objects) if all(kb.attr(o, a) == kb.attr(ref, a) for a in attrs)
    ]


def minimal_attrs(
    objects: Sequence[Obj], k: int, rng: np.random.Generator, among: Sequence[str] = kb.ATTRIBUTES
) -> tuple[str, ...] | None:
    """A smallest attribute set (from ``among``) that singles out ``objects[k]``, else None."""
    for n in range(1, len(among) + 1):
        found = [c for c in combinations(among, n) if matching(objects, objects[k], c) == [k]]
        if found:
            return found[int(rng.integers(len(found)))]
    return None


def _order(scene: Scene, rng: np.random.Generator, split: str) -> list[int]:
    """Candidate targets in trial order; val/test often try held-out-combo objects first."""
    idx = [int(i) for i in rng.permutation(len(scene.objects))]
    if split != "train" and rng.random() < HELD_OUT_PREFERENCE:
        held = [i for i in idx if (scene.objects[i].color, scene.objects[i].shape) in HELD_OUT]
        idx = held + [i for i in idx if i not in held]
    return idx


def _wrap(rng: np.random.Generator, np_: str, plural: bool = False) -> tuple[str, bool]:
    wrappers = kb.PLURAL_WRAPPERS if plural else kb.PHRASE_WRAPPERS
    template, is_sentence = wrappers[int(rng.integers(len(wrappers)))]
    return kb.sentence(template.format(np=np_)) if is_sentence else template.format(np=np_), (
        is_sentence
    )


def _answer(
    rng: np.random.Generator, obj: Obj, center: np.ndarray, reason: str = "", after: bool = False
) -> str:
    """The answer to a one-target query: `[SEG]` first, the description after it.

    The `[SEG]` hidden state points SAM at the target, so it must not depend on words the model
    itself wrote about the target: trained with the description first, the pointer learned to
    read the description (hit rate 0.83 on gold descriptions) and followed the model's own
    wrong ones at inference (referring gIoU 0.33). A reason drawn from the instruction alone
    ("circles can roll") may come first: it is a step of thought, not a reading of the image;
    one that reads the image ("only one object is red") comes after (`after`).
    """
    name = kb.full_name(obj)
    if reason and after:
        return f"It is {SEG}, the {name}: {reason}."
    if reason:
        return f"{kb.sentence(reason)}, so it is {SEG}, the {name}."
    r = rng.random()
    if r < 0.1:
        return f"Sure, {SEG}."
    if r < 0.25:
        return f"Sure, it is {SEG}, the {name}."
    return f"It is {SEG}, the {name} {kb.location((center[0], center[1]))}."


def _single(
    kind: str, rng: np.random.Generator, scene: Scene, k: int, np_: str, reason: str = ""
) -> Query:
    instruction, is_sentence = _wrap(rng, np_)
    answer = _answer(rng, scene.objects[k], centroids(scene)[k], reason, after=True)
    return Query(kind, instruction, answer, (k,), is_sentence, np_)


def referring(scene: Scene, rng: np.random.Generator, split: str) -> Query | None:
    objs = scene.objects
    for k in _order(scene, rng, split):
        attrs = minimal_attrs(objs, k, rng)
        if attrs is None:
            continue
        if rng.random() < 0.2:  # sometimes one more word than needed, as people do
            attrs = tuple(dict.fromkeys(attrs + (kb.pick(rng, ("color", "shape")),)))
        np_ = "the " + kb.describe(objs[k], attrs, kb.pick(rng, kb.NOUNS))
        return _single("referring", rng, scene, k, np_)
    return None


# spatial relation of a target to an anchor: (phrases, unit direction (dx, dy) on screen)
_RELATIONS: dict[str, tuple[tuple[str, ...], tuple[int, int]]] = {
    "left": (("left of", "to the left of"), (-1, 0)),
    "right": (("right of", "to the right of"), (1, 0)),
    "above": (("above",), (0, -1)),
    "below": (("below", "under"), (0, 1)),
}
_EXTREMES: dict[str, tuple[str, ...]] = {
    "left": ("the leftmost {noun}", "the {noun} on the far left"),
    "right": ("the rightmost {noun}", "the {noun} on the far right"),
    "above": ("the topmost {noun}", "the {noun} at the top"),
    "below": ("the lowest {noun}", "the {noun} at the bottom"),
}


def _related(cen: np.ndarray, anchor: int, direction: tuple[int, int], strong: bool) -> list[int]:
    """Objects lying in ``direction`` of ``anchor`` (strong: clearly; weak: arguably)."""
    d = cen - cen[anchor]
    along = d @ np.asarray(direction, float)
    across = np.abs(d @ np.asarray(direction[::-1], float))
    if strong:
        ok = (along >= 22.0) & (across <= 0.8 * along)
    else:
        ok = (along >= 8.0) & (across <= 1.3 * along)
    return [i for i in np.nonzero(ok)[0].tolist() if i != anchor]


def spatial(scene: Scene, rng: np.random.Generator, split: str) -> Query | None:
    objs, cen = scene.objects, centroids(scene)
    for k in _order(scene, rng, split):
        options: list[str] = []
        noun = kb.pick(rng, kb.NOUNS)
        for rel, (phrases, direction) in _RELATIONS.items():
            coord = cen @ np.asarray(direction, float)  # larger = further in direction
            others = np.delete(coord, k)
            if coord[k] - others.max() >= 25.0:
                options += [p.format(noun=noun) for p in _EXTREMES[rel]]
            for a in range(len(objs)):
                if a == k or _related(cen, a, direction, True) != [k]:
                    continue
                if _related(cen, a, direction, False) != [k]:
                    continue
                a_attrs = minimal_attrs(objs, a, rng)
                if a_attrs is None:
                    continue
                anchor = kb.describe(objs[a], tuple(set(a_attrs) | {"shape"}))
                options.append(f"the {noun} {kb.pick(rng, phrases)} the {anchor}")
        if options:
            return _single("spatial", rng, scene, k, kb.pick(rng, options))
    return None


SUPERLATIVE_GROUPS: tuple[tuple[str, ...], ...] = ((), ("color",), ("shape",), ("texture",))
LARGEST, SMALLEST = 1, 2


def linear_sizes(objects: Sequence[Obj]) -> np.ndarray:
    """Each object's linear size: the square root of its whole shape's area (occluded part
    included), what superlative instructions compare."""
    return np.sqrt([full_area(o) for o in objects])


def extreme(side: np.ndarray, group: Sequence[int], k: int) -> int:
    """LARGEST or SMALLEST if object k is so within `group` (its indices; side: every object's
    linear size) by the 1.25x margin superlative instructions need, else 0."""
    rest = np.array([side[i] for i in group if i != k])
    if not len(rest):
        return 0
    if side[k] >= 1.25 * rest.max():
        return LARGEST
    if side[k] * 1.25 <= rest.min():
        return SMALLEST
    return 0


def superlative(scene: Scene, rng: np.random.Generator, split: str) -> Query | None:
    objs = scene.objects
    side = linear_sizes(objs)
    for k in _order(scene, rng, split):
        options: list[str] = []
        for attrs in SUPERLATIVE_GROUPS:
            group = matching(objs, objs[k], attrs)
            if len(group) < 2:
                continue
            noun = kb.describe(objs[k], attrs, kb.pick(rng, kb.NOUNS))
            rank = extreme(side, group, k)
            if rank == LARGEST:
                options.append(f"the {kb.pick(rng, ('largest', 'biggest'))} {noun}")
            elif rank == SMALLEST:
                options.append(f"the smallest {noun}")
        if options:
            return _single("superlative", rng, scene, k, kb.pick(rng, options))
    return None


_COUNTING: dict[str, tuple[tuple[str, ...], str]] = {
    "color": (
        (
            "the object whose colour appears only once",
            "the shape with a colour that no other shape has",
        ),
        "only one object is {value}",
    ),
    "shape": (
        ("the shape that occurs only once in the image", "the only shape of its kind"),
        "only one object is {article} {value}",
    ),
    "texture": (
        ("the object whose texture appears only once", "the only object with its own texture"),
        "only one object is {value}",
    ),
}


def counting(scene: Scene, rng: np.random.Generator, split: str) -> Query | None:
    objs = scene.objects
    options: list[tuple[int, str, str]] = []
    for a, (phrases, reason) in _COUNTING.items():
        unique = [i for i in range(len(objs)) if len(matching(objs, objs[i], (a,))) == 1]
        if len(unique) == 1:
            value = kb.attr(objs[unique[0]], a)
            why = reason.format(value=value, article=kb.article(value))
            options.append((unique[0], kb.pick(rng, phrases), why))
    if not options:
        return None
    order = _order(scene, rng, split)
    options.sort(key=lambda o: order.index(o[0]))
    k, np_, why = options[0] if rng.random() < 0.75 else options[int(rng.integers(len(options)))]
    return _single("counting", rng, scene, k, np_, why if rng.random() < 0.7 else "")


def implicit(scene: Scene, rng: np.random.Generator, split: str) -> Query | None:
    objs = scene.objects
    for k in _order(scene, rng, split):
        o = objs[k]
        options: list[tuple[tuple[str, ...], tuple[str, ...]]] = []  # (clued attrs, extra attrs)
        clue_sets: tuple[tuple[str, ...], ...] = (("shape",), ("color",), ("color", "shape"))
        for clue_set in clue_sets:
            if matching(objs, o, clue_set) == [k]:
                options.append((clue_set, ()))
        if not options:  # same colour and shape twice: add size / texture words
            extra = minimal_attrs(objs, k, rng, ("color", "shape", "size", "texture"))
            if extra is None:
                continue
            options.append(
                (("color", "shape"), tuple(a for a in extra if a in ("size", "texture")))
            )
        clued, extra = options[int(rng.integers(len(options)))]
        facts = []
        if "shape" in clued:
            facts.append(
                kb.SHAPE_KNOWLEDGE[o.shape][int(rng.integers(len(kb.SHAPE_KNOWLEDGE[o.shape])))]
            )
        if "color" in clued:
            facts.append(kb.COLOR_KNOWLEDGE[o.color][0])
        if rng.random() < 0.5:
            facts.reverse()
        clause = " and ".join(f[0] for f in facts)
        mods = "".join(kb.attr(o, a) + " " for a in ("size", "texture") if a in extra)
        if not mods and rng.random() < 0.3:
            instruction = kb.pick(rng, kb.IMPLICIT_QUESTIONS).format(clause=clause)
            np_ = f"the object that {clause}"
        else:
            np_ = f"the {mods}{kb.pick(rng, ('object', 'thing'))} that {clause}"
            instruction = kb.pick(rng, kb.IMPLICIT_TEMPLATES).format(np=np_)
        reason = " and ".join(f[1] for f in facts) if rng.random() < 0.6 else ""
        answer = _answer(rng, o, centroids(scene)[k], reason)
        return Query("implicit", instruction, answer, (k,), True, np_)
    return None


_GROUPS: tuple[tuple[str, ...], ...] = (("color",), ("shape",), ("size",), ("texture",))


def _group_phrase(obj: Obj, attrs: tuple[str, ...], rng: np.random.Generator) -> tuple[str, str]:
    """(instruction noun phrase, plural for the answer) for all objects sharing ``attrs``."""
    mods = " ".join(kb.attr(obj, a) for a in attrs if a != "shape")
    if "shape" in attrs:
        plural = (mods + " " if mods else "") + kb.PLURALS[obj.shape]
        single = (mods + " " if mods else "") + obj.shape
    else:
        noun = kb.pick(rng, kb.NOUNS)
        plural, single = f"{mods} {noun}s", f"{mods} {noun}"
    np_ = f"every {single}" if rng.random() < 0.3 else f"all the {plural}"
    return np_, plural


def multi(scene: Scene, rng: np.random.Generator, split: str) -> Query | None:
    objs, cen = scene.objects, centroids(scene)
    for k in _order(scene, rng, split):
        options = []
        for attrs in _GROUPS + (("color", "shape"),):
            group = matching(objs, objs[k], attrs)
            if 2 <= len(group) <= 4:
                options.append((attrs, group))
        if not options:
            continue
        attrs, group = options[int(rng.integers(len(options)))]
        targets = tuple(sorted(group, key=lambda i: cen[i][0]))
        np_, plural = _group_phrase(objs[k], attrs, rng)
        instruction, is_sentence = _wrap(rng, np_, plural=True)
        group_objs = [objs[i] for i in targets]
        among = [a for a in kb.ATTRIBUTES if a not in attrs]
        items = []
        for j, i in enumerate(targets):
            distinct = minimal_attrs(group_objs, j, rng, among)
            if distinct is None:
                items.append(f"the one {kb.location((cen[i][0], cen[i][1]))} {SEG}")
            else:
                items.append(f"the {kb.describe(objs[i], distinct, 'one')} {SEG}")
        if rng.random() < 0.15:
            answer = f"Sure, {kb.join_and([SEG] * len(targets))}."
        else:
            count = kb.count_word(len(targets))
            answer = f"There are {count} {plural}: {kb.join_and(items)}."
        return Query("multi", instruction, answer, targets, is_sentence)
    return None


def none(scene: Scene, rng: np.random.Generator, split: str) -> Query | None:
    objs = scene.objects
    present = {(o.color, o.shape) for o in objs}
    colors, shapes = list(COLORS), list(SHAPES)
    # plausible: vary one attribute of an object in the scene; held-out combos only in val/test
    # (train must never say that a held-out combination is absent)
    absent = [(c, s) for c in colors for s in shapes if (c, s) not in present]
    if split == "train":
        absent = [cs for cs in absent if cs not in HELD_OUT]
    elif rng.random() < HELD_OUT_PREFERENCE and any(cs in HELD_OUT for cs in absent):
        absent = [cs for cs in absent if cs in HELD_OUT]
    near = [cs for cs in absent if any(cs[0] == o.color or cs[1] == o.shape for o in objs)]
    pool = near if near and rng.random() < 0.8 else absent
    if not pool:
        return None
    color, shape = pool[int(rng.integers(len(pool)))]
    shape_present = any(o.shape == shape for o in objs)
    if not shape_present and rng.random() < 0.3:  # a knowledge clue that nothing fits
        clause = kb.SHAPE_KNOWLEDGE[shape][int(rng.integers(len(kb.SHAPE_KNOWLEDGE[shape])))][0]
        np_ = f"the {kb.pick(rng, ('object', 'thing'))} that {clause}"
        instruction, is_sentence = kb.pick(rng, kb.IMPLICIT_TEMPLATES).format(np=np_), True
        desc = shape
    else:
        desc = f"{color} {shape}"
        instruction, is_sentence = _wrap(rng, f"the {desc}")
    if rng.random() < 0.7:
        answer = f"{NO_TARGET_OPENINGS[0]} {desc} in the image."
    else:
        answer = f"{NO_TARGET_OPENINGS[1]} {kb.article(desc)} {desc} in this image."
    return Query("none", instruction, answer, (), is_sentence)


MAKERS: dict[str, Callable[[Scene, np.random.Generator, str], Query | None]] = {
    "referring": referring,
    "spatial": spatial,
    "superlative": superlative,
    "counting": counting,
    "implicit": implicit,
    "multi": multi,
    "none": none,
}
