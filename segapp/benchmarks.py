"""`segapp bench ...`: speed figures as one JSON object, ratios measured in the same run."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

from segapp.build import load_model
from segapp.modeling.builders import (
    build_image_pos,
    build_sam,
    build_text_hidden_fcs,
    count_parameters,
)
from segapp.predictor import Segmenter


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _bench_image_array() -> np.ndarray:
    from segapp.data.instructions import generate_sample

    return generate_sample("test", 0).image


def bench_image(model: str = "tiny", *, sam: str | None = None, repeats: int = 3) -> dict[str, Any]:
    """Cold call (set_image + predict) vs warm call (predict on the cached image).

    With `sam` = vit_b/l/h the bundled model's SAM is swapped for segment_anything's encoder
    and decoder at that size with random weights: timing needs no trained weights.
    """
    bundle = load_model(model)
    if sam:
        cfg = bundle.config.replace(sam_variant=sam, prompt_dim=256)
        bundle.model.sam = build_sam(cfg).eval()
        bundle.model.text_hidden_fcs = build_text_hidden_fcs(cfg).eval()
        bundle.model.image_pos = build_image_pos(cfg)  # its input is SAM's prompt width
        bundle.config = cfg
    seg = Segmenter(bundle)
    image = _bench_image_array()
    if sam:  # deployment-sized input: SAM resizes the longest side to 1024 anyway
        image = np.ascontiguousarray(np.kron(image, np.ones((4, 4, 1), dtype=np.uint8)))
    instruction = "the largest red object"
    seg.segment(image, instruction)  # warm-up (allocations, lazy init)
    cold, warm, stages = [], [], []
    for _ in range(repeats):
        seg.cache = None
        t0 = time.perf_counter()
        res = seg.segment(image, instruction)
        cold.append(time.perf_counter() - t0)
        stages.append({**seg.last_encode_timings, **res.timings})
        calls = dict(seg.encoder_calls)
        t0 = time.perf_counter()
        seg.predict(instruction)
        warm.append(time.perf_counter() - t0)
        if seg.encoder_calls != calls:
            raise RuntimeError("a warm predict ran an encoder")
    # decoder-only time for one prompt (the random-weight variants may emit no [SEG])
    cache = seg.cache
    assert cache is not None
    prompt = torch.zeros(1, 1, bundle.config.prompt_dim)
    dec = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            seg.model.decode_masks(cache.sam_embedding, prompt)
            dec.append(time.perf_counter() - t0)
    med = statistics.median
    stage_names = ("vision_tower", "sam_encoder", "llm_prefill", "generation", "mask_decode")
    return {
        "bench": "image",
        "model": model,
        "sam": sam or bundle.config.sam_variant,
        "image_size": list(image.shape[:2]),
        "sam_input": bundle.model.sam.image_encoder.img_size,
        "sam_encoder_params": count_parameters(bundle.model.sam.image_encoder),
        "repeats": repeats,
        "cold_s": round(med(cold), 4),
        "warm_s": round(med(warm), 4),
        "cached_vs_cold": round(med(cold) / med(warm), 2),
        "stages_cold_s": {k: round(med(s[k] for s in stages), 4) for k in stage_names},
        "mask_decoder_one_prompt_s": round(med(dec), 4),
        "new_tokens": int(stages[-1]["new_tokens"]),
        "masks": len(res.masks),
        "machine": machine(),
    }
