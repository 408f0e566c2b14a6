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
from segapp.data.reasonseg import read_dir
from segapp.evaluate import evaluate_reason
from segapp.predictor import Segmenter

EXAMPLES = REPO_ROOT / "data" / "examples"
# measured on the committed weights (weights/tiny/README.md): 0.61 mean IoU over the six
# examples with a target (four right), gIoU 0.71 and 10 of the 11 no-target queries answered
# with no mask on the first 70 test samples; bounds leave a margin (one more wrong no-target
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
