"""Segmentation metrics (ReasonSeg gIoU / cIoU, DAVIS J and F) and the evaluation runners.

Masks are ``H x W`` arrays; prediction foreground is any nonzero value. In ground truth,
255 means "ignore" (excluded from both intersection and union) and any other nonzero value
is foreground.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segapp.errors import InputError

IGNORE_VALUE = 255


def _check_shapes(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> None:
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise InputError(
            f"prediction {pred.shape} and ground truth {gt.shape} must be H x W of one size",
            "metrics",
        )
    if ignore is not None and ignore.shape != gt.shape:
        raise InputError(
            f"ignore mask {ignore.shape} does not match ground truth {gt.shape}", "metrics"
        )


def intersection_union(
    pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[int, int]:
    """``(|pred & gt|, |pred | gt|)`` over pixels that are not ignored.

    Ignored pixels are those where ``gt == 255`` (for non-bool ``gt``) or ``ignore`` is true.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    ignore = None if ignore is None else np.asarray(ignore).astype(bool)
    _check_shapes(pred, gt, ignore)
    if gt.dtype == np.bool_:
        valid = np.ones(gt.shape, dtype=bool)
        target = gt
    else:
        valid = gt != IGNORE_VALUE
        target = (gt != 0) & valid
    if ignore is not None:
        valid &= ~ignore
    predicted = (pred != 0) & valid
    target = target & valid
    return int(np.count_nonzero(predicted & target)), int(np.count_nonzero(predicted | target))


def _iou(intersection: int, union: int) -> float:
    return 1.0 if union == 0 else intersection / union


def _r4(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


@dataclass
class _Query:
    intersection: int
    union: int
    kind: str
    n_pred: int | None
    n_gt: int | None


@dataclass
class ReasonSegMeter:
    """Accumulates ReasonSeg metrics over a split.

    gIoU = mean over queries of I/U (a query whose union is empty scores 1.0);
    cIoU = sum(I) / sum(U) over the split (1.0 when sum(U) == 0).
    """

    queries: list[_Query] = field(default_factory=list)

    def add(
        self,
        pred: np.ndarray,
        gt: np.ndarray,
        *,
        ignore: np.ndarray | None = None,
        kind: str = "all",
        n_pred: int | None = None,
        n_gt: int | None = None,
    ) -> float:
        """Record one query (``pred``/``gt`` are the union of its masks); return its IoU."""
        intersection, union = intersection_union(pred, gt, ignore)
        self.queries.append(_Query(intersection, union, str(kind), n_pred, n_gt))
        return _iou(intersection, union)

    def __len__(self) -> int:
        return len(self.queries)

    @staticmethod
    def _scores(queries: list[_Query]) -> dict:
        if not queries:
            return {"n": 0, "giou": None, "ciou": None}
        giou = sum(_iou(q.intersection, q.union) for q in queries) / len(queries)
        ciou = _iou(sum(q.intersection for q in queries), sum(q.union for q in queries))
        return {"n": len(queries), "giou": _r4(giou), "ciou": _r4(ciou)}

    def summary(self) -> dict:
        """``{"n", "giou", "ciou", "per_kind", "no_target_empty_rate", "count_accuracy"}``.

        ``no_target_empty_rate``: share of queries with ``n_gt == 0`` answered with
        ``n_pred == 0``; ``count_accuracy``: share of queries with ``n_gt >= 2`` where
        ``n_pred == n_gt``. Both ``None`` when no query qualifies (or counts were not given).
        Scores are ``None`` for an empty meter.
        """
        kinds = sorted({q.kind for q in self.queries})
        per_kind = {k: self._scores([q for q in self.queries if q.kind == k]) for k in kinds}
        no_target = [q for q in self.queries if q.n_gt == 0 and q.n_pred is not None]
        several = [
            q for q in self.queries if q.n_gt is not None and q.n_gt >= 2 and q.n_pred is not None
        ]
        return {
            **self._scores(self.queries),
            "per_kind": per_kind,
            "no_target_empty_rate": _r4(sum(q.n_pred == 0 for q in no_target) / len(no_target))
            if no_target
            else None,
            "count_accuracy": _r4(sum(q.n_pred == q.n_gt for q in several) / len(several))
            if several
            else None,
        }


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Region similarity J: IoU of two binary masks (1.0 when both are empty)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_shapes(pred, gt)
    p, g = pred != 0, gt != 0
    return _iou(int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g)))


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour (the image border counts as background)."""
    m = mask.astype(np.uint8)
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    eroded = cv2.erode(m, cross, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (m > 0) & (eroded == 0)


def boundary_f(pred: np.ndarray, gt: np.ndarray, *, bound_th: float = 0.008) -> float:
    """Contour accuracy F (DAVIS): F-measure of boundary pixels matched within a tolerance.

    The tolerance is ``bound_th`` pixels if ``bound_th >= 1``, else
    ``ceil(bound_th * image diagonal)``. Both masks empty -> 1.0; exactly one empty -> 0.0.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_shapes(pred, gt)
    height, width = gt.shape
    radius = int(bound_th) if bound_th >= 1 else math.ceil(bound_th * math.hypot(height, width))
    pred_b, gt_b = _boundary(pred != 0), _boundary(gt != 0)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    pred_near = cv2.dilate(pred_b.astype(np.uint8), disk) > 0
    gt_near = cv2.dilate(gt_b.astype(np.uint8), disk) > 0
    precision = np.count_nonzero(pred_b & gt_near) / n_pred
    recall = np.count_nonzero(gt_b & pred_near) / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


