"""End-to-end checks of the bundled tiny weights (weights/tiny) on data/examples and the test split.

The bounds sit a margin below what the committed weights measure (see weights/tiny/README.md);
a change that breaks the pipeline (pre-processing, [SEG] decoding, mask post-processing) drops
far below them.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from segapp.build import REPO_ROOT, load_model
from segapp.data.instructions import generate_sample
from segapp.data.queries import NO_TARGET_OPENINGS
from segapp.data.reasonseg import read_dir
from segapp.evaluate import evaluate_reason
from segapp.predictor import Segmenter
from segapp.targets import complete_targets

EXAMPLES = REPO_ROOT / "data" / "examples"
# measured on the committed weights (weights/tiny/README.md): 0.72 mean IoU over the six
# examples with a target (five right), gIoU 0.79 and 11 of the 11 no-target queries answered
# with no mask on the first 70 test samples; bounds leave a margin (one wrong no-target
# answer is 9 points). Seven examples are too few to measure quality; the test split carries
# the quality bound.
EXAMPLES_MEAN_IOU = 0.45
SPLIT_GIOU = 0.60
NO_TARGET_EMPTY = 0.8
# the first 500 test samples hold 67 multi-target answers; measured: the target head adds
# masks to 12 of them, mean IoU of their union +0.084, distinct objects counted right 45
# times against 35 with one mask per [SEG]
MULTI_SAMPLES = 500
MULTI_IOU_GAIN = 0.04


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny")


@pytest.fixture(scope="module")
def example_results(bundle):
    segmenter = Segmenter(bundle)
    out = []
    for item in read_dir(EXAMPLES):
        image = item.load_image()
        result = segmenter.segment(image, item.texts[0])
        out.append((item, result))
    return out


def test_examples_cover_every_kind(example_results) -> None:
    kinds = {item.kind for item, _ in example_results}
    assert kinds == {"none", "referring", "spatial", "superlative", "implicit", "multi", "counting"}


def test_example_answers_give_one_mask_per_seg(example_results) -> None:
    """One mask per `[SEG]`, except that a multi-target answer's repeats are dropped and the
    objects its target head marks are added (segapp/targets.py)."""
    for _, result in example_results:
        segs = result.answer.count("[SEG]")
        if segs >= 2:
            assert result.masks, result.answer
            assert all(_iou(a.mask, b.mask) <= 0.5 for a, b in combinations(result.masks, 2))
        else:
            assert len(result.masks) == segs, result.answer


def test_examples_masks_overlap_their_targets(example_results) -> None:
    ious = []
    for item, result in example_results:
        if item.kind == "none":
            continue
        pred = np.zeros(item.gt.shape, bool)
        for m in result.masks:
            assert m.mask.shape == item.gt.shape
            pred |= m.mask
        target = item.gt == 1
        ious.append((pred & target).sum() / max(1, (pred | target).sum()))
    assert np.mean(ious) >= EXAMPLES_MEAN_IOU, ious


def test_test_split_giou(bundle) -> None:
    report = evaluate_reason(split="test", limit=70, progress=False, bundle=bundle)
    assert report["giou"] >= SPLIT_GIOU, report
    assert report["no_target_empty_rate"] >= NO_TARGET_EMPTY, report


def test_examples_directory_is_a_reasonseg_split(bundle, tmp_path: Path) -> None:
    report = evaluate_reason(data=EXAMPLES, progress=False, bundle=bundle)
    assert report["n"] == 7
    assert 0.0 <= report["ciou"] <= 1.0


def test_the_no_target_threshold_only_adds_no_target_answers(bundle) -> None:
    """weights/tiny/config.json lowers the threshold below greedy's 0.5 (chosen on the val
    split): every answer that greedy decoding gives without a mask stays so, and some absent
    objects that greedy decoding described are now answered 'There is no ...'."""
    assert bundle.model.no_target_ids and bundle.model.no_target_threshold < 0.5
    segmenter = Segmenter(bundle)
    samples = [s for s in (generate_sample("test", i) for i in range(120)) if s.kind == "none"]
    chosen = bundle.model.no_target_threshold
    lowered = [segmenter.segment(s.image, s.instruction) for s in samples]
    try:
        bundle.model.no_target_threshold = 1.0  # the openings' first tokens never hold it all
        greedy = [segmenter.segment(s.image, s.instruction) for s in samples]
    finally:
        bundle.model.no_target_threshold = chosen
    flipped = 0
    for low, high in zip(lowered, greedy, strict=True):
        if not high.masks:
            assert (low.answer, low.masks) == (high.answer, [])
        elif not low.masks:
            flipped += 1
            assert low.answer.startswith(NO_TARGET_OPENINGS), low.answer
    assert flipped >= 1


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_the_target_head_completes_multi_target_answers(bundle) -> None:
    """The bundled answers name two targets for nearly every multi-target instruction; with
    the target head the returned masks cover more of the targets, count them right more
    often (distinct objects: with one mask per `[SEG]` the two are often the same object), and
    never repeat an object. One-target answers are untouched."""
    samples = [s for s in (generate_sample("test", i) for i in range(MULTI_SAMPLES))]
    segmenter = Segmenter(bundle)
    head = bundle.model.target_head
    assert head is not None and bundle.config.target_head
    completed = [segmenter.segment(s.image, s.instruction) for s in samples]
    try:
        bundle.model.target_head = None
        named = [segmenter.segment(s.image, s.instruction) for s in samples]
    finally:
        bundle.model.target_head = head
    gains, right, right_before, added = [], 0, 0, 0
    for s, done, before in zip(samples, completed, named, strict=True):
        if before.answer.count("[SEG]") < 2:
            assert [m.label for m in done.masks] == [m.label for m in before.masks]
            assert all(
                np.array_equal(a.mask, b.mask)
                for a, b in zip(done.masks, before.masks, strict=True)
            )
            continue
        assert all(_iou(a.mask, b.mask) <= 0.5 for a, b in combinations(done.masks, 2))
        gt = s.target_masks.any(0)
        union = [np.any([gt & False] + [m.mask for m in r.masks], 0) for r in (done, before)]
        gains.append(_iou(union[0], gt) - _iou(union[1], gt))
        right += len(done.masks) == len(s.target_masks)
        distinct, _ = complete_targets([m.mask for m in before.masks], [])
        right_before += len(distinct) == len(s.target_masks)
        added += len(done.masks) > before.answer.count("[SEG]")
    assert len(gains) >= 40 and added >= 5
    assert np.mean(gains) >= MULTI_IOU_GAIN, np.mean(gains)
    assert right > right_before, (right, right_before)
