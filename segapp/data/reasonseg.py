"""ReasonSeg-format datasets: one image + one labelme-style JSON per sample, same stem.

JSON keys: ``text`` (list of instructions), ``is_sentence``, ``shapes`` (polygons labelled
``"target"`` or ``"ignore"``, ``group_id`` = index of the target / ``[SEG]`` they belong to),
``imageHeight``, ``imageWidth``. Files written here add ``kind`` and ``answer``; the reader
tolerates their absence, so real ReasonSeg folders read the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from segapp.data.instructions import Sample, generate_sample
from segapp.errors import InputError
from segapp.export import atomic_write

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def mask_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Outer contours of an H x W bool mask as ``[[x, y], ...]`` polygons (pixel centres)."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    return [[[int(x), int(y)] for x, y in c.reshape(-1, 2)] for c in contours]


def write_sample(out_dir: Path, stem: str, sample: Sample) -> Path:
    """Write ``<stem>.png`` and ``<stem>.json`` into ``out_dir``; returns the JSON path.

    Both files are written to a temporary name first and moved into place, so a crash never
    leaves half a file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = sample.image.shape[:2]
    shapes: list[dict[str, Any]] = []
    for k, mask in enumerate(sample.target_masks):
        for poly in mask_polygons(mask):
            shapes.append(
                {"label": "target", "points": poly, "group_id": k, "shape_type": "polygon"}
            )
    if sample.ignore is not None:
        for poly in mask_polygons(sample.ignore):
            shapes.append(
                {"label": "ignore", "points": poly, "group_id": None, "shape_type": "polygon"}
            )
    record = {
        "text": [sample.instruction],
        "is_sentence": bool(sample.is_sentence),
        "shapes": shapes,
        "imageHeight": int(h),
        "imageWidth": int(w),
        "kind": sample.kind,
        "answer": sample.answer,
    }
    ok, png = cv2.imencode(".png", cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - encoding a uint8 array does not fail
        raise RuntimeError(f"could not encode image for {stem}")
    atomic_write(out_dir / f"{stem}.png", png.tobytes())
    json_path = out_dir / f"{stem}.json"
    atomic_write(json_path, json.dumps(record).encode())
    return json_path


def write_split(out_dir: Path, split: str, n: int, *, progress: bool = True) -> int:
    """Write samples ``0..n-1`` of ``split`` as ``<split>_<index>`` into ``out_dir``."""
    for i in tqdm(range(n), desc=f"{split}", disable=not progress, unit="sample"):
        write_sample(Path(out_dir), f"{split}_{i:06d}", generate_sample(split, i))
    return n


@dataclass
class ReasonSegItem:
    """One sample read back; ``gt`` is 0 background, 1 target, 255 ignore."""

    image_path: Path
    texts: list[str]
    is_sentence: bool
    kind: str | None
    answer: str | None
    gt: np.ndarray  # H x W uint8
    instances: list[np.ndarray]  # one H x W bool per group_id, in group_id order

    def load_image(self) -> np.ndarray:
        """H x W x 3 uint8 RGB."""
        img = cv2.imread(str(self.image_path), cv2.IMREAD_COLOR)
        if img is None:
            raise InputError("cannot read image", str(self.image_path))
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _points(shape: Any, where: str) -> np.ndarray:
    try:
        pts = np.asarray(shape["points"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"bad polygon in shapes ({e})", where) from e
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise InputError("polygon points must be a list of [x, y]", where)
    return np.round(pts).astype(np.int32)


def read_item(json_path: Path) -> ReasonSegItem:
    """Read one ReasonSeg JSON and locate its image (same stem, .jpg / .jpeg / .png).

    Polygons labelled with 'ignore' become 255 (drawn after the targets), all others 1.
    Target polygons without a ``group_id`` (real ReasonSeg) form one instance together.
    """
    json_path = Path(json_path)
    where = str(json_path)
    try:
        record = json.loads(json_path.read_text())
    except FileNotFoundError as e:
        raise InputError("annotation file not found", where) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"malformed JSON ({e})", where) from e
    if not isinstance(record, dict):
        raise InputError("malformed annotation: expected a JSON object", where)
    image_path = next((p for s in IMAGE_SUFFIXES if (p := json_path.with_suffix(s)).exists()), None)
    if image_path is None:
        raise InputError("no image with the same name (.jpg/.jpeg/.png)", where)
    texts = record.get("text", [])
    texts = [texts] if isinstance(texts, str) else texts
    shapes = record.get("shapes", [])
    if not isinstance(texts, list) or not isinstance(shapes, list):
        raise InputError("malformed annotation: 'text' and 'shapes' must be lists", where)
    try:
        h, w = int(record["imageHeight"]), int(record["imageWidth"])
    except (KeyError, TypeError, ValueError):
        img = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise InputError("cannot read image", str(image_path)) from None
        h, w = img.shape[:2]
    gt = np.zeros((h, w), np.uint8)
    groups: dict[int, np.ndarray] = {}
    ignores = []
    for shape in shapes:
        if not isinstance(shape, dict):
            raise InputError("malformed annotation: each shape must be an object", where)
        pts = _points(shape, where)
        if "ignore" in str(shape.get("label", "")).lower():
            ignores.append(pts)
            continue
        gid = shape.get("group_id")
        key = int(gid) if isinstance(gid, int) else -1
        canvas = groups.setdefault(key, np.zeros((h, w), np.uint8))
        cv2.fillPoly(canvas, [pts], 1)
        cv2.fillPoly(gt, [pts], 1)
    for pts in ignores:
        cv2.fillPoly(gt, [pts], 255)
    return ReasonSegItem(
        image_path=image_path,
        texts=[str(t) for t in texts],
        is_sentence=bool(record.get("is_sentence", False)),
        kind=record.get("kind"),
        answer=record.get("answer"),
        gt=gt,
        instances=[groups[k].astype(bool) for k in sorted(groups)],
    )


def read_dir(data_dir: Path) -> Iterator[ReasonSegItem]:
    """Every ``*.json`` item of ``data_dir``, sorted by file name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError("not a directory", str(data_dir))
    for path in sorted(data_dir.glob("*.json")):
        yield read_item(path)
