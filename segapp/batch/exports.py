"""Whole-run exports made from results.jsonl at the end of a run: COCO, GeoJSON, YOLO-seg.

They are pure functions of the rows (in results.jsonl order), so an interrupted and resumed
run writes the same bytes as an uninterrupted one. Categories are the mask labels, sorted;
empty masks are left out of these exports (their PNGs are still written).

- ``coco.json``: COCO instances with RLE ``segmentation`` (pycocotools' compressed string),
  ``bbox`` as COCO's ``[x, y, width, height]``, ``area``, ``score``, plus ``instruction`` and
  ``mask_file`` (the PNG of the same mask, when PNGs are written).
- ``polygons/<image>.geojson``: one Feature per mask, its shapely outline with holes kept and
  simplified; coordinates are pixels (x right, y down, the unit square of pixel (r, c) is
  centred on (c, r)), not geographic.
- ``yolo/labels/<image stem>.txt`` + ``yolo/classes.txt``: one line per polygon,
  ``class x1 y1 x2 y2 ...`` with coordinates divided by the image width / height.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from shapely.geometry import mapping

from segapp.batch.job import mask_file, polygons_file
from segapp.batch.outputs import dumps, write_text_atomic
from segapp.export import mask_to_shapely, rle_to_mask

GEOJSON_TOLERANCE = 0.5  # pixels of Douglas-Peucker simplification for GeoJSON outlines


def categories(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Mask label -> category id (1-based, labels sorted)."""
    labels = {m["label"] for row in rows for m in row["masks"] if m["area"] > 0}
    return {label: i for i, label in enumerate(sorted(labels), 1)}


def coco_dataset(rows: list[dict[str, Any]], *, mask_files: bool) -> dict[str, Any]:
    """A COCO instances dict (images, annotations, categories) of all non-empty masks."""
    cats = categories(rows)
    images: dict[str, dict[str, Any]] = {}
    annotations: list[dict[str, Any]] = []
    for row in rows:
        rel = row["image"]
        if rel not in images:
            height, width = row["size"]
            images[rel] = {
                "id": len(images) + 1,
                "file_name": rel,
                "height": height,
                "width": width,
            }
        for index, m in enumerate(row["masks"]):
            if m["area"] == 0:
                continue
            x0, y0, x1, y1 = m["bbox"]
            ann = {
                "id": len(annotations) + 1,
                "image_id": images[rel]["id"],
                "category_id": cats[m["label"]],
                "segmentation": m["rle"],
                "area": m["area"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0,
                "score": m["score"],
                "instruction": row["instruction"],
            }
            if mask_files:
                ann["mask_file"] = mask_file(rel, row["instruction"], index)
            annotations.append(ann)
    return {
        "info": {"description": "segapp batch", "version": "1.0"},
        "images": list(images.values()),
        "annotations": annotations,
        "categories": [
            {"id": i, "name": label, "supercategory": "object"} for label, i in cats.items()
        ],
    }


def geojson_collections(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Output path -> GeoJSON FeatureCollection of that image's masks (holes kept)."""
    collections: dict[str, dict[str, Any]] = {}
    for row in rows:
        path = polygons_file(row["image"])
        features = collections.setdefault(path, {"type": "FeatureCollection", "features": []})
        for index, m in enumerate(row["masks"]):
            if m["area"] == 0:
                continue
            shape = mask_to_shapely(rle_to_mask(m["rle"]), tolerance=GEOJSON_TOLERANCE)
            features["features"].append(
                {
                    "type": "Feature",
                    "geometry": mapping(shape),
                    "properties": {
                        "instruction": row["instruction"],
                        "mask": index,
                        "label": m["label"],
                        "score": m["score"],
                    },
                }
            )
    return collections


def yolo_labels(rows: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """(label file path -> text, class names in id order) in YOLO-seg format.

    A label file is named after its image's stem; when two images in one folder share a
    stem (a.jpg, a.png) the later one keeps its suffix (a.png.txt) instead of colliding.
    """
    cats = categories(rows)
    owner: dict[str, str] = {}
    texts: dict[str, list[str]] = {}
    for row in rows:
        rel = row["image"]
        stem = str(PurePosixPath(rel).with_suffix(".txt"))
        path = f"yolo/labels/{stem}"
        if owner.setdefault(path, rel) != rel:
            path = f"yolo/labels/{rel}.txt"
        lines = texts.setdefault(path, [])
        height, width = row["size"]
        for m in row["masks"]:
            if m["area"] == 0:
                continue
            for polygon in m["polygons"]:
                # vertices sit on pixel centres: pixel x spans [x, x+1) of the width
                coords = [
                    f"{min(max((x + 0.5) / width, 0.0), 1.0):.6f} "
                    f"{min(max((y + 0.5) / height, 0.0), 1.0):.6f}"
                    for x, y in polygon
                ]
                lines.append(f"{cats[m['label']] - 1} " + " ".join(coords))
    return {p: "".join(line + "\n" for line in lines) for p, lines in texts.items()}, list(cats)


def write_exports(out_dir: Path, rows: list[dict[str, Any]], formats: tuple[str, ...]) -> None:
    """Write the whole-run exports named in `formats` (coco, polygons, yolo)."""
    if "coco" in formats:
        coco = coco_dataset(rows, mask_files="png" in formats)
        write_text_atomic(out_dir / "coco.json", dumps(coco) + "\n")
    if "polygons" in formats:
        for path, collection in geojson_collections(rows).items():
            write_text_atomic(out_dir / path, dumps(collection) + "\n")
    if "yolo" in formats:
        labels, names = yolo_labels(rows)
        for path, text in labels.items():
            write_text_atomic(out_dir / path, text)
        write_text_atomic(out_dir / "yolo" / "classes.txt", "".join(n + "\n" for n in names))
