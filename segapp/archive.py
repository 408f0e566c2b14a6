"""Zip in, zip out for batch requests from the UI and the REST server (bounded, no path escapes)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

from segapp.batch.job import IMAGE_SUFFIXES
from segapp.errors import InputError

MAX_FILES = 1000
MAX_UNPACKED_BYTES = 512 * 1024 * 1024


def unpack_images(data: bytes, dest: Path) -> int:
    """Extract the image files of a zip archive into `dest`; returns how many.

    Members with absolute paths or `..` parts, hidden names and non-image files are skipped;
    more than MAX_FILES images or MAX_UNPACKED_BYTES in all is refused.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise InputError(f"not a zip archive: {exc}", "zip") from None
    count, total = 0, 0
    with archive:
        for info in archive.infolist():
            path = PurePosixPath(info.filename)
            if info.is_dir() or path.is_absolute() or ".." in path.parts:
                continue
            if any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            count += 1
            total += info.file_size
            if count > MAX_FILES or total > MAX_UNPACKED_BYTES:
                raise InputError(
                    f"archive too large: limit is {MAX_FILES} images and "
                    f"{MAX_UNPACKED_BYTES // 2**20} MiB unpacked",
                    "zip",
                )
            target = dest.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(info))
    if count == 0:
        raise InputError("the archive holds no images (jpg/png/webp/bmp/tif)", "zip")
    return count


def pack_folder(folder: Path) -> bytes:
    """Every file under `folder` as a zip archive (paths relative to it, sorted)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()
