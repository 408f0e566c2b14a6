"""Mask export formats: RLE, polygons, shapely, overlays, PNG and JSON records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segapp.errors import InputError
from segapp.export import (
    mask_bbox,
    mask_color,
    mask_record,
    mask_to_polygons,
    mask_to_rle,
    mask_to_shapely,
    overlay,
    polygons_to_mask,
    rle_to_mask,
    save_png,
)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _disc(height: int, width: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _rect(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((height, width), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _l_shape() -> np.ndarray:
    m = _rect(60, 50, 5, 55, 5, 20)
    m[40:55, 5:45] = True
    return m


def _ring_mask() -> np.ndarray:
    return _disc(120, 130, 60, 65, 45) & ~_disc(120, 130, 60, 65, 18)


_RNG = np.random.default_rng(1)
RLE_CASES = {
    "empty": np.zeros((7, 5), dtype=bool),
    "full": np.ones((9, 13), dtype=bool),
    "random_odd": _RNG.random((31, 17)) > 0.5,
    "random_wide": _RNG.random((3, 101)) > 0.7,
    "single_pixel": _rect(11, 1, 4, 5, 0, 1),
    "uint8_0_255": (_RNG.random((16, 16)) > 0.5).astype(np.uint8) * 255,
}


@pytest.mark.parametrize("name", sorted(RLE_CASES))
def test_rle_matches_pycocotools(name: str) -> None:
    mask = RLE_CASES[name]
    rle = mask_to_rle(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    reference = mask_utils.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
    assert rle["counts"] == reference["counts"].decode("ascii")
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), mask > 0)
    np.testing.assert_array_equal(rle_to_mask(rle), mask > 0)
    json.dumps(rle)


def test_rle_to_mask_accepts_uncompressed_counts() -> None:
    mask = _rect(4, 3, 1, 3, 1, 2)
    # column-major runs: 5 zeros, 2 ones, 5 zeros
    assert rle_to_mask({"size": [4, 3], "counts": [5, 2, 5]}).tolist() == mask.tolist()


def test_rle_to_mask_rejects_garbage() -> None:
    with pytest.raises(InputError):
        rle_to_mask({"counts": "abc"})


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (np.zeros((5, 5), bool), [0, 0, 0, 0]),
        (_rect(20, 30, 3, 9, 4, 17), [4, 3, 17, 9]),
        (np.ones((6, 7), bool), [0, 0, 7, 6]),
        (_l_shape(), [5, 5, 45, 55]),
    ],
)
def test_mask_bbox(mask: np.ndarray, expected: list[int]) -> None:
    assert mask_bbox(mask) == expected


@pytest.mark.parametrize(
    "mask",
    [
        _disc(80, 90, 40, 45, 30),
        _disc(41, 37, 20, 18, 6.5),
        _rect(50, 60, 10, 40, 5, 50),
        _l_shape(),
    ],
    ids=["disc", "small_disc", "rectangle", "l_shape"],
)
def test_polygons_rasterize_back(mask: np.ndarray) -> None:
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 1
    assert all(len(p) >= 3 and p[0] != p[-1] for p in polygons)
    back = polygons_to_mask(polygons, *mask.shape)
    assert back.shape == mask.shape
    assert _iou(back, mask) >= 0.95


def test_polygons_two_regions_and_tiny_dropped() -> None:
    mask = _rect(40, 40, 2, 12, 2, 12) | _rect(40, 40, 20, 35, 20, 38)
    mask[38, 0] = True  # one pixel: below min_area
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    assert _iou(polygons_to_mask(polygons, 40, 40), mask) >= 0.95


def test_polygons_of_mask_with_hole_fill_it() -> None:
    ring = _ring_mask()
    polygons = mask_to_polygons(ring)
    assert len(polygons) == 1  # outer ring only
    filled = polygons_to_mask(polygons, *ring.shape)
    assert _iou(filled, _disc(120, 130, 60, 65, 45)) >= 0.95


def test_shapely_keeps_hole() -> None:
    ring = _ring_mask()
    geometry = mask_to_shapely(ring)
    assert geometry.geom_type == "Polygon" and geometry.is_valid
    assert len(geometry.interiors) == 1
    assert geometry.area == pytest.approx(ring.sum(), rel=0.05)
    assert not geometry.contains(geometry.centroid)  # the centre is in the hole


def test_shapely_multipolygon_island_and_empty() -> None:
    mask = _ring_mask() | _disc(120, 130, 60, 65, 6)  # island inside the hole
    geometry = mask_to_shapely(mask)
    assert geometry.geom_type == "MultiPolygon"
    assert len(geometry.geoms) == 2
    assert geometry.area == pytest.approx(mask.sum(), rel=0.05)
    assert mask_to_shapely(np.zeros((4, 4), bool)).is_empty


def test_mask_record_is_json_row() -> None:
    mask = _rect(30, 40, 5, 15, 10, 30)
    record = mask_record(mask, label="cup", score=np.float32(0.876543))
    assert list(record) == ["label", "score", "bbox", "area", "rle", "polygons"]
    assert record["bbox"] == [10, 5, 30, 15]
    assert record["area"] == 200
    assert record["score"] == 0.8765
    text = json.dumps(record)
    again = json.loads(text)
    assert again == record
    np.testing.assert_array_equal(rle_to_mask(again["rle"]), mask)
    empty = mask_record(np.zeros((3, 3), bool), label="none", score=0.1)
    assert empty["bbox"] == [0, 0, 0, 0] and empty["polygons"] == [] and empty["area"] == 0
    with pytest.raises(InputError):
        mask_record(mask, label="cup", score=float("nan"))


def test_overlay_tints_only_masks_and_labels() -> None:
    image = np.full((100, 120, 3), 128, dtype=np.uint8)
    first, second = _rect(100, 120, 10, 40, 10, 50), _disc(100, 120, 70, 80, 15)
    out = overlay(image, [first, second], ["a", "b"], alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[90:, :5], image[90:, :5])  # untouched background
    inside_first = out[30, 40].astype(int)
    expected = (np.array(mask_color(0)) * 0.5 + 64).round()
    assert np.abs(inside_first - expected).max() <= 1
    assert not np.array_equal(out[70, 80], out[30, 40])  # distinct colours
    assert not np.array_equal(out[10:20, 10:30], overlay(image, [first, second])[10:20, 10:30])
    assert mask_color(0) != mask_color(1) != mask_color(12)


def test_overlay_rejects_mismatched_mask() -> None:
    with pytest.raises(InputError):
        overlay(np.zeros((10, 10, 3), np.uint8), [np.zeros((5, 5), bool)])


def test_save_png_atomic_and_modes(tmp_path: Path) -> None:
    mask = _disc(20, 30, 10, 15, 6)
    path = tmp_path / "sub" / "mask.png"
    save_png(path, mask)
    with Image.open(path) as im:
        assert im.mode == "L"
        loaded = np.array(im)
    assert set(np.unique(loaded)) == {0, 255}
    np.testing.assert_array_equal(loaded == 255, mask)
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    save_png(path, rgb)  # replaces the file in place
    with Image.open(path) as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.array(im), rgb)
    assert sorted(p.name for p in path.parent.iterdir()) == ["mask.png"]  # no temp left
    with pytest.raises(InputError):
        save_png(tmp_path / "bad.png", np.zeros((4, 4, 3), dtype=np.float32))
    assert not (tmp_path / "bad.png").exists()
