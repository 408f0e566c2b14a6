"""The synthetic world and its queries: determinism, held-out splits, query correctness."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from segapp.data.instructions import KINDS, generate_sample, iter_corpus, make_queries, make_query
from segapp.data.knowledge import PLURALS
from segapp.data.world import (
    COLORS,
    HELD_OUT,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    TEXTURES,
    Obj,
    full_mask,
    generate_scene,
)


def _scene(split: str, i: int):
    return generate_scene(np.random.default_rng([SPLITS_ID[split], 10_000 + i]), split)


SPLITS_ID = {"train": 0, "val": 1, "test": 2}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_generate_sample_is_deterministic(split: str) -> None:
    a, b = generate_sample(split, 5), generate_sample(split, 5)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.instruction, a.answer, a.kind) == (b.instruction, b.answer, b.kind)
    assert np.array_equal(a.target_masks, b.target_masks)
    c = generate_sample(split, 6)
    assert a.image.tobytes() != c.image.tobytes()


def test_splits_use_disjoint_seeds() -> None:
    images = {generate_sample(s, 0).image.tobytes() for s in ("train", "val", "test")}
    assert len(images) == 3


def test_train_never_contains_held_out_combos() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = generate_scene(rng, "train")
        assert not {(o.color, o.shape) for o in scene.objects} & HELD_OUT


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_scenes_contain_a_held_out_combo(split: str) -> None:
    for i in range(40):
        scene = _scene(split, i)
        assert {(o.color, o.shape) for o in scene.objects} & HELD_OUT


def test_eval_queries_mostly_target_held_out_objects() -> None:
    hits = total = 0
    for i in range(60):
        s = generate_sample("test", i)
        if not s.target_masks.shape[0] or s.scene is None:
            continue
        total += 1
        held = [k for k, o in enumerate(s.scene.objects) if (o.color, o.shape) in HELD_OUT]
        hits += any(np.array_equal(m, s.scene.masks[k]) for m in s.target_masks for k in held)
    assert hits >= 0.5 * total


def test_scene_images_and_visible_masks() -> None:
    for i in range(30):
        scene = _scene("train", i)
        k = len(scene.objects)
        assert 2 <= k <= 6
        assert scene.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and scene.image.dtype == np.uint8
        assert scene.masks.shape == (k, IMAGE_SIZE, IMAGE_SIZE) and scene.masks.dtype == bool
        for obj, vis in zip(scene.objects, scene.masks, strict=True):
            assert obj.color in COLORS and obj.shape in SHAPES
            assert obj.size in SIZES and obj.texture in TEXTURES
            full = full_mask(obj)
            assert vis.sum() >= 0.55 * full.sum()
            assert not (vis & ~full).any()  # visible part lies inside the shape
            # no holes: every background component touches the image border
            _, hierarchy = cv2.findContours(
                vis.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
            )
            assert (hierarchy[0][:, 3] < 0).all()
        assert not (scene.masks.sum(axis=0) > 1).any()  # visible masks are disjoint


def test_objects_are_painted_in_their_colour() -> None:
    scene = _scene("train", 3)
    for obj, vis in zip(scene.objects, scene.masks, strict=True):
        eroded = cv2.erode(vis.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        pixels = scene.image[eroded].astype(float)
        dist = {c: np.linalg.norm(pixels - np.array(rgb), axis=1) for c, rgb in COLORS.items()}
        nearest = np.array(list(dist))[np.argmin(np.stack(list(dist.values())), axis=0)]
        assert (nearest == obj.color).mean() > 0.5


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_kind_has_the_right_number_of_seg_tokens(split: str) -> None:
    seen: set[str] = set()
    for i in range(3 * len(KINDS)):
        s = generate_sample(split, i)
        seen.add(s.kind)
        t = s.target_masks.shape[0]
        assert s.answer.count("[SEG]") == t
        assert s.target_masks.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)
        assert all(m.any() for m in s.target_masks)
        if s.kind == "none":
            assert t == 0
        elif s.kind == "multi":
            assert 2 <= t <= 4
        else:
            assert t == 1
        if t > 1:  # [SEG] order is left to right
            xs = [np.nonzero(m)[1].mean() for m in s.target_masks]
            assert xs == sorted(xs)
    assert seen == set(KINDS)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _fits(obj: Obj, words: set[str]) -> bool:
    """True if ``obj`` agrees with every attribute word (colour, shape, ...) in ``words``."""
    vocab = (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("texture", TEXTURES))
    return all(getattr(obj, a) in words or not (set(vals) & words) for a, vals in vocab)


@pytest.mark.parametrize("kind", KINDS)
def test_make_query_targets_match_the_instruction(kind: str) -> None:
    rng = np.random.default_rng(1)
    made = 0
    for i in range(40):
        scene = _scene("val", i)
        q = make_query(scene, rng, kind, "val")
        if q is None:
            continue
        made += 1
        assert q.kind == kind and q.answer.count("[SEG]") == len(q.targets)
        assert len(set(q.targets)) == len(q.targets)
        words = _words(q.instruction)
        if kind == "referring":
            # re-check uniqueness: exactly the target carries every attribute word used
            fits = [k for k, o in enumerate(scene.objects) if _fits(o, words)]
            assert fits == list(q.targets)
        if kind == "none":
            # the answer names what is absent (implicit clues name no shape in the instruction)
            said = _words(q.answer)
            colors, shapes = said & set(COLORS), said & set(SHAPES)
            assert shapes
            assert not any(
                (not colors or o.color in colors) and (not shapes or o.shape in shapes)
                for o in scene.objects
            )
        if kind == "multi":
            plural = {v for v in PLURALS.values() if v in words}
            for k in q.targets:
                o = scene.objects[k]
                assert not plural or PLURALS[o.shape] in plural
    assert made >= 10


def test_make_queries_returns_distinct_varied_queries() -> None:
    scene = _scene("train", 7)
    qs = make_queries(scene, np.random.default_rng(0), 8)
    assert 1 <= len(qs) <= 8
    assert len({q.instruction for q in qs}) == len(qs)
    only = make_queries(scene, np.random.default_rng(0), 3, kinds=["none"])
    assert {q.kind for q in only} == {"none"}


def test_train_queries_never_mention_held_out_combos() -> None:
    for i in range(70):
        s = generate_sample("train", i)
        text = f"{s.instruction} {s.answer}"
        for color, shape in HELD_OUT:
            assert f"{color} {shape}" not in text


def test_corpus_covers_the_vocabulary() -> None:
    text = " ".join(iter_corpus(5))
    for word in list(COLORS) + list(SHAPES) + list(SIZES) + list(TEXTURES) + ["[SEG]"]:
        assert word in text


@pytest.mark.parametrize("split", ["train", "test"])
def test_one_target_answers_put_seg_before_any_word_read_off_the_image(split: str) -> None:
    """The [SEG] hidden state must not follow words the model wrote about its target: before
    [SEG] only a lead-in ("It is", "Sure, it is") or a reason taken from the instruction."""
    seen = 0
    for i in range(60):
        s = generate_sample(split, i)
        if s.kind in ("none", "multi"):
            continue
        seen += 1
        before = s.answer.split("[SEG]")[0]
        assert before in ("It is ", "Sure, ", "Sure, it is ") or before.endswith(", so it is ")
        assert "the " not in before.split(", so it is ")[-1]
        if s.kind != "implicit":  # implicit reasons name what the clue means ("is yellow")
            assert before in ("It is ", "Sure, ", "Sure, it is "), s.answer
    assert seen >= 30


def test_describe_first_moves_the_description_before_seg_and_keeps_the_rest() -> None:
    from segapp.data.answers import describe_first

    assert describe_first("It is [SEG], the small red circle at the top.") == (
        "It is the small red circle at the top [SEG]."
    )
    assert describe_first("It is [SEG], the medium blue star: only one object is blue.") == (
        "Only one object is blue, so it is the medium blue star [SEG]."
    )
    assert describe_first("A coin is round, so it is [SEG], the large red circle.") == (
        "A coin is round, so it is the large red circle [SEG]."
    )
    for unchanged in (
        "Sure, [SEG].",
        "Sure, [SEG], [SEG] and [SEG].",
        "There are two hearts: the small one [SEG], the large one [SEG].",
        "There is no cyan hexagon in the image.",
    ):
        assert describe_first(unchanged) == unchanged
    for i in range(40):  # same words, same [SEG] count, [SEG] last in one-target answers
        s = generate_sample("train", i)
        moved = describe_first(s.answer)
        assert _words(moved) - {"so"} == _words(s.answer) - {"so"}  # "..., so it is"
        assert moved.count("[SEG]") == s.answer.count("[SEG]")
        if s.answer.count("[SEG]") == 1 and s.answer != "Sure, [SEG].":
            assert moved.endswith(" [SEG].")


def test_an_unknown_answer_order_is_an_error() -> None:
    from segapp.data.answers import in_order

    assert in_order("It is [SEG], the red circle.", "seg_first") == "It is [SEG], the red circle."
    with pytest.raises(ValueError, match="unknown answer order 'seg_last'"):
        in_order("Sure, [SEG].", "seg_last")


def test_restate_reason_after_moves_a_leading_reason_behind_the_description() -> None:
    from segapp.data.answers import in_order, reason_after

    lead = "A wheel is round and a fire truck is red, so it is [SEG], the small red circle."
    assert in_order(lead, "restate_reason_after", "the round thing") == (
        "It is the round thing [SEG], the small red circle: a wheel is round and a fire "
        "truck is red."
    )
    for unchanged in (
        "It is [SEG], the red star: only one object is red.",
        "There are two stars: the dotted one [SEG] and the solid one [SEG].",
        "There is no purple star in the image.",
    ):
        assert reason_after(unchanged) == unchanged
    rng = np.random.default_rng(3)
    moved = 0
    for _ in range(60):  # no implicit answer keeps its reason before [SEG]
        scene = generate_scene(rng, "train")
        for q in make_queries(scene, rng, 3):
            answer = in_order(q.answer, "restate_reason_after", q.phrase)
            if len(q.targets) == 1:
                assert answer.startswith(("It is ", "Sure, ")), answer
                assert f"{q.phrase} [SEG]" in answer
                moved += ", so it is" in q.answer
    assert moved >= 5


def test_list_first_names_the_targets_before_the_count() -> None:
    from segapp.data.answers import in_order, list_first

    assert list_first(
        "There are three stars: the one at the top [SEG], the red one [SEG] and "
        "the large one [SEG]."
    ) == (
        "The stars: the one at the top [SEG], the red one [SEG], the large one [SEG]; three in all."
    )
    assert list_first("Sure, [SEG] and [SEG].") == "Sure, [SEG], [SEG]."
    for unchanged in ("It is [SEG], the red star.", "There is no purple star in the image."):
        assert list_first(unchanged) == unchanged
    with pytest.raises(ValueError, match="unknown multi order 'count_last'"):
        in_order("Sure, [SEG].", "restate", "", "count_last")
    rng = np.random.default_rng(5)
    listed = 0
    for _ in range(80):  # every multi answer is listed: one [SEG] per target, no "and", count last
        scene = generate_scene(rng, "train")
        for q in make_queries(scene, rng, 3):
            answer = in_order(q.answer, "restate", q.phrase, "list_first")
            assert answer.count("[SEG]") == q.answer.count("[SEG]")
            if len(q.targets) > 1:
                assert " and " not in answer and not answer.startswith("There are"), answer
                listed += answer.startswith("The ")
            else:
                assert answer == in_order(q.answer, "restate", q.phrase)
    assert listed >= 5


def test_group_first_leads_a_multi_target_answer_with_a_group_seg() -> None:
    from segapp.data.answers import group_first, in_order, is_group_answer

    answer = group_first("There are two circles: the red one [SEG] and the blue one [SEG].")
    assert answer == "The circles [SEG]: the red one [SEG] and the blue one [SEG]."
    assert is_group_answer(answer)
    assert group_first("Sure, [SEG] and [SEG].") == "Sure, [SEG]: [SEG] and [SEG]."
    for unchanged in ("It is [SEG], the red star.", "There is no purple star in the image."):
        assert group_first(unchanged) == unchanged and not is_group_answer(unchanged)
    assert not is_group_answer("The circles: the red one [SEG], the blue one [SEG]; two in all.")
    rng = np.random.default_rng(5)
    grouped = 0
    for _ in range(80):  # one more [SEG] than targets in every multi answer, none elsewhere
        scene = generate_scene(rng, "train")
        for q in make_queries(scene, rng, 3):
            answer = in_order(q.answer, "restate", q.phrase, "group_first")
            if len(q.targets) > 1:
                assert answer.count("[SEG]") == len(q.targets) + 1 and is_group_answer(answer)
                grouped += 1
            else:
                assert answer == in_order(q.answer, "restate", q.phrase)
    assert grouped >= 5


def test_restate_repeats_the_instructions_phrase_before_seg() -> None:
    from segapp.data.answers import in_order, restate

    assert restate("It is [SEG], the small red circle at the top.", "the red shape") == (
        "It is the red shape [SEG], the small red circle at the top."
    )
    for unchanged in ("There are two stars: the dotted one [SEG] and the solid one [SEG].",):
        assert restate(unchanged, "every star") == unchanged
    assert restate("Sure, [SEG].", "") == "Sure, [SEG]."
    rng = np.random.default_rng(7)
    seen = 0
    for _ in range(40):  # every one-target query carries the phrase its instruction asks about
        scene = generate_scene(rng, "train")
        for q in make_queries(scene, rng, 3):
            if len(q.targets) != 1:
                assert q.phrase == "" or q.kind == "multi"
                continue
            seen += 1
            assert q.phrase and q.phrase.split(" that ")[-1] in q.instruction, q
            answer = in_order(q.answer, "restate", q.phrase)
            assert answer.count("[SEG]") == 1 and f"{q.phrase} [SEG]" in answer
    assert seen >= 30
