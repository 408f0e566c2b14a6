"""Image and instruction input: every file or array a user hands in passes through here.

``load_image`` returns an ``H x W x 3`` uint8 RGB array in display orientation (EXIF applied),
so masks computed on it align with what the user sees. Bad input raises ``InputError`` with
a one-line message for people and ``where`` = the path (or ``"image bytes"``).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from segapp.errors import InputError

MAX_PIXELS_DEFAULT = 40_000_000
MAX_INSTRUCTION_CHARS = 2000

# Errors PIL raises for corrupt, truncated or unsupported data.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
# Modes with an alpha channel (or transparency) that are composited on white.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Modes holding more than 8 bits per sample: scaled by the image's actual range.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}

_limit_lock = threading.Lock()
_limit_users = 0
_limit_saved: int | None = None


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Switch off PIL's global bomb check while any ``load_image`` call runs.

    ``load_image`` checks the header size against its own ``max_pixels`` before decoding, so
    PIL's fixed limit (which would refuse or warn first, without the size) is lifted for the
    duration of the call and restored when the last concurrent call leaves.
    """
    global _limit_users, _limit_saved
    with _limit_lock:
        if _limit_users == 0:
            _limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _limit_saved


def _too_large(width: int, height: int, max_pixels: int, where: str) -> InputError:
    return InputError(
        f"image too large: {width}x{height} pixels, limit is {max_pixels} "
        "(raise it with --max-pixels)",
        where,
    )