# ---- runners -------------------------------------------------------------------------------
def evaluate_reason(
    model: str = "tiny",
    *,
    split: str = "test",
    data: Path | None = None,
    limit: int = 700,
    device: str = "cpu",
    progress: bool = True,
    bundle: Any = None,
) -> dict:
    """gIoU / cIoU (overall and per instruction kind) of a model on a ReasonSeg-format split.

    `data` is a ReasonSeg-format directory (every text of every JSON is one query); without it
    the first `limit` samples of the synthetic `split` are generated in memory.
    """
    from tqdm import tqdm

    from segapp.build import load_model
    from segapp.predictor import Segmenter

    seg = Segmenter(bundle if bundle is not None else load_model(model, device=device))
    meter = ReasonSegMeter()
    started = time.perf_counter()
    for image, instruction, gt, ignore, kind, n_gt in tqdm(
        _queries(split, data, limit),
        total=None if data else limit,
        disable=not progress,
        desc=f"eval {split if data is None else data}",
        unit="query",
    ):
        result = seg.segment(image, instruction)
        pred = np.zeros(gt.shape, dtype=bool)
        for m in result.masks:
            pred |= m.mask
        meter.add(pred, gt, ignore=ignore, kind=kind, n_pred=len(result.masks), n_gt=n_gt)
    summary = meter.summary()
    summary.update(
        no_target_threshold=seg.model.no_target_threshold if seg.model.no_target_ids else None,
        model=model if bundle is None else bundle.source,
        split=split if data is None else str(data),
        seconds=round(time.perf_counter() - started, 1),
    )
    return summary


def _queries(split: str, data: Path | None, limit: int) -> Iterator[tuple]:
    """(image, instruction, gt bool HxW, ignore bool HxW | None, kind, n_gt) per query."""
    if data is None:
        from segapp.data.instructions import generate_sample

        for i in range(limit):
            s = generate_sample(split, i)
            gt = s.target_masks.any(0) if len(s.target_masks) else np.zeros(s.image.shape[:2], bool)
            yield s.image, s.instruction, gt, s.ignore, s.kind, len(s.target_masks)
        return
    from segapp.data.reasonseg import read_dir
    from segapp.images import load_image

    for item in read_dir(data):
        image = load_image(item.image_path)
        for text in item.texts:
            yield image, text, item.gt == 1, item.gt == 255, item.kind or "all", len(item.instances)
