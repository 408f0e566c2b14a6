"""ReasonSeg-format round trip and error reporting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segapp.data.instructions import generate_sample
from segapp.data.reasonseg import read_dir, read_item, write_sample, write_split
from segapp.errors import InputError


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.mark.parametrize("index", [0, 5, 6])  # referring, multi, none
def test_round_trip(tmp_path: Path, index: int) -> None:
    sample = generate_sample("val", index)
    json_path = write_sample(tmp_path, f"s{index}", sample)
    item = read_item(json_path)
    assert item.image_path == tmp_path / f"s{index}.png"
    assert np.array_equal(item.load_image(), sample.image)
    assert item.texts == [sample.instruction]
    assert (item.kind, item.answer, item.is_sentence) == (
        sample.kind,
        sample.answer,
        sample.is_sentence,
    )
    union = np.asarray(sample.target_masks.any(axis=0))
    assert set(np.unique(item.gt)) <= {0, 1}
    assert _iou(item.gt == 1, union) >= 0.97
    assert len(item.instances) == sample.target_masks.shape[0]
    for got, want in zip(item.instances, sample.target_masks, strict=True):
        assert _iou(got, want) >= 0.97
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_ignore_region_is_drawn_after_targets(tmp_path: Path) -> None:
    sample = generate_sample("train", 0)
    ignore = np.zeros(sample.image.shape[:2], bool)
    ignore[:20, :20] = True
    sample.ignore = ignore
    item = read_item(write_sample(tmp_path, "ign", sample))
    assert (item.gt[:20, :20] == 255).all()
    assert (item.gt[20:, 20:] != 255).all()


def test_write_split_and_read_dir(tmp_path: Path) -> None:
    assert write_split(tmp_path, "test", 3, progress=False) == 3
    items = list(read_dir(tmp_path))
    assert [i.image_path.name for i in items] == [f"test_{i:06d}.png" for i in range(3)]


def test_reader_tolerates_plain_reasonseg(tmp_path: Path) -> None:
    sample = generate_sample("train", 1)
    json_path = write_sample(tmp_path, "plain", sample)
    record = json.loads(json_path.read_text())
    for key in ("kind", "answer"):
        record.pop(key)
    for shape in record["shapes"]:
        shape["group_id"] = None
    json_path.write_text(json.dumps(record))
    item = read_item(json_path)
    assert item.kind is None and item.answer is None
    assert len(item.instances) == 1
    assert _iou(item.gt == 1, np.asarray(sample.target_masks.any(axis=0))) >= 0.97


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    write_sample(tmp_path, "bad", generate_sample("train", 2))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError) as err:
        read_item(bad)
    assert "bad.json" in str(err.value)


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"text": ["x"], "shapes": []}))
    with pytest.raises(InputError) as err:
        read_item(orphan)
    assert "orphan.json" in str(err.value)
