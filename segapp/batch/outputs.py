"""Per-unit outputs and the run's journal: results.jsonl, errors.jsonl, job.json.

Crash safety: every file is written to a temp file in its folder and renamed into place; a
unit's mask files are written before its rows are appended to results.jsonl, so a row always
points at complete files. On `--resume`, results.jsonl is cut back to its last complete line,
leftover temp files are removed, and the (image, instruction) pairs found in it are skipped.
errors.jsonl is rewritten by every run (failed inputs are tried again on resume).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any

from segapp.batch.infer import UnitOutput
from segapp.batch.job import BatchJob, Problem, mask_file, overlay_file
from segapp.errors import InputError
from segapp.export import atomic_write, overlay, save_png

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
JOB = "job.json"


def dumps(row: Any) -> str:
    """One JSON line as segapp writes it (UTF-8 text kept readable, no trailing newline)."""
    return json.dumps(row, ensure_ascii=False)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temp file in the same folder and a rename."""
    atomic_write(path, text.encode("utf-8"))


def make_rows(out: UnitOutput) -> list[dict[str, Any]]:
    """results.jsonl rows of a unit (DESIGN.md's row, plus the image ``size`` [H, W])."""
    height, width = out.size
    return [
        {
            "image": out.unit.rel,
            "size": [height, width],
            "instruction": result.instruction,
            "answer": result.answer,
            "masks": [m.to_dict() for m in result.masks],
        }
        for result in out.results
    ]


def write_unit_files(out_dir: Path, out: UnitOutput, formats: tuple[str, ...]) -> None:
    """Per-mask PNGs (0/255, image size) and overlays of one unit, each written atomically."""
    for result in out.results:
        if "png" in formats:
            for index, mask in enumerate(result.masks):
                save_png(out_dir / mask_file(out.unit.rel, result.instruction, index), mask.mask)
        if "overlay" in formats and out.image is not None:
            labels = [f"{m.label} {m.score:.2f}" for m in result.masks]
            drawn = overlay(out.image, [m.mask for m in result.masks], labels)
            save_png(out_dir / overlay_file(out.unit.rel, result.instruction), drawn)


def sweep_temp_files(out_dir: Path) -> int:
    """Remove temp files a killed run left behind (``.<name>.<random>.tmp``)."""
    removed = 0
    for folder, _, names in os.walk(out_dir):
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a results.jsonl (a cut-off last line is ignored)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number} is not valid JSON: {exc.msg}", str(path)) from None
    return rows


class OutputStore:
    """The single writer of results.jsonl and errors.jsonl for one run."""

    def __init__(self, job: BatchJob) -> None:
        self.job = job
        self.out_dir = Path(job.out_dir)
        self._results: IO[bytes] | None = None
        self._errors: IO[bytes] | None = None

    def open(self) -> set[tuple[str, str]]:
        """Prepare the output folder; return the (image, instruction) pairs already done."""
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise InputError("exists and is not a folder", str(out))
        results = out / RESULTS
        if results.exists() and results.stat().st_size and not self.job.resume:
            raise InputError(
                "already holds results.jsonl: pass --resume to continue that run, or use "
                "another --out",
                str(out),
            )
        signature = self.job.signature()
        saved = out / JOB
        if self.job.resume and saved.exists():
            try:
                before = json.loads(saved.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise InputError(f"unreadable job.json: {exc}", str(saved)) from None
            for key, value in signature.items():
                if before.get(key) != value:
                    raise InputError(
                        f"--resume needs the same job, but {key} differs from the saved run",
                        str(saved),
                    )
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved, json.dumps(signature, indent=2) + "\n")
        sweep_temp_files(out)
        done = set()
        if results.exists():
            with results.open("r+b") as fp:  # cut a half-written last line
                data = fp.read()
                fp.truncate(data.rfind(b"\n") + 1)
            done = {(row["image"], row["instruction"]) for row in read_rows(results)}
        self._results = results.open("ab")
        self._errors = (out / ERRORS).open("wb")
        return done

    def _append(self, fp: IO[bytes] | None, row: dict[str, Any]) -> None:
        if fp is None:
            raise RuntimeError("OutputStore.open() was not called")
        fp.write((dumps(row) + "\n").encode("utf-8"))
        fp.flush()

    def append_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._append(self._results, row)

    def append_problem(self, problem: Problem) -> None:
        self._append(self._errors, problem.to_dict())

    def close(self) -> None:
        for fp in (self._results, self._errors):
            if fp is not None:
                fp.flush()
                os.fsync(fp.fileno())
                fp.close()
        self._results = self._errors = None
