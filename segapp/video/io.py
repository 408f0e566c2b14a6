"""Reading videos with OpenCV: a video file or a folder of frame images, streamed frame by frame.

Frames come out as H x W x 3 uint8 RGB arrays from a generator, one at a time, so memory does
not grow with the length of the video. Bad input raises `InputError` with a clear message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segapp.errors import InputError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_FRAME_PIXELS = 40_000_000  # 8K UHD is 33 M


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` found: frame count (decoded, not the container's claim), fps, size."""

    path: Path
    frames: int
    fps: float
    size: tuple[int, int]  # (H, W)
    is_folder: bool


def _natural_key(path: Path) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name.lower())]


def frame_files(folder: Path) -> list[Path]:
    """Image files of a frame folder in natural order (frame2 before frame10)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES]
    return sorted(files, key=_natural_key)


def _read_image(path: Path) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise InputError("cannot decode frame image", str(path))
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_size(shape: tuple[int, ...], where: str, max_pixels: int) -> None:
    if shape[0] * shape[1] > max_pixels:
        raise InputError(
            f"frames of {shape[1]}x{shape[0]} exceed the limit of {max_pixels} pixels", where
        )


def _open(path: Path) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise InputError("cannot open the video (unknown format or corrupt file)", str(path))
    return cap


def probe_video(path: str | Path, *, max_pixels: int = MAX_FRAME_PIXELS) -> VideoInfo:
    """Count the frames of a video file or frame folder and read the frame size.

    The count comes from decoding (`grab`), because containers often misreport it.
    Raises `InputError` for a missing path, an empty folder, an unreadable or empty video.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such video file or frame folder", str(path))
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise InputError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in folder", str(path))
        first = _read_image(files[0])
        _check_size(first.shape, str(files[0]), max_pixels)
        return VideoInfo(path, len(files), 0.0, (first.shape[0], first.shape[1]), True)
    if path.stat().st_size == 0:
        raise InputError("the video file is empty", str(path))
    cap = _open(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        ok, frame = cap.read()
        if not ok or frame is None:
            raise InputError("the video has no decodable frames (empty or corrupt)", str(path))
        _check_size(frame.shape, str(path), max_pixels)
        count = 1
        while cap.grab():
            count += 1
    finally:
        cap.release()
    return VideoInfo(path, count, fps if fps > 0 else 0.0, (frame.shape[0], frame.shape[1]), False)


def iter_frames(
    path: str | Path, indices: Iterable[int] | None = None, *, max_pixels: int = MAX_FRAME_PIXELS
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, H x W x 3 uint8 RGB) for every frame, or only for the sorted `indices`.

    Streams: one decoded frame is alive at a time (skipped frames are grabbed, not decoded
    into RGB). Every frame must have the size of the first one.
    """
    path = Path(path)
    wanted = None if indices is None else sorted(set(indices))
    if path.is_dir():
        files = frame_files(path)
        size: tuple[int, ...] | None = None
        for i in wanted if wanted is not None else range(len(files)):
            if i >= len(files):
                break
            rgb = _read_image(files[i])
            size = size or rgb.shape
            if rgb.shape != size:
                raise InputError(
                    f"frame size {rgb.shape[1]}x{rgb.shape[0]} differs from the first frame's "
                    f"{size[1]}x{size[0]}",
                    str(files[i]),
                )
            _check_size(rgb.shape, str(files[i]), max_pixels)
            yield i, rgb
        return
    cap = _open(path)
    try:
        want = set(wanted) if wanted is not None else None
        last = max(wanted) if wanted else None
        i = 0
        first: tuple[int, ...] | None = None
        while True:
            if last is not None and i > last:
                break
            if want is not None and i not in want:
                if not cap.grab():
                    break
                i += 1
                continue
            ok, bgr = cap.read()
            if not ok or bgr is None:
                break
            first = first or bgr.shape
            if bgr.shape != first:
                raise InputError(f"frame {i} changes size mid-video", str(path))
            _check_size(bgr.shape, str(path), max_pixels)
            yield i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            i += 1
    finally:
        cap.release()


class VideoWriter:
    """Opens lazily on the first frame (its size fixes the video's); RGB in."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = fps if fps > 0 else 10.0
        self._writer: cv2.VideoWriter | None = None

    def write(self, rgb: np.ndarray) -> None:
        if self._writer is None:
            h, w = rgb.shape[:2]
            for suffix, codec in ((self.path.suffix or ".mp4", "mp4v"), (".avi", "MJPG")):
                target = self.path.with_suffix(suffix)
                writer = cv2.VideoWriter(
                    str(target), cv2.VideoWriter.fourcc(*codec), self.fps, (w, h)
                )
                if writer.isOpened():
                    self.path, self._writer = target, writer
                    break
                writer.release()
            if self._writer is None:
                raise InputError("no video encoder available (mp4v, MJPG)", str(self.path))
        self._writer.write(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
