"""What `VideoSegmenter.run` writes: per-frame mask PNGs, results.jsonl and an overlay video.

results.jsonl is written to a temporary name and renamed when every frame is in, so an
interrupted run never leaves a truncated file under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segapp.export import mask_record, overlay, save_png
from segapp.video.io import VideoWriter


class FrameOutputs:
    """Writes one frame at a time into `out_dir` (masks/, results.jsonl, overlay.mp4)."""

    def __init__(self, out_dir: Path, fps: float, *, overlay_max_side: int = 1280) -> None:
        self.mask_dir = out_dir / "masks"
        self.mask_dir.mkdir(parents=True, exist_ok=True)
        self.results_path = out_dir / "results.jsonl"
        self._tmp = out_dir / ".results.jsonl.tmp"
        self._rows = self._tmp.open("w")
        self.video = VideoWriter(out_dir / "overlay.mp4", fps)
        self.fps = fps
        self.overlay_max_side = overlay_max_side
        self.frames = 0

    def write(
        self,
        index: int,
        rgb: np.ndarray,
        masks: np.ndarray,
        scores: list[float],
        labels: list[str],
        row: dict[str, Any],
    ) -> None:
        """Frame `index`: its M masks (PNG + RLE row) and its overlay; `row` adds fields."""
        records = []
        for k, (mask, score) in enumerate(zip(masks, scores, strict=True)):
            save_png(self.mask_dir / f"frame_{index:05d}_mask_{k}.png", mask)
            records.append(mask_record(mask, label=labels[k], score=score))
        time_s = round(index / self.fps, 4) if self.fps else None
        line = {"frame": index, "time_s": time_s, **row, "masks": records}
        self._rows.write(json.dumps(line) + "\n")
        self.video.write(overlay_frame(rgb, masks, labels, self.overlay_max_side))
        self.frames += 1

    def close(self, *, complete: bool) -> None:
        """Close the files; results.jsonl takes its final name only when `complete`."""
        self.video.close()
        self._rows.close()
        if complete:
            os.replace(self._tmp, self.results_path)


def overlay_frame(
    rgb: np.ndarray, masks: np.ndarray, labels: list[str], max_side: int
) -> np.ndarray:
    """The frame with its masks drawn, shrunk to `max_side` (a 4K overlay video is not worth
    its size)."""
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(rgb, dsize, interpolation=cv2.INTER_AREA)
        masks = (
            np.stack(
                [
                    cv2.resize(m.astype(np.uint8), dsize, interpolation=cv2.INTER_NEAREST) > 0
                    for m in masks
                ]
            )
            if len(masks)
            else np.zeros((0, dsize[1], dsize[0]), bool)
        )
    return overlay(rgb, list(masks), labels)
