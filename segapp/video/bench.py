"""`segapp bench video`: what DyCoke merging buys, measured merged vs unmerged in one run.

For each setting (unmerged, then K in `merges`) on the same synthetic clip: visual tokens the
LLM reads, LLM prefill and decode time, end-to-end time (frame decoding + vision tower +
LLM + SAM on every frame), LLM KV-cache size and, on CUDA, peak GPU memory. Settings are run
round-robin inside each repeat (so drift in machine load hits them alike); medians are
reported with ratios unmerged / merged (> 1 means merging is faster).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from segapp.benchmarks import machine
from segapp.build import Bundle, load_model
from segapp.data.videos import generate_clip
from segapp.modeling.reduction import compiled_prefill
from segapp.video.evaluate import write_frames
from segapp.video.pipeline import VideoOptions, VideoSegmenter

_LLM_WIDE = (
    "llm",
    "projector",
    "text_hidden_fcs",
    "image_pos",
    "seg_pointer",
    "video_seg_pointer",
    "video_motion",
    "target_head",
)


def scale_llm(bundle: Bundle, hidden: int, layers: int) -> None:
    """Swap in a random LLM of width `hidden` and depth `layers` (timing only: no trained
    weights are needed to measure how prefill scales with the visual token count)."""
    from segapp.build import build_segllm

    cfg = bundle.config.replace(
        llm_hidden=hidden,
        llm_layers=layers,
        llm_heads=max(1, hidden // 64),
        llm_mlp=hidden * 3,
        max_positions=8192,
    )
    fresh = build_segllm(cfg, bundle.tokenizer).to(bundle.model.device).eval()
    for name in _LLM_WIDE:  # every module that reads or writes LLM-width vectors
        setattr(bundle.model, name, getattr(fresh, name))
    bundle.config = cfg


def _run(
    seg: VideoSegmenter, folder: Path, instruction: str, merge: float | None, prune: float | None
) -> dict[str, float]:
    cuda = seg.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tokens = seg.encode_frames(folder)
    answer = seg.reason(tokens, instruction, merge=merge, prune=prune)
    frames = sum(1 for _ in seg.iter_masks(folder, answer))
    if cuda:
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    st = answer.stats
    return {
        "visual_tokens_kept": st["visual_tokens_kept"],
        "visual_tokens_total": st["visual_tokens_total"],
        "prompt_tokens": st["prompt_tokens"],
        "prefill_s": st["prefill_s"],
        "decode_s": st["decode_s"],
        "new_tokens": st["new_tokens"],
        "end_to_end_s": total,
        "kv_cache_mb": st["kv_cache_bytes"] / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"),
        "frames": frames,
    }


def bench_video(
    model: str = "tiny",
    *,
    merges: tuple[float, ...] = (0.5, 0.7),
    prune: float | None = None,
    frames: int = 16,
    dense_frames: int = 4,
    repeats: int = 3,
    llm_repeats: int = 5,
    llm_hidden: int | None = None,
    llm_layers: int = 8,
    max_new_tokens: int = 48,
    compile_llm: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Medians per setting and unmerged / merged ratios, one JSON-ready dict."""
    bundle = load_model(model, device=device)
    if llm_hidden:
        scale_llm(bundle, llm_hidden, llm_layers)
    seg = VideoSegmenter(
        bundle,
        VideoOptions(
            dense_frames=dense_frames, max_new_tokens=max_new_tokens, compile_llm=compile_llm
        ),
    )
    clip = generate_clip("test", 0, frames=frames)
    settings: list[float | None] = [None, *merges]
    names = ["unmerged" if m is None else f"K={m:g}" for m in settings]
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    prefills: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="segapp-bench-video-") as tmp:
        folder = write_frames(clip, Path(tmp) / "clip")
        _run(seg, folder, clip.instruction, None, prune)  # warm-up
        tokens = seg.encode_frames(folder)
        for _ in range(repeats):
            for name, merge in zip(names, settings, strict=True):
                runs[name].append(_run(seg, folder, clip.instruction, merge, prune))
            # LLM-only calls on the cached frame tokens: more prefill samples per setting
            for _ in range(llm_repeats):
                for name, merge in zip(names, settings, strict=True):
                    answer = seg.reason(tokens, clip.instruction, merge=merge, prune=prune)
                    prefills[name].append(answer.stats["prefill_s"])
    med = {
        name: {
            k: round(statistics.median(r[k] for r in rs), 4)
            for k in rs[0]
            if not (k == "peak_gpu_mb" and device == "cpu")
        }
        for name, rs in runs.items()
    }
    for name in names:
        samples = prefills[name] + [r["prefill_s"] for r in runs[name]]
        med[name]["prefill_s"] = round(statistics.median(samples), 4)
        med[name]["prefill_min_s"] = round(min(samples), 4)
        med[name]["prefill_samples"] = len(samples)
    base = med["unmerged"]
    ratios = {
        name: {
            "tokens_kept_share": round(m["visual_tokens_kept"] / base["visual_tokens_kept"], 4),
            # what the prompt's token count allows a compute-bound prefill (text is not merged)
            "prefill_speedup_bound": round(base["prompt_tokens"] / m["prompt_tokens"], 2),
            "prefill_speedup": round(base["prefill_s"] / m["prefill_s"], 2),
            "prefill_speedup_min": round(base["prefill_min_s"] / m["prefill_min_s"], 2),
            "decode_speedup": round(base["decode_s"] / m["decode_s"], 2),
            "end_to_end_speedup": round(base["end_to_end_s"] / m["end_to_end_s"], 2),
            "kv_cache_reduction": round(base["kv_cache_mb"] / m["kv_cache_mb"], 2),
        }
        for name, m in med.items()
        if name != "unmerged"
    }
    return {
        "bench": "video",
        "model": model,
        "llm": {
            "hidden": bundle.config.llm_hidden,
            "layers": bundle.config.llm_layers,
            "random_weights": bool(llm_hidden),
        },
        "clip_frames": frames,
        "llm_frames": dense_frames,
        "prune": prune,
        # False if asked for but compiling failed (it then ran eagerly, with a warning)
        "compiled_prefill": compile_llm and not compiled_prefill.failed,
        "repeats": repeats,
        "settings": med,
        "merged_vs_unmerged": ratios,
        "note": "ratios are unmerged / merged from this run (prefill: median and minimum over "
        "pipeline runs plus llm_repeats LLM-only calls per repeat; prefill_speedup_bound: "
        "unmerged / merged prompt tokens, what a prefill whose time grows with its tokens "
        "could reach); SAM runs on every frame unmerged, so the end-to-end gain is bounded "
        "by the LLM's share",
        "machine": machine(),
    }
