"""Mask output formats: COCO RLE, polygons, shapely geometry, overlays and PNG files.

Conventions: masks are ``H x W`` arrays (bool, or numbers where > 0 is foreground); boxes are
XYXY ``[x0, y0, x1, y1]`` with ``x1``/``y1`` exclusive; polygon vertices are ``[x, y]`` pixel
coordinates with integer values at pixel centres (OpenCV's convention, so
``polygons_to_mask(mask_to_polygons(m))`` gives ``m`` back up to simplification).
"""

from __future__ import annotations

import colorsys
import contextlib
import io
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import shapely
from PIL import Image
from pycocotools import mask as mask_utils
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from segapp.errors import InputError
from segapp.images import to_rgb_array

# Distinct, readable colours (RGB) for the first masks; later ones come from golden-ratio hues.
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
]


def _as_mask(mask: Any, where: str = "mask") -> np.ndarray:
    """Any 2-D array -> C-contiguous bool ``H x W`` (foreground = nonzero)."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise InputError(f"a mask must be a 2-D H x W array, got shape {array.shape}", where)
    return array if array.dtype == np.bool_ else array > 0


def mask_color(index: int) -> tuple[int, int, int]:
    """RGB colour of the ``index``-th mask in overlays (stable across calls)."""
    if index < len(_PALETTE):
        return _PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO RLE ``{"size": [h, w], "counts": str}``, exactly as pycocotools encodes it."""
    m = _as_mask(mask)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    counts = rle["counts"]
    return {
        "size": [int(rle["size"][0]), int(rle["size"][1])],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else str(counts),
    }


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode a COCO RLE (compressed string/bytes or uncompressed list counts) to ``H x W`` bool."""
    try:
        height, width = (int(v) for v in rle["size"])
        counts = rle["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            rle = {"size": [height, width], "counts": counts}
        decoded = mask_utils.decode(rle)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"not a valid COCO RLE: {exc}", "rle") from exc
    return decoded.astype(bool)


def mask_bbox(mask: np.ndarray) -> list[int]:
    """Tight box ``[x0, y0, x1, y1]`` (XYXY, x1/y1 exclusive); ``[0, 0, 0, 0]`` if empty."""
    m = _as_mask(mask)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return [0, 0, 0, 0]
    cols = np.flatnonzero(m.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _contours(m: np.ndarray, mode: int) -> tuple[Sequence[np.ndarray], np.ndarray | None]:
    found = cv2.findContours(m.astype(np.uint8), mode, cv2.CHAIN_APPROX_NONE)
    contours, hierarchy = found[-2], found[-1]  # OpenCV 3 returned 3 values
    return contours, None if hierarchy is None else hierarchy.reshape(-1, 4)


def _ring(contour: np.ndarray) -> np.ndarray | None:
    points = contour.reshape(-1, 2).astype(np.float64)
    return points if len(points) >= 3 else None


def _polygonal(geometry: BaseGeometry) -> list[Polygon]:
    """The non-empty polygons inside any geometry (make_valid can add lines and points)."""
    if isinstance(geometry, Polygon):
        return [] if geometry.is_empty else [geometry]
    parts = getattr(geometry, "geoms", [])
    return [p for g in parts for p in _polygonal(g)]


def mask_to_polygons(
    mask: np.ndarray, *, tolerance: float = 1.0, min_area: float = 4.0
) -> list[list[list[float]]]:
    """Outer rings of the mask's regions as ``[[[x, y], ...], ...]`` (no repeated closing point).

    Holes are not represented (see ``mask_to_shapely``). Rings are simplified with
    Douglas-Peucker at ``tolerance`` pixels; rings with area < ``min_area`` are dropped.
    """
    contours, _ = _contours(_as_mask(mask), cv2.RETR_EXTERNAL)
    polygons: list[list[list[float]]] = []
    for contour in contours:
        ring = _ring(contour)
        if ring is None:
            continue
        for part in _polygonal(shapely.make_valid(Polygon(ring))):
            simple = part.simplify(tolerance, preserve_topology=True)
            for piece in _polygonal(simple):
                if piece.area < min_area:
                    continue
                coords = np.asarray(piece.exterior.coords)[:-1]
                polygons.append([[float(x), float(y)] for x, y in coords])
    return polygons


def mask_to_shapely(mask: np.ndarray, *, tolerance: float = 1.0) -> BaseGeometry:
    """The mask as a shapely ``Polygon`` or ``MultiPolygon`` with holes (empty Polygon if none).

    Built from OpenCV's two-level contour hierarchy (``RETR_CCOMP``): each outer contour
    with its hole contours; regions inside holes come back as separate polygons. Same
    coordinates as ``mask_to_polygons`` (pixel ``(row, col)`` is the unit square centred on
    ``(col, row)``), but the outline follows pixel edges rather than boundary pixel centres,
    so ``area`` is close to ``mask.sum()`` (before simplification at ``tolerance``).
    """
    contours, hierarchy = _contours(_as_mask(mask), cv2.RETR_CCOMP)
    if hierarchy is None:
        return Polygon()
    polygons: list[Polygon] = []
    for index, contour in enumerate(contours):
        if hierarchy[index][3] != -1:  # a hole; handled with its parent
            continue
        shell = _ring(contour)
        if shell is None:
            continue
        holes = []
        child = hierarchy[index][2]
        while child != -1:
            hole = _ring(contours[child])
            if hole is not None:
                holes.append(hole)
            child = hierarchy[child][0]
        # Contours run through boundary pixel centres; growing by half a pixel (square
        # corners) makes the shape cover whole pixels, so its area matches the pixel count and
        # one-pixel-wide parts (degenerate rings) survive.
        valid = shapely.make_valid(Polygon(shell, holes))
        polygons.append(valid.buffer(0.5, join_style="mitre", cap_style="square"))
    if not polygons:
        return Polygon()
    merged = shapely.union_all(polygons).simplify(tolerance, preserve_topology=True)
    parts = _polygonal(merged)
    if not parts:
        return Polygon()
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def polygons_to_mask(
    polygons: Sequence[Sequence[Sequence[float]]], height: int, width: int
) -> np.ndarray:
    """Rasterise polygons (as from ``mask_to_polygons``) to an ``H x W`` bool mask (union)."""
    canvas = np.zeros((int(height), int(width)), dtype=np.uint8)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if len(points) < 3:
            continue
        # Fixed point with 8 fractional bits keeps sub-pixel vertices; one call per polygon so
        # overlapping polygons add up instead of cancelling (fillPoly is even-odd per call).
        fixed = np.rint(points * 256.0).astype(np.int32)
        cv2.fillPoly(canvas, [fixed], 1, lineType=cv2.LINE_8, shift=8)
    return canvas.astype(bool)


def overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    *,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw masks over ``image``: ``H x W x 3`` uint8 with tinted regions, outlines and labels.

    Mask ``i`` gets ``mask_color(i)``; its label is written at the top-left of its box.
    """
    canvas = to_rgb_array(image).copy()
    height, width = canvas.shape[:2]
    if labels is not None and len(labels) != len(masks):
        raise InputError(f"got {len(labels)} labels for {len(masks)} masks", "overlay")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be between 0 and 1, got {alpha}", "overlay")
    bools = [_as_mask(m) for m in masks]
    for m in bools:
        if m.shape != (height, width):
            raise InputError(
                f"mask shape {m.shape} does not match image {height}x{width}", "overlay"
            )
    thickness = max(1, round(min(height, width) / 300))
    for index, m in enumerate(bools):
        colour = np.array(mask_color(index), dtype=np.float32)
        tinted = canvas[m].astype(np.float32) * (1.0 - alpha) + colour * alpha
        canvas[m] = np.clip(np.rint(tinted), 0, 255).astype(np.uint8)
        contours, _ = _contours(m, cv2.RETR_CCOMP)
        cv2.drawContours(canvas, list(contours), -1, mask_color(index), thickness)
    if labels is not None:
        for index, (m, label) in enumerate(zip(bools, labels, strict=True)):
            if m.any():
                _draw_label(canvas, str(label), mask_bbox(m)[:2], mask_color(index))
    return canvas


