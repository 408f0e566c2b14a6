"""Answer orders: where a one-target answer puts its `[SEG]` relative to the words about the
target (what the model answers with, and the scaffolds training may use instead)."""

from __future__ import annotations

import re

from segapp.data import knowledge as kb

SEG = "[SEG]"

ANSWER_ORDERS = ("seg_first", "describe_first", "restate", "restate_reason_after")
_REASON_AFTER = re.compile(r"^It is \[SEG\], the (.+?): (.+)\.$")
_REASON_FIRST = re.compile(r"^(.+), so it is \[SEG\], the (.+)\.$")
_DESCRIPTION_AFTER = re.compile(r"^(.*?)\[SEG\], the (.+)\.$")
MULTI_ORDERS = ("count_first", "list_first", "group_first")
_COUNT_FIRST = re.compile(r"^There are (\S+) (.+?): (.+)\.$")
_ITEM = re.compile(r"(?:, | and )?(the .+? \[SEG\])")
_GROUP = re.compile(r"^(?:The [^\[]+? |Sure, )\[SEG\]: ")


def describe_first(answer: str) -> str:
    """A one-target answer with its description moved before the `[SEG]` ("It is [SEG], the
    red circle." -> "It is the red circle [SEG]."; a reason read off the image leads:
    "Only one object is red, so it is the ... [SEG]."). Other answers are returned unchanged.

    A scaffold for training: a description that names the target's attributes and place
    right before `[SEG]` shows the `[SEG]` pointer where words lie in the image; a second
    stage takes it away. (The bundled recipe used it until it moved to `restate`: the
    model's own descriptions were often wrong and the pointer followed them.)
    """
    if answer.count(SEG) != 1:
        return answer
    if m := _REASON_AFTER.match(answer):
        return f"{kb.sentence(m[2])}, so it is the {m[1]} {SEG}."
    if m := _DESCRIPTION_AFTER.match(answer):
        return f"{m[1]}the {m[2]} {SEG}."
    return answer


def restate(answer: str, phrase: str) -> str:
    """A one-target answer that repeats the instruction's own noun phrase right before its
    `[SEG]` ("It is [SEG], the red circle." for "segment the red shape" -> "It is the red shape
    [SEG], the red circle."). Other answers, or no phrase, are returned unchanged.

    Why: the hidden state that predicts `[SEG]` points SAM at the target, so it must hold what
    the instruction asks for. Read across the 64 image tokens between them, the instruction
    barely reached it: trained without this order, the pointer picked the target of "the red
    shape" about 30% of the time, training scenes included. Copying words is what a language
    model learns first,
    and a phrase copied just before `[SEG]` is within a few positions of it. Unlike
    `describe_first`, nothing here is read off the image, so a copy cannot be a wrong reading.
    """
    if answer.count(SEG) != 1 or not phrase:
        return answer
    return answer.replace(SEG, f"{phrase} {SEG}")


def reason_after(answer: str) -> str:
    """A one-target answer whose reason leads ("A wheel is round, so it is [SEG], the red
    circle.") with the reason moved after the description ("It is [SEG], the red circle: a
    wheel is round."), as the other kinds' answers put theirs. Other answers are unchanged.

    Why: with `restate`, the words right before `[SEG]` must be a copy of the instruction's
    phrase, and a reason the model wrote first derails the copy when it is wrong ("A honeycomb
    cell is a hexagon and a banana is ..., so it is the object that ... is the colour of a
    banana [SEG]" for "... the colour of a fire truck"): on 150 one-target implicit test
    queries, the bundled weights' copy was wrong in 17 of 120 answers that led with a reason
    (gIoU 0.33 on those, 0.83 on the others).
    """
    if answer.count(SEG) != 1:
        return answer
    if m := _REASON_FIRST.match(answer):
        reason = m[1][:1].lower() + m[1][1:]
        return f"It is {SEG}, the {m[2]}: {reason}."
    return answer


def list_first(answer: str) -> str:
    """A multi-target answer that lists its targets before it says how many ("There are two
    circles: the red one [SEG] and the blue one [SEG]." -> "The circles: the red one [SEG],
    the blue one [SEG]; two in all."; "Sure, [SEG] and [SEG]." -> "Sure, [SEG], [SEG].").
    Other answers are returned unchanged.

    Why: a count said first must be right before any target is named, in one token, and the
    bundled weights (trained count first) said "two" for most groups of three or four (multi
    count right in 76% of test queries). Listed left to right with no "and" before the last,
    each step asks a local question instead: is there another match to the right of the last
    one named? The group's own words ("circles") also come right before the list.
    """
    if answer.count(SEG) < 2:
        return answer
    if answer.startswith("Sure, "):
        return "Sure, " + ", ".join([SEG] * answer.count(SEG)) + "."
    m = _COUNT_FIRST.match(answer)
    if m is None:
        return answer
    items = _ITEM.findall(m[3])
    if len(items) != answer.count(SEG) or _ITEM.sub("", m[3]):
        return answer
    return f"The {m[2]}: {', '.join(items)}; {m[1]} in all."


def group_first(answer: str) -> str:
    """A multi-target answer led by one `[SEG]` for the whole group ("There are two circles:
    the red one [SEG] and the blue one [SEG]." -> "The circles [SEG]: the red one [SEG] and
    the blue one [SEG]."; "Sure, [SEG] and [SEG]." -> "Sure, [SEG]: [SEG] and [SEG].").
    Other answers are returned unchanged.

    Why: the LLM sees the image as an 8 x 8 grid of tokens, on which targets touch or cover
    no token by half, and no recipe taught it to count (it says "two" for most groups of
    three or four). The group `[SEG]` is trained on the union of the targets; the predictor
    splits its mask into connected components at full resolution and adds the components
    no per-target mask covers (`group_masks`), so the count comes from the pixels.
    """
    if answer.count(SEG) < 2:
        return answer
    if answer.startswith("Sure, "):
        return f"Sure, {SEG}: {answer[len('Sure, ') :]}"
    m = _COUNT_FIRST.match(answer)
    if m is None:
        return answer
    return f"The {m[2]} {SEG}: {m[3]}."


def group_noun(answer: str) -> str:
    """The group a count-first multi-target answer names ("There are two circles: ..." ->
    "circles"); empty for any other answer."""
    m = _COUNT_FIRST.match(answer)
    return m[2] if m else ""


def is_group_answer(answer: str) -> bool:
    """Whether `answer` has the `group_first` layout (its first `[SEG]` is the group's)."""
    return answer.count(SEG) >= 2 and bool(_GROUP.match(answer))


def in_order(answer: str, order: str, phrase: str = "", multi_order: str = "count_first") -> str:
    """``answer`` (as generated: `[SEG]` first) in the given order (one of ANSWER_ORDERS);
    ``phrase``: the query's noun phrase, which `restate` repeats; ``multi_order`` (one of
    MULTI_ORDERS): how an answer with several `[SEG]` is laid out."""
    if order not in ANSWER_ORDERS:
        raise ValueError(f"unknown answer order {order!r}; expected one of {ANSWER_ORDERS}")
    if multi_order not in MULTI_ORDERS:
        raise ValueError(f"unknown multi order {multi_order!r}; expected one of {MULTI_ORDERS}")
    if multi_order == "list_first":
        answer = list_first(answer)
    elif multi_order == "group_first":
        answer = group_first(answer)
    if order == "restate":
        return restate(answer, phrase)
    if order == "restate_reason_after":
        return restate(reason_after(answer), phrase)
    return answer if order == "seg_first" else describe_first(answer)
