"""The model step shared by every engine: load units, then segment a batch of them at once.

`infer_units` runs both image encoders once for the whole batch and decodes all its
(image, instruction) queries together (`Segmenter.predict_batch`). Each image's encoding and
each query's decoding are independent of the rest of the batch, so the results do not depend
on how units were grouped: a resumed run or the Ray engine gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segapp.batch.job import Problem, Unit
from segapp.errors import InputError
from segapp.images import load_image
from segapp.predictor import Prepared, Result, Segmenter


@dataclass
class Loaded:
    """A unit after reading: its RGB image (H x W x 3 uint8) or why it could not be read."""

    unit: Unit
    image: np.ndarray | None = None
    error: str | None = None
    prepared: Prepared | None = None  # encoder inputs, when made ahead (worker threads)


@dataclass
class UnitOutput:
    """What a unit produced: one Result per usable instruction, and the problems."""

    unit: Unit
    image: np.ndarray | None  # H x W x 3 uint8, when still needed (overlays)
    size: tuple[int, int] = (0, 0)  # (H, W); (0, 0) if the image could not be read
    results: list[Result] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def load_unit(unit: Unit, *, max_pixels: int, segmenter: Segmenter | None = None) -> Loaded:
    """Read and decode the unit's image (and prepare encoder inputs if given a segmenter).

    Never raises for a bad file: the reason goes into `Loaded.error`.
    """
    try:
        image = load_image(unit.path, max_pixels=max_pixels)
    except InputError as exc:
        return Loaded(unit, error=exc.what)
    prepared = segmenter.prepare(image) if segmenter is not None else None
    return Loaded(unit, image, prepared=prepared)


def infer_units(segmenter: Segmenter, batch: Sequence[Loaded]) -> list[UnitOutput]:
    """Segment every (image, instruction) of `batch`; outputs in the same order as `batch`."""
    outputs = [
        UnitOutput(
            item.unit, item.image, item.image.shape[:2] if item.image is not None else (0, 0)
        )
        for item in batch
    ]
    readable = [i for i, item in enumerate(batch) if item.image is not None]
    for item, out in zip(batch, outputs, strict=True):
        if item.image is None:
            out.problems.append(Problem(item.unit.rel, item.error or "unreadable"))
    prepared = [batch[i].prepared or segmenter.prepare(batch[i].image) for i in readable]
    caches = segmenter.encode_batch(prepared)
    queries, owners = [], []
    for i, cache in zip(readable, caches, strict=True):
        for instruction in batch[i].unit.instructions:
            try:
                segmenter.prompt_ids(instruction)
            except InputError as exc:
                outputs[i].problems.append(Problem(batch[i].unit.rel, exc.what, instruction))
                continue
            queries.append((cache, instruction))
            owners.append(outputs[i])
    for owner, result in zip(owners, segmenter.predict_batch(queries), strict=True):
        owner.results.append(result)
    return outputs