def load_image(source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Read an image file (or encoded bytes) into an ``H x W x 3`` uint8 RGB array.

    The size is checked from the header before any pixel is decoded; images with more than
    ``max_pixels`` pixels are refused. EXIF orientation is applied; multi-frame files give
    their first frame. Mode conversion follows ``to_rgb_array``.
    """
    if max_pixels <= 0:
        raise InputError(f"max pixels must be positive, got {max_pixels}", "--max-pixels")
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = "image bytes"
        if len(source) == 0:
            raise InputError("empty image data (0 bytes)", where)
        return _decode(io.BytesIO(bytes(source)), where, max_pixels)
    path = Path(source).expanduser()
    where = str(source)
    if not path.exists():
        raise InputError("no such file", where)
    if path.is_dir():
        raise InputError("is a directory, not an image file", where)
    try:
        if path.stat().st_size == 0:
            raise InputError("empty file (0 bytes), not an image", where)
        fp = path.open("rb")
    except PermissionError as exc:
        raise InputError("permission denied", where) from exc
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", where) from exc
    with fp:
        return _decode(fp, where, max_pixels)


def _decode(fp: IO[bytes], where: str, max_pixels: int) -> np.ndarray:
    with _own_pixel_limit():
        try:
            im = Image.open(fp)  # lazy: parses the header only
        except Image.UnidentifiedImageError as exc:
            raise InputError("not an image file (unrecognised format)", where) from exc
        except _BOMB_ERRORS as exc:
            raise InputError(f"image too large: {exc}", where) from exc
        except _PIL_ERRORS as exc:
            raise InputError(f"not a readable image file: {exc}", where) from exc
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise _too_large(width, height, max_pixels, where)
            if width == 0 or height == 0:
                raise InputError(f"image has no pixels ({width}x{height})", where)
            try:
                im.load()  # first frame; raises on truncation (LOAD_TRUNCATED_IMAGES is off)
            except _BOMB_ERRORS as exc:
                raise InputError(f"image too large: {exc}", where) from exc
            except _PIL_ERRORS as exc:
                raise InputError(
                    f"cannot decode image, file is truncated or corrupt: {exc}", where
                ) from exc
            if im.size[0] * im.size[1] > max_pixels:  # a frame may differ from the header
                raise _too_large(im.size[0], im.size[1], max_pixels, where)
            try:
                shown = ImageOps.exif_transpose(im)
            except _PIL_ERRORS:  # unreadable EXIF: keep the stored orientation
                shown = im
            return _pil_to_rgb(shown, where)


def check_instruction(text: str) -> str:
    """Return ``text`` stripped; refuse an empty one or one over ``MAX_INSTRUCTION_CHARS``."""
    if not isinstance(text, str):
        raise InputError(f"instruction must be text, got {type(text).__name__}", "instruction")
    stripped = text.strip()
    if not stripped:
        raise InputError("instruction is empty", "instruction")
    if len(stripped) > MAX_INSTRUCTION_CHARS:
        raise InputError(
            f"instruction too long: {len(stripped)} characters, limit is {MAX_INSTRUCTION_CHARS}",
            "instruction",
        )
    return stripped


def as_rgb(image: Any, *, max_pixels: int = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Encoded bytes, a path, a PIL image or an array -> H x W x 3 uint8 (size checked)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return load_image(bytes(image), max_pixels=max_pixels)
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels=max_pixels)
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    if height * width > max_pixels:
        raise InputError(
            f"image too large: {width}x{height} pixels, limit is {max_pixels}", "image"
        )
    return rgb


def mask_from_array(mask: np.ndarray) -> np.ndarray:
    """A painted or loaded mask -> H x W bool: any channel above half (soft brush edges count)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m > (127 if m.dtype == np.uint8 else 0)


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """Normalise an array or PIL image to ``H x W x 3`` uint8 RGB.

    Arrays may be ``H x W`` or ``H x W x 1/3/4`` of bool, uint8, wider integers or floats.
    uint8 is taken as is, bool as 0/255; other types are scaled to 0..255 by their actual
    min..max over the colour channels (a constant image maps to its value relative to the
    nominal range: 0..65535 for 16-bit integers, 0..1 for floats). A 4th channel is alpha,
    composited on white (uint8 alpha 0..255, integer alpha 0..dtype max, float alpha 0..1).
    PIL images are converted by mode (L/P/1/CMYK/YCbCr/...); EXIF orientation is not applied
    here (``load_image`` does that for files).
    """
    if isinstance(image, Image.Image):
        try:
            image.load()
        except _PIL_ERRORS as exc:
            raise InputError(f"cannot decode image: {exc}", "image") from exc
        return _pil_to_rgb(image, "image")
    if not isinstance(image, np.ndarray):
        raise InputError(
            f"expected a numpy array or PIL image, got {type(image).__name__}", "image"
        )
    return _array_to_rgb(image, "image")


def _pil_to_rgb(im: Image.Image, where: str) -> np.ndarray:
    mode = im.mode
    try:
        if mode == "RGB":
            return np.array(im, dtype=np.uint8)
        if mode in _WIDE_MODES:
            return _array_to_rgb(np.array(im), where)
        if mode in _ALPHA_MODES or "transparency" in im.info:
            return _composite_on_white(np.array(im.convert("RGBA")))
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except _PIL_ERRORS as exc:
        raise InputError(f"unsupported image mode {mode}: {exc}", where) from exc


def _array_to_rgb(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InputError(
            f"expected an H x W or H x W x 1/3/4 image array, got shape {tuple(array.shape)}",
            where,
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"image has no pixels (shape {tuple(array.shape)})", where)
    if array.dtype.kind not in "buif":
        raise InputError(f"unsupported image dtype {array.dtype}", where)
    alpha = None
    if array.ndim == 3 and array.shape[2] == 4:
        array, alpha = array[:, :, :3], _alpha_to_unit(array[:, :, 3])
    if array.dtype == np.uint8:
        rgb = array
    elif array.dtype == np.bool_:
        rgb = array.astype(np.uint8) * 255
    else:
        rgb = _scale_to_uint8(array)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if alpha is not None:
        blended = rgb.astype(np.float32) * alpha[:, :, None] + 255.0 * (1.0 - alpha[:, :, None])
        rgb = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _alpha_to_unit(alpha: np.ndarray) -> np.ndarray:
    """Alpha channel -> float32 in 0..1 by its nominal range (not min-max)."""
    if alpha.dtype == np.bool_:
        return alpha.astype(np.float32)
    if alpha.dtype.kind in "ui":
        top = 255.0 if alpha.dtype == np.uint8 else float(np.iinfo(alpha.dtype).max)
        return np.clip(alpha.astype(np.float64) / top, 0.0, 1.0).astype(np.float32)
    unit = np.nan_to_num(alpha.astype(np.float64), nan=1.0, posinf=1.0, neginf=0.0)
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max scale a wide integer or float array to uint8 (non-finite values become 0)."""
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, dtype=np.uint8)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:  # constant image: its value relative to the nominal range
        top = (
            1.0
            if array.dtype.kind == "f"
            else (65535.0 if hi <= 65535 else float(np.iinfo(array.dtype).max))
        )
        scaled = np.full(values.shape, min(max(lo / top, 0.0), 1.0) * 255.0)
    scaled = np.where(finite, scaled, 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    return _array_to_rgb(rgba.astype(np.uint8), "image")
