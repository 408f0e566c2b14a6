"""End-to-end checks of the bundled tiny weights (weights/tiny) on data/examples and the test split.

The bounds sit a margin below what the committed weights measure (see weights/tiny/README.md);
a change that breaks the pipeline (pre-processing, [SEG] decoding, mask post-processing) drops
far below them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segapp.build import REPO_ROOT, load_model
from segapp.data.instructions import generate_sample
from segapp.data.queries import NO_TARGET_OPENINGS
from segapp.data.reasonseg import read_dir
from segapp.evaluate import evaluate_reason
from segapp.predictor import Segmenter

EXAMPLES = REPO_ROOT / "data" / "examples"
# measured on the committed weights (weights/tiny/README.md): 0.73 mean IoU over the six
# examples with a target (five right), gIoU 0.79 and 11 of the 11 no-target queries answered
# with no mask on the first 70 test samples; bounds leave a margin (one wrong no-target
# answer is 9 points). Seven examples are too few to measure quality; the test split carries
# the quality bound.
EXAMPLES_MEAN_IOU = 0.45
SPLIT_GIOU = 0.60
NO_TARGET_EMPTY = 0.8


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
    for _, result in example_results:
        assert len(result.masks) == result.answer.count("[SEG]"), result.answer


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
