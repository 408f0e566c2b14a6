"""`segapp eval video`: J, F and J&F on the synthetic video split, with and without merging.

J = region IoU per frame (both empty -> 1), F = DAVIS boundary F-measure (tolerance 0.008 of
the diagonal), averaged over the frames of a clip, then over clips; J&F = (J + F) / 2.
The prediction of a frame is the union of its `[SEG]` masks. Every setting sees the same
clips, the same sampled frames and the same vision tokens (encoded once per clip).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segapp.build import Bundle
from segapp.data.videos import VideoClip, generate_clip
from segapp.evaluate import boundary_f, jaccard
from segapp.video.pipeline import VideoOptions, VideoSegmenter


def write_frames(clip: VideoClip, folder: Path) -> Path:
    """Save a clip as a frame folder (lossless PNGs, frame_00000.png ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(clip.frames):
        Image.fromarray(frame).save(folder / f"frame_{i:05d}.png")
    return folder


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n": 0, "J": None, "F": None, "J&F": None}
    j = float(np.mean([r["J"] for r in rows]))
    f = float(np.mean([r["F"] for r in rows]))
    kinds = sorted({r["kind"] for r in rows})
    per_kind = {
        k: round(float(np.mean([(r["J"] + r["F"]) / 2 for r in rows if r["kind"] == k])), 4)
        for k in kinds
    }
    return {
        "n": len(rows),
        "J": round(j, 4),
        "F": round(f, 4),
        "J&F": round((j + f) / 2, 4),
        "J&F_per_kind": per_kind,
        "visual_tokens_kept": round(float(np.mean([r["kept"] for r in rows])), 1),
        "visual_tokens_total": round(float(np.mean([r["total"] for r in rows])), 1),
        "mask_rate": round(float(np.mean([r["masks"] > 0 for r in rows])), 4),
    }


def evaluate_video(
    bundle: Bundle,
    *,
    split: str = "test",
    limit: int = 50,
    merges: tuple[float | None, ...] = (None, 0.7),
    prune: float | None = None,
    options: VideoOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """J / F / J&F per merge setting (None = unmerged) on the first `limit` clips of `split`."""
    from tqdm import tqdm

    seg = VideoSegmenter(bundle, options)
    rows: dict[str, list[dict[str, Any]]] = {_name(m): [] for m in merges}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segapp-eval-video-") as tmp:
        for i in tqdm(range(limit), disable=not progress, desc=f"eval video {split}", unit="clip"):
            clip = generate_clip(split, i)
            folder = write_frames(clip, Path(tmp) / f"clip_{i:04d}")
            tokens = seg.encode_frames(folder)
            frames = list(seg.iter_sam(folder))  # 16 small frames: encode once, decode per setting
            for merge in merges:
                answer = seg.reason(tokens, clip.instruction, merge=merge, prune=prune)
                js, fs = [], []
                for frame, (masks, _) in zip(frames, seg.batch_masks(frames, answer), strict=True):
                    index = frame.index
                    pred = (
                        np.asarray(masks.any(0))
                        if len(masks)
                        else np.zeros(clip.masks[index].shape, bool)
                    )
                    js.append(jaccard(pred, clip.masks[index]))
                    fs.append(boundary_f(pred, clip.masks[index]))
                rows[_name(merge)].append(
                    {
                        "kind": clip.kind,
                        "J": float(np.mean(js)),
                        "F": float(np.mean(fs)),
                        "masks": len(answer.prompts),
                        "kept": answer.stats["visual_tokens_kept"],
                        "total": answer.stats["visual_tokens_total"],
                    }
                )
    settings = {name: _summary(r) for name, r in rows.items()}
    out: dict[str, Any] = {
        "model": bundle.source,
        "split": split,
        "clips": limit,
        "prune": prune,
        "presence": seg.presence,  # the threshold frames were gated by (0 = none)
        "settings": settings,
    }
    base = settings.get("unmerged")
    if base and base["J&F"] is not None:
        for name, s in settings.items():
            if name != "unmerged" and s["J&F"] is not None:
                out[f"J&F_drop_{name}"] = round(base["J&F"] - s["J&F"], 4)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _name(merge: float | None) -> str:
    return "unmerged" if merge is None else f"K={merge:g}"
