"""gIoU / cIoU / J / F on hand-made cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from segapp.errors import InputError
from segapp.evaluate import ReasonSegMeter, boundary_f, intersection_union, jaccard


def _mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = 1
    return m


def test_intersection_union_counts() -> None:
    pred = _mask((10, 10), (0, 4, 0, 4))  # 16 px
    gt = _mask((10, 10), (2, 6, 2, 6))  # 16 px, overlap 2x2
    assert intersection_union(pred, gt) == (4, 28)


def test_ignore_pixels_are_excluded() -> None:
    pred = _mask((4, 4), (0, 4, 0, 2))  # left half, 8 px
    gt = _mask((4, 4), (0, 2, 0, 4))  # top half, 8 px
    gt[2:, 2:] = 255  # bottom-right quarter ignored (neither in pred nor gt anyway)
    gt[3, 0] = 255  # one predicted pixel ignored
    assert intersection_union(pred, gt) == (4, 11)
    ignore = np.zeros((4, 4), bool)
    ignore[0, 3] = True  # one gt pixel ignored through the mask
    assert intersection_union(pred, gt, ignore) == (4, 10)


def test_empty_union_scores_one_and_ciou_sums() -> None:
    meter = ReasonSegMeter()
    empty = np.zeros((5, 5), np.uint8)
    assert meter.add(empty, empty, kind="no_target", n_pred=0, n_gt=0) == 1.0
    # I=4, U=28 -> 1/7
    iou = meter.add(_mask((10, 10), (0, 4, 0, 4)), _mask((10, 10), (2, 6, 2, 6)), kind="long")
    assert iou == pytest.approx(4 / 28)
    # I=10, U=30 (gt rows 0 and 2, pred rows 0 and 1)
    pred = _mask((10, 10), (0, 2, 0, 10))
    gt = _mask((10, 10), (0, 1, 0, 10), (1, 2, 0, 10))
    gt[1] = 0
    gt[2] = 1
    meter.add(pred, gt, kind="long", n_pred=2, n_gt=2)
    summary = meter.summary()
    assert summary["n"] == 3
    assert summary["giou"] == round((1.0 + 4 / 28 + 10 / 30) / 3, 4)
    assert summary["ciou"] == round((0 + 4 + 10) / (0 + 28 + 30), 4)
    assert summary["per_kind"]["no_target"] == {"n": 1, "giou": 1.0, "ciou": 1.0}
    assert summary["per_kind"]["long"]["n"] == 2
    assert summary["per_kind"]["long"]["ciou"] == round(14 / 58, 4)
    assert summary["no_target_empty_rate"] == 1.0
    assert summary["count_accuracy"] == 1.0


def test_count_rates() -> None:
    meter = ReasonSegMeter()
    m = _mask((3, 3), (0, 1, 0, 1))
    meter.add(m, m, n_pred=1, n_gt=0)
    meter.add(m, m, n_pred=0, n_gt=0)
    meter.add(m, m, n_pred=0, n_gt=0)
    meter.add(m, m, n_pred=3, n_gt=3)
    meter.add(m, m, n_pred=2, n_gt=3)
    meter.add(m, m, n_pred=1, n_gt=1)  # n_gt < 2: not counted
    summary = meter.summary()
    assert summary["no_target_empty_rate"] == round(2 / 3, 4)
    assert summary["count_accuracy"] == 0.5
    assert summary["giou"] == 1.0


def test_empty_meter_and_missing_counts() -> None:
    summary = ReasonSegMeter().summary()
    assert summary["n"] == 0 and summary["giou"] is None and summary["ciou"] is None
    meter = ReasonSegMeter()
    meter.add(np.zeros((2, 2)), np.zeros((2, 2)))
    assert meter.summary()["no_target_empty_rate"] is None
    assert meter.summary()["count_accuracy"] is None
    assert meter.summary()["ciou"] == 1.0


def test_shape_mismatch_is_input_error() -> None:
    with pytest.raises(InputError):
        intersection_union(np.zeros((3, 3)), np.zeros((3, 4)))


def test_jaccard() -> None:
    a = _mask((10, 10), (0, 5, 0, 10))
    b = _mask((10, 10), (0, 10, 0, 5))
    assert jaccard(a, b) == pytest.approx(25 / 75)
    assert jaccard(a, a) == 1.0
    assert jaccard(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0


def test_boundary_f_known_cases() -> None:
    shape = (100, 100)
    a = _mask(shape, (10, 40, 10, 40))
    far = _mask(shape, (60, 90, 60, 90))
    assert boundary_f(a, a) == 1.0
    assert boundary_f(a, far) == 0.0
    assert boundary_f(np.zeros(shape), np.zeros(shape)) == 1.0
    assert boundary_f(a, np.zeros(shape)) == 0.0
    # shifted by one pixel: within the tolerance ceil(0.008 * 141.4) = 2 px
    shifted = _mask(shape, (11, 41, 11, 41))
    assert boundary_f(a, shifted) == 1.0
    # shifted by 5 px: partly matched
    assert 0.0 < boundary_f(a, _mask(shape, (15, 45, 10, 40))) < 1.0
