"""Widgets and small helpers the segapp UI's tabs share: segapp's image decoding in an upload,
the bundled examples, drawing a result, its downloads and table, and polling a job."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from segapp.client import Client
from segapp.errors import InputError, SegappError
from segapp.export import overlay, rle_to_mask, save_png
from segapp.images import load_image

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "examples"
POLL_S = 0.25
JOB_LIMIT_S = 3600.0


def image_input(*, max_pixels: int, **kwargs: Any) -> gr.Image:
    """A gr.Image decoded by segapp's `load_image` (the CLI's decoding, EXIF and pixel limit), so
    an unreadable or huge upload gets segapp's one-line message, not a preprocessing trace.

    (The instance's preprocess is replaced rather than subclassing: gradio writes a .pyi file
    next to the source of every Component subclass.)
    """
    image = gr.Image(type="numpy", **kwargs)
    default = image.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None or payload.path is None:  # nothing, or a data: URL (webcam)
            return default(payload)
        try:
            return load_image(payload.path, max_pixels=max_pixels)
        except InputError as exc:
            raise gr.Error(f"{exc.what} ({payload.orig_name or 'image'})") from None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def examples() -> list[list[str]]:
    """[image path, instruction] for each bundled example."""
    rows = []
    for spec in sorted(EXAMPLES_DIR.glob("*.json")):
        image = spec.with_suffix(".png")
        if image.is_file():
            rows.append([str(image), json.loads(spec.read_text())["text"][0]])
    return rows


def fail(exc: Exception) -> gr.Error:
    if isinstance(exc, SegappError):
        return gr.Error(str(exc))
    return gr.Error(f"internal failure: {type(exc).__name__}: {exc}")


def masks_of(record: dict) -> list[np.ndarray]:
    return [rle_to_mask(m["rle"]) for m in record["masks"]]


def draw(image: np.ndarray, record: dict, points: list[tuple[float, float, int]]) -> np.ndarray:
    labels = [f"{m['label']} {m['score']:.2f}" for m in record["masks"]]
    canvas = overlay(image, masks_of(record), labels) if record["masks"] else image.copy()
    radius = max(3, min(image.shape[:2]) // 80)
    for x, y, label in points:
        colour = (40, 220, 40) if label == 1 else (230, 30, 30)
        y0, y1 = int(max(0, y - radius)), int(min(image.shape[0], y + radius + 1))
        x0, x1 = int(max(0, x - radius)), int(min(image.shape[1], x + radius + 1))
        canvas[y0:y1, x0:x1] = colour
    return canvas


def downloads(record: dict) -> list[str]:
    folder = Path(tempfile.mkdtemp(prefix="segapp-ui-"))
    files = []
    for i, mask in enumerate(masks_of(record)):
        save_png(folder / f"mask_{i}.png", mask)
        files.append(str(folder / f"mask_{i}.png"))
    (folder / "result.json").write_text(json.dumps(record))
    return [*files, str(folder / "result.json")]


def mask_table(record: dict) -> list[list[Any]]:
    return [[i, m["label"], round(m["score"], 3), m["area"]] for i, m in enumerate(record["masks"])]


def wait_job(client: Client, job: dict, user: str, progress: gr.Progress) -> dict:
    """Poll a job until it finishes (bounded), mirroring its progress in the UI."""
    deadline = time.monotonic() + JOB_LIMIT_S
    while job.get("state") not in ("done", "failed"):
        if time.monotonic() > deadline:
            raise gr.Error("the job did not finish in time")
        progress(job.get("progress", 0.0), desc=job.get("message") or job.get("state"))
        time.sleep(POLL_S)
        job = client.job(job["id"], user)
    if job["state"] == "failed":
        raise gr.Error(job.get("error") or "the job failed")
    progress(1.0, desc="done")
    return job
