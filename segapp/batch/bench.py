"""`segapp bench batch`: images/s of a naive loop, the local engine and the Ray engine.

All three segment the same generated images with the same instruction and write the same
outputs (PNG masks, results.jsonl, COCO, GeoJSON, YOLO), in one process, one after another.
The naive loop is what a user would write first: read an image, `Segmenter.segment`, write
its files, next image (no batching, no overlap); it runs twice, with torch's default threads
and with the local engine's thread count, so the gain of batching and overlap shows apart.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from segapp.batch.exports import write_exports
from segapp.batch.infer import UnitOutput
from segapp.batch.job import BatchJob, Problem, discover
from segapp.batch.local import write_unit
from segapp.batch.outputs import RESULTS, OutputStore, read_rows
from segapp.batch.runner import compute_threads, run_batch, torch_threads
from segapp.errors import InputError
from segapp.images import load_image

PROMPT = "the largest red object"


def naive_loop(job: BatchJob) -> int:
    """One image at a time, no threads; returns the number of images read."""
    from segapp.predictor import Segmenter

    segmenter = Segmenter.from_pretrained(job.model, device=job.device)
    segmenter.max_new_tokens = job.max_new_tokens
    store = OutputStore(job)
    store.open()
    read = 0
    try:
        for unit in discover(job).units:
            try:
                image = load_image(unit.path, max_pixels=job.max_pixels)
            except InputError as exc:
                store.append_problem(Problem(unit.rel, exc.what))
                continue
            results = [segmenter.segment(image, text) for text in unit.instructions]
            size = (image.shape[0], image.shape[1])
            write_unit(store, UnitOutput(unit, image, size, results), job.formats)
            read += 1
    finally:
        store.close()
    write_exports(Path(job.out_dir), read_rows(Path(job.out_dir) / RESULTS), job.formats)
    return read


def make_images(folder: Path, count: int) -> None:
    """`count` synthetic test scenes as PNG files (kept if already there)."""
    from PIL import Image

    from segapp.data.instructions import generate_sample

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"scene_{i:04d}.png"
        if not path.exists():
            Image.fromarray(generate_sample("test", i).image).save(path)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_batch(
    model: str = "tiny",
    *,
    images: int = 200,
    batch_size: int = 8,
    ray: bool = True,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Run the three ways on the same images; throughputs and same-run ratios as a dict."""
    import torch

    from segapp.benchmarks import machine

    with contextlib.ExitStack() as stack:
        work = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="segbench")))
        folder = work / "images"
        make_images(folder, images)

        def job(name: str) -> BatchJob:
            return BatchJob(
                folder,
                work / name,
                prompt=PROMPT,
                model=model,
                batch_size=batch_size,
                progress=False,
                resume=False,
            )

        for name in ("naive", "naive_same_threads", "local", "ray"):  # measured afresh
            with contextlib.suppress(FileNotFoundError):
                (work / name / RESULTS).unlink()
        default_threads = torch.get_num_threads()
        local_threads = compute_threads(job("local"))
        seconds = {"naive": _timed(lambda: naive_loop(job("naive")))}
        with torch_threads(local_threads):  # separates the engine's gain from thread count
            seconds["naive_same_threads"] = _timed(lambda: naive_loop(job("naive_same_threads")))
        seconds["local"] = _timed(lambda: run_batch(job("local")))
        ray_start = 0.0
        if ray:
            ray_start = _timed(lambda: _start_local_ray())
            seconds["ray"] = _timed(lambda: run_batch(job("ray"), engine="ray"))
            _stop_ray()
        results = {name: (work / name / RESULTS).read_bytes() for name in seconds}
        local_rows = results["local"].splitlines()
        naive_rows = results["naive"].splitlines()
        same_as_naive = sum(a == b for a, b in zip(local_rows, naive_rows, strict=False))
        out: dict[str, Any] = {
            "bench": "batch",
            "model": model,
            "images": images,
            "batch_size": batch_size,
            "instruction": PROMPT,
            "threads": {
                "naive": default_threads,
                "naive_same_threads": local_threads,
                "local": local_threads,
                "ray_model_actor": 1,
            },
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "images_per_s": {k: round(images / v, 3) for k, v in seconds.items()},
            "local_vs_naive": round(seconds["naive"] / seconds["local"], 2),
            "local_vs_naive_same_threads": round(
                seconds["naive_same_threads"] / seconds["local"], 2
            ),
            "rows_identical_local_naive": f"{same_as_naive}/{len(local_rows)}",
        }
        if ray:
            out["ray_vs_naive"] = round(seconds["naive"] / seconds["ray"], 2)
            out["ray_vs_local"] = round(seconds["local"] / seconds["ray"], 2)
            out["ray_start_s"] = round(ray_start, 3)
            out["identical_local_ray"] = results["local"] == results["ray"]
        out["machine"] = machine()
        return out


def _start_local_ray() -> None:
    import logging
    import os

    try:
        import ray
    except ImportError:
        raise InputError(
            "the Ray engine needs Ray Data: pip install 'segapp[ray]' (or pass --no-ray)",
            "segapp bench batch",
        ) from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from here
    ray.init(include_dashboard=False, logging_level=logging.WARNING)


def _stop_ray() -> None:
    import ray

    ray.shutdown()