def _draw_label(canvas: np.ndarray, text: str, at: list[int], colour: tuple[int, int, int]) -> None:
    text = text.encode("ascii", "replace").decode("ascii")  # Hershey fonts are ASCII only
    if not text:
        return
    height, width = canvas.shape[:2]
    scale = max(0.35, min(height, width) / 800)
    weight = max(1, round(scale * 1.5))
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, scale, weight)
    x = min(max(at[0], 0), max(width - tw - 2, 0))
    y = min(max(at[1], 0), max(height - th - base - 2, 0))
    cv2.rectangle(canvas, (x, y), (x + tw + 2, y + th + base + 2), colour, -1)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(canvas, text, (x + 1, y + th + 1), font, scale, ink, weight, cv2.LINE_AA)


def save_png(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as PNG atomically (temp file in the same folder, then ``os.replace``).

    bool ``H x W`` -> L PNG with 0/255; uint8 ``H x W`` -> L; ``H x W x 3`` -> RGB;
    ``H x W x 4`` -> RGBA. The parent folder is created if missing.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype == np.bool_ and array.ndim == 2:
        image = Image.fromarray(array.astype(np.uint8) * 255, mode="L")
    elif array.dtype == np.uint8 and array.ndim == 2:
        image = Image.fromarray(array, mode="L")
    elif array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] in (3, 4):
        image = Image.fromarray(
            np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA"
        )
    else:
        raise InputError(
            f"cannot save array of shape {array.shape} and dtype {array.dtype} as PNG "
            "(need bool/uint8 H x W or uint8 H x W x 3/4)",
            str(path),
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and ``os.replace``:
    readers see the old file or the new one, never half of it. The parent is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(data)
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def mask_record(mask: np.ndarray, *, label: str, score: float) -> dict:
    """One ``masks`` row of the JSON output (DESIGN.md): label, score, bbox, area, rle, polygons.

    All values are plain Python types; ``score`` is rounded to 4 decimals.
    """
    m = _as_mask(mask)
    score = float(score)
    if not math.isfinite(score):
        raise InputError(f"mask score must be a finite number, got {score}", str(label))
    return {
        "label": str(label),
        "score": round(score, 4),
        "bbox": mask_bbox(m),
        "area": int(np.count_nonzero(m)),
        "rle": mask_to_rle(m),
        "polygons": mask_to_polygons(m),
    }
