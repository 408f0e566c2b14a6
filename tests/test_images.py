"""Image loading and instruction checks on real files written with PIL."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segapp.errors import InputError
from segapp.images import (
    MAX_INSTRUCTION_CHARS,
    check_instruction,
    load_image,
    to_rgb_array,
)


def _rgb_pattern(height: int = 24, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny 1x1 PNG whose IHDR claims ``width x height`` (decoding it would fail)."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr_at = data.index(b"IHDR")
    body = struct.pack(">II", width, height) + bytes(data[ihdr_at + 12 : ihdr_at + 17])
    data[ihdr_at + 4 : ihdr_at + 17] = body
    data[ihdr_at + 17 : ihdr_at + 21] = struct.pack(">I", zlib.crc32(b"IHDR" + body))
    return bytes(data)


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    pixels = _rgb_pattern()
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, pixels)
    np.testing.assert_array_equal(load_image(path.read_bytes()), pixels)
    np.testing.assert_array_equal(load_image(str(path)), pixels)


def test_grayscale_png(tmp_path: Path) -> None:
    gray = _rgb_pattern()[:, :, 0]
    path = tmp_path / "g.png"
    Image.fromarray(gray, mode="L").save(path)
    out = load_image(path)
    assert out.shape == (24, 32, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red-ish
    rgba[0, 0, 3] = 255  # opaque
    rgba[0, 1, 3] = 0  # fully transparent -> white
    rgba[0, 2, 3] = 128  # half
    path = tmp_path / "t.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = load_image(path)
    assert out[0, 0].tolist() == [200, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == pytest.approx([228, 127, 127], abs=1)


def test_palette_png(tmp_path: Path) -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:4] = (255, 0, 0)
    pixels[4:] = (0, 0, 255)
    path = tmp_path / "p.png"
    Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    assert Image.open(path).mode == "P"
    out = load_image(path)
    np.testing.assert_array_equal(out, pixels)


def test_16bit_png_scaled_by_actual_range(tmp_path: Path) -> None:
    values = np.linspace(0, 4095, 64 * 8).reshape(8, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert out.shape == (8, 64, 3)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[:, :, 0].ravel().astype(int)) >= 0)  # order is kept


def test_exif_orientation_applied(tmp_path: Path) -> None:
    stored = np.full((20, 40, 3), 255, dtype=np.uint8)
    stored[:6, :6] = (255, 0, 0)  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == (40, 20, 3)
    top_right = out[1:5, -5:-1].reshape(-1, 3).mean(axis=0)
    top_left = out[1:5, 1:5].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[1] < 60  # red marker displays top-right
    assert top_left.min() > 200  # white


def test_first_frame_of_gif(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = load_image(path)
    assert out.shape == (10, 10, 3)
    assert out[5, 5].tolist() == [255, 0, 0]


def _write_truncated(path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb_pattern(64, 64)).save(buf, format=fmt)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("name", "make", "words"),
    [
        ("empty.png", lambda p: p.write_bytes(b""), "empty"),
        ("text.png", lambda p: p.write_text("hello, I am not a picture\n"), "not an image"),
        ("cut.png", lambda p: _write_truncated(p, "PNG"), "truncated"),
        ("cut.jpg", lambda p: _write_truncated(p, "JPEG"), "truncated"),
    ],
)
def test_bad_files_raise_input_error(tmp_path: Path, name: str, make, words: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(InputError) as info:
        load_image(path)
    assert words in info.value.what
    assert info.value.where == str(path)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError, match="no such file") as info:
        load_image(missing)
    assert info.value.where == str(missing)
    with pytest.raises(InputError, match="directory") as info:
        load_image(tmp_path)
    assert info.value.where == str(tmp_path)


def test_huge_header_refused_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(_png_with_header_size(20000, 20000))
    assert path.stat().st_size < 1000
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with pytest.raises(InputError, match="too large") as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0
    assert "20000x20000" in info.value.what and "40000000" in info.value.what
    assert info.value.where == str(path)
    assert limit_before == Image.MAX_IMAGE_PIXELS  # PIL's global is restored


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.fromarray(_rgb_pattern(40, 50)).save(path)
    with pytest.raises(InputError, match="50x40 pixels, limit is 1999"):
        load_image(path, max_pixels=1999)
    assert load_image(path, max_pixels=2000).shape == (40, 50, 3)


@pytest.mark.parametrize("text", ["", "   ", "\n\t  "])
def test_empty_instruction(text: str) -> None:
    with pytest.raises(InputError, match="empty"):
        check_instruction(text)


def test_long_instruction_names_length_and_limit() -> None:
    with pytest.raises(InputError) as info:
        check_instruction("x" * 10_000)
    assert "10000" in info.value.what and str(MAX_INSTRUCTION_CHARS) in info.value.what


def test_instruction_is_stripped() -> None:
    assert check_instruction("  segment the cup \n") == "segment the cup"
    assert check_instruction("y" * MAX_INSTRUCTION_CHARS) == "y" * MAX_INSTRUCTION_CHARS


@pytest.mark.parametrize(
    ("array", "expected_first"),
    [
        (np.full((3, 4), 7, dtype=np.uint8), [7, 7, 7]),
        (np.ones((3, 4, 1), dtype=bool), [255, 255, 255]),
        (np.dstack([np.full((3, 4), v, np.uint8) for v in (1, 2, 3)]), [1, 2, 3]),
    ],
)
def test_to_rgb_array_shapes(array: np.ndarray, expected_first: list[int]) -> None:
    out = to_rgb_array(array)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == expected_first


def test_to_rgb_array_scales_wide_and_float_arrays() -> None:
    wide = np.array([[100, 300], [500, 1100]], dtype=np.uint16)
    assert to_rgb_array(wide)[:, :, 0].tolist() == [[0, 51], [102, 255]]
    floats = np.array([[0.25, 0.5], [0.75, np.nan]], dtype=np.float32)
    out = to_rgb_array(floats)[:, :, 0]
    assert out.tolist() == [[0, 128], [255, 0]]
    constant = to_rgb_array(np.full((2, 2), 0.5, dtype=np.float32))
    assert np.unique(constant).size == 1


def test_to_rgb_array_float_rgba_alpha_and_pil() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.float32)
    rgba[..., 0] = np.array([[0.0, 1.0], [0.5, 1.0]])
    rgba[..., 3] = np.array([[1.0, 1.0], [1.0, 0.0]])
    out = to_rgb_array(rgba)
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[1, 1].tolist() == [255, 255, 255]  # transparent -> white
    pil = Image.new("CMYK", (5, 3), (0, 255, 255, 0))
    assert to_rgb_array(pil)[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "bad", [np.zeros((2, 3, 5), np.uint8), np.zeros((0, 4), np.uint8), np.zeros(4), "a.png"]
)
def test_to_rgb_array_rejects_bad_input(bad) -> None:
    with pytest.raises(InputError):
        to_rgb_array(bad)
