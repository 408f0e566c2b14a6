"""Video reasoning segmentation: decode, sample, merge (DyCoke), reason once, segment every frame.

Contract (used by the service / UI / REST layer)::

    from segapp.video import VideoSegmenter
    result = VideoSegmenter(bundle).run(
        video_path,            # a video file (mp4 / avi / webm / ...) or a folder of frames
        instruction,           # free-form text
        out_dir,               # created if missing
        merge=0.7,             # DyCoke TTM ratio K, or None for no merging
        prune=None,            # DyCoke stage-2 KV pruning ratio P during decoding, or None
        progress=None,         # Callable[[float, str], None]: (fraction done 0..1, stage text)
    )
    result.answer             # the LLM's answer text (with [SEG] markers)
    result.frames             # number of frames segmented (every frame of the video)
    result.mask_dir           # out_dir / "masks": frame_{i:05d}_mask_{k}.png per [SEG] k
    result.overlay_path       # out_dir / "overlay.mp4" (or .avi when no mp4 encoder exists)
    result.results_path       # out_dir / "results.jsonl": one row per frame, masks as COCO RLE
    result.stats              # {"visual_tokens_kept", "visual_tokens_total", "prefill_s",
                              #  "decode_s", "total_s", "frames", "llm_frames", ...}

results.jsonl rows: ``{"frame": i, "time_s": t, "image": "<video>#<i>", "instruction", "answer",
"masks": [{"label", "score", "bbox", "area", "rle", "polygons"}]}`` (the image row format of
DESIGN.md plus the frame index), in frame order.

Pipeline: frames are read by a generator (`segapp.video.io.iter_frames`), so a long video never
sits whole in memory. A first pass encodes only the frames the LLM sees (`sample_frames`:
uniform or sparse-dense); their vision tokens go through DyCoke's temporal token merging
(`segapp.video.ttm.temporal_token_merge`), the LLM answers once, and each `[SEG]` embedding is
used as SAM's sparse prompt on every frame of a second streaming pass (One-Token-Seg-All),
optionally with a point where a `[SEG]` pointer points (`segapp.video.tracks`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "VideoResult",
    "VideoSegmenter",
    "VideoInfo",
    "iter_frames",
    "probe_video",
    "sample_frames",
    "temporal_token_merge",
]

if TYPE_CHECKING:
    from segapp.video.io import VideoInfo, iter_frames, probe_video
    from segapp.video.pipeline import VideoResult, VideoSegmenter
    from segapp.video.sampling import sample_frames
    from segapp.video.ttm import temporal_token_merge

_WHERE = {
    "VideoResult": "segapp.video.pipeline",
    "VideoSegmenter": "segapp.video.pipeline",
    "VideoInfo": "segapp.video.io",
    "iter_frames": "segapp.video.io",
    "probe_video": "segapp.video.io",
    "sample_frames": "segapp.video.sampling",
    "temporal_token_merge": "segapp.video.ttm",
}


def __getattr__(name: str) -> Any:  # lazy: importing segapp.video must not load torch models
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
