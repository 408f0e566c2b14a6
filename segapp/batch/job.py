"""What a batch run is: the job settings, the work units found in the input, output paths.

A *unit* is one image with the instructions to ask about it (the image is encoded once per
unit). Units come from walking the input folder (one ``--prompt`` for every image) or from a
JSONL manifest of ``{"image": ..., "instruction": ...}`` rows; their order is the order of the
outputs. Paths in outputs are relative to the input folder, with ``/`` separators.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from segapp.errors import InputError
from segapp.images import MAX_PIXELS_DEFAULT, check_instruction

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = ("png", "coco", "polygons", "yolo", "overlay")
DEFAULT_FORMATS = ("png", "coco", "polygons", "yolo")
MAX_DIRS = 1_000_000  # bound on the folder walk


@dataclass(frozen=True)
class BatchJob:
    """Settings of one `segapp batch` run (see `segapp batch --help`)."""

    input_dir: Path
    out_dir: Path
    prompt: str | None = None  # one instruction for every image found under input_dir ...
    prompts_file: Path | None = None  # ... or a JSONL manifest of (image, instruction) rows
    model: str = "tiny"  # preset name or weights directory
    device: str = "cpu"
    formats: tuple[str, ...] = DEFAULT_FORMATS
    batch_size: int = 8  # images per encoder call
    workers: int = 2  # loader threads of the local engine
    threads: int = 0  # torch threads for the model; 0 = all cores but one (CPU), else default
    max_new_tokens: int = 48
    max_pixels: int = MAX_PIXELS_DEFAULT
    resume: bool = False
    progress: bool = True
    ray_address: str | None = None  # Ray cluster address; None = a local Ray instance
    ray_actors: int = 1  # model actors in the Ray pipeline

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompts_file is None):
            raise InputError("give exactly one of --prompt or --prompts", "segapp batch")
        if self.batch_size < 1:
            raise InputError(
                f"batch size must be at least 1, got {self.batch_size}", "--batch-size"
            )
        if self.workers < 1:
            raise InputError(f"workers must be at least 1, got {self.workers}", "--workers")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown or not self.formats:
            raise InputError(
                f"unknown format {unknown[0] if unknown else '(none)'}: use a comma list of "
                + ",".join(FORMATS),
                "--formats",
            )

    def signature(self) -> dict[str, object]:
        """What decides the outputs (stored in job.json; `--resume` must match it)."""
        manifest = None
        if self.prompts_file is not None:
            manifest = hashlib.sha1(Path(self.prompts_file).read_bytes()).hexdigest()
        return {
            "input": str(Path(self.input_dir).resolve()),
            "prompt": self.prompt,
            "prompts_sha1": manifest,
            "model": self.model,
            "formats": sorted(self.formats),
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass(frozen=True)
class Unit:
    """One image and the instructions to ask about it."""

    index: int  # position in the job: outputs follow this order
    rel: str  # path relative to the input folder, "/"-separated
    path: str  # where to read it
    instructions: tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    """An input that could not become work (logged to errors.jsonl)."""

    rel: str
    error: str
    instruction: str | None = None

    def to_dict(self) -> dict[str, str]:
        row = {"image": self.rel, "error": self.error}
        if self.instruction is not None:
            row["instruction"] = self.instruction
        return row


@dataclass
class Discovery:
    units: list[Unit] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: int = 0  # files without an image suffix


def instruction_id(instruction: str) -> str:
    """Short stable id of an instruction, used in output file names."""
    return hashlib.sha1(instruction.encode("utf-8")).hexdigest()[:8]


def mask_file(rel: str, instruction: str, index: int) -> str:
    """``masks/<rel>/<instruction id>_<index>.png`` (relative to the output folder)."""
    return f"masks/{rel}/{instruction_id(instruction)}_{index}.png"


def overlay_file(rel: str, instruction: str) -> str:
    return f"overlays/{rel}/{instruction_id(instruction)}.png"


def polygons_file(rel: str) -> str:
    return f"polygons/{rel}.geojson"


def _printable(name: str) -> str:
    """A file name that may hold undecodable bytes, as text that JSON can carry."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _stat_error(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT:
        return "broken symlink (its target does not exist)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot read: {exc.strerror or exc}"


