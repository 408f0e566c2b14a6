"""`run_batch`: find the work, skip what is done, run an engine, write the exports."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from segapp.batch.exports import write_exports
from segapp.batch.job import BatchJob, Unit, discover
from segapp.batch.outputs import ERRORS, RESULTS, OutputStore, read_rows
from segapp.errors import InputError

ENGINES = ("local", "ray")


@dataclass
class Summary:
    """Counts of one run, per (image, instruction) pair."""

    done: int  # segmented in this run
    skipped: int  # already in results.jsonl (resume)
    failed: int  # logged to errors.jsonl
    ignored: int  # files without an image suffix
    images: int  # images read in this run
    seconds: float
    out_dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"done {self.done}, skipped {self.skipped}, failed {self.failed}"
            f" ({self.images} images in {self.seconds:.1f} s, {rate:.2f} images/s)"
        )
        if self.failed:
            text += f"; see {Path(self.out_dir) / ERRORS}"
        if self.ignored:
            text += f"; ignored {self.ignored} non-image files"
        return text


def pending_units(units: list[Unit], done: set[tuple[str, str]]) -> tuple[list[Unit], int]:
    """Units with their unfinished instructions only, and how many pairs were already done."""
    pending, skipped = [], 0
    for unit in units:
        left = tuple(i for i in unit.instructions if (unit.rel, i) not in done)
        skipped += len(unit.instructions) - len(left)
        if left:
            pending.append(Unit(unit.index, unit.rel, unit.path, left))
    return pending, skipped


def compute_threads(job: BatchJob) -> int:
    """Torch threads for the model: `job.threads`, or on CPU all cores but one (the other
    feeds the loader and writer threads)."""
    if job.threads > 0:
        return job.threads
    return max(1, (os.cpu_count() or 1) - 1)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_batch(job: BatchJob, *, engine: str = "local", segmenter: Any = None) -> Summary:
    """Segment every unit of `job` not yet done, then write coco/polygons/yolo exports.

    `segmenter`: an already loaded `Segmenter` for the local engine (the service's model);
    None loads `job.model`.
    """
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}", "--engine")
    from tqdm import tqdm

    start = time.perf_counter()
    found = discover(job)
    store = OutputStore(job)
    done = store.open()
    units, skipped = pending_units(found.units, done)
    counts = {"done": 0, "failed": len(found.problems), "images": 0}
    bar = tqdm(
        total=len(units),
        unit="img",
        desc="segapp batch",
        disable=None if job.progress else True,  # None: only on a terminal
        dynamic_ncols=True,
    )

    def on_unit(rows: int, problems: int, read: bool) -> None:
        counts["done"] += rows
        counts["failed"] += problems
        counts["images"] += read
        bar.update(1)

    try:
        for problem in found.problems:
            store.append_problem(problem)
        if units and engine == "local":
            from segapp.batch.local import run_local
            from segapp.predictor import Segmenter

            if segmenter is not None:  # a service's model: its threads, its settings
                run_local(job, units, store, segmenter, on_unit)
            else:
                with torch_threads(compute_threads(job)):
                    segmenter = Segmenter.from_pretrained(job.model, device=job.device)
                    segmenter.max_new_tokens = job.max_new_tokens
                    run_local(job, units, store, segmenter, on_unit)
        elif units:
            from segapp.batch.ray_engine import run_ray

            run_ray(job, units, store, on_unit)
    finally:
        bar.close()
        store.close()
    write_exports(Path(job.out_dir), read_rows(Path(job.out_dir) / RESULTS), job.formats)
    return Summary(
        done=counts["done"],
        skipped=skipped,
        failed=counts["failed"],
        ignored=found.ignored,
        images=counts["images"],
        seconds=time.perf_counter() - start,
        out_dir=str(job.out_dir),
    )