def discover(job: BatchJob) -> Discovery:
    """The units of `job` in output order, plus inputs that cannot be processed."""
    root = Path(job.input_dir)
    if not root.is_dir():
        raise InputError("not a folder" if root.exists() else "no such folder", str(root))
    if job.prompt is not None:
        instruction = check_instruction(job.prompt)
        return _walk(root, instruction, Path(job.out_dir))
    assert job.prompts_file is not None
    return _manifest(root, Path(job.prompts_file))


def _walk(root: Path, instruction: str, out_dir: Path) -> Discovery:
    """Every image file under `root` (sorted, depth first; symlinked folders followed once).

    Hidden names (leading ".") and the output folder are skipped; a folder link back to an
    ancestor is reported as a symlink loop instead of followed.
    """
    found = Discovery()
    skip = set()
    if out_dir.exists():
        st = out_dir.stat()
        skip.add((st.st_dev, st.st_ino))
    root_stat = root.stat()
    stack: list[tuple[Path, str, tuple[tuple[int, int], ...]]] = [
        (root, "", ((root_stat.st_dev, root_stat.st_ino),))
    ]
    visited = 0
    while stack:
        folder, prefix, ancestors = stack.pop()
        visited += 1
        if visited > MAX_DIRS:
            raise InputError(f"more than {MAX_DIRS} folders under the input", str(root))
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            found.problems.append(Problem(prefix.rstrip("/") or ".", _stat_error(exc)))
            continue
        subdirs = []
        for name in names:
            if name.startswith("."):
                continue
            rel = _printable(prefix + name)
            path = folder / name
            try:
                st = path.stat()  # follows links: a loop or dangling link raises here
            except OSError as exc:
                found.problems.append(Problem(rel, _stat_error(exc)))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    found.problems.append(Problem(rel, "symlink loop (links to a parent folder)"))
                elif key not in skip:
                    subdirs.append((path, rel + "/", (*ancestors, key)))
            elif not name.lower().endswith(IMAGE_SUFFIXES):
                found.ignored += 1
            else:
                found.units.append(Unit(len(found.units), rel, str(path), (instruction,)))
        stack.extend(reversed(subdirs))
    return found


def _manifest(root: Path, manifest: Path) -> Discovery:
    """Units from JSONL rows ``{"image": path relative to root, "instruction": text}``.

    Rows for the same image are grouped into one unit, at the image's first row; repeated
    (image, instruction) pairs are asked once.
    """
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the prompts file: {exc}", str(manifest)) from None
    found = Discovery()
    by_image: dict[str, list[str]] = {}
    real_root = root.resolve()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{manifest}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON: {exc.msg}", where) from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise InputError('each line needs "image" (a path) and "instruction" (text)', where)
        if not isinstance(row.get("instruction"), str):
            raise InputError('each line needs "instruction" (text)', where)
        rel = _relative(real_root, root, row["image"], where)
        try:
            instruction = check_instruction(row["instruction"])
        except InputError as exc:
            found.problems.append(Problem(rel, exc.what, row["instruction"]))
            continue
        wanted = by_image.setdefault(rel, [])
        if instruction not in wanted:
            wanted.append(instruction)
    for index, (rel, instructions) in enumerate(by_image.items()):
        found.units.append(Unit(index, rel, str(root / rel), tuple(instructions)))
    return found


def _relative(real_root: Path, root: Path, image: str, where: str) -> str:
    """`image` as a clean path relative to the input folder (absolute ones must lie inside)."""
    path = Path(image)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(real_root)
        except ValueError:
            raise InputError(f"image {image!r} is outside the input folder {root}", where) from None
    parts = PurePosixPath(path.as_posix()).parts
    if not parts or ".." in parts:
        raise InputError(f"image {image!r} must be a path inside the input folder", where)
    return "/".join(p for p in parts if p != ".")
