"""`segapp eval personal` and `segapp bench personalize` (one JSON object each).

Eval: novel concepts (shapes and textures absent from base training, see concepts.py); for each,
k in (1, 3, 5) shots from validation-split scenes, then held-out test-split scenes with the
concept among distractors (often a look-alike: same shape in another colour, or same colour
and texture in another shape) and scenes without it. Rows: the base model given only the
concept's description, the PerSAM-style baseline, the LoRA concept (adapter + its verifier, what
``--method lora`` serves) and, from the same adapters, ``lora_no_verifier`` (the adapter's own
[SEG] masks only).
"""

from __future__ import annotations

import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segapp.build import Bundle
from segapp.personalize.concepts import Concept, concept_scene, sample_concepts
from segapp.personalize.fit import FitConfig, fit_concept
from segapp.personalize.segmenter import PersonalSegmenter
from segapp.personalize.store import ConceptStore


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 1.0


def concept_data(
    concept: Concept, index: int, *, shots: int, scenes: int, negatives: int, seed: int
) -> tuple[list, list, list]:
    """(shots, positive test scenes, negative test scenes) as (image, mask) lists."""
    rng = np.random.default_rng([31, seed, index])
    shot = [concept_scene(concept, rng, split="val") for _ in range(shots)]
    pos = [concept_scene(concept, rng, split="test") for _ in range(scenes)]
    neg = [concept_scene(concept, rng, present=False, split="test") for _ in range(negatives)]
    return shot, pos, neg


def score(
    seg: PersonalSegmenter, instruction: str, user: str | None, pos: list, neg: list
) -> tuple[list[float], list[bool]]:
    """IoU of the union of predicted masks per positive scene; 'any mask' per negative one."""
    ious, fps = [], []
    for image, gt in pos:
        res = seg.segment(image, instruction, user=user)
        pred = np.zeros(gt.shape, bool)
        for m in res.masks:
            pred |= m.mask
        ious.append(_iou(pred, gt))
    for image, _ in neg:
        res = seg.segment(image, instruction, user=user)
        fps.append(any(m.mask.any() for m in res.masks))
    return ious, fps


def evaluate_personal(
    bundle: Bundle,
    *,
    concepts: int = 4,
    shots: Sequence[int] = (1, 3, 5),
    scenes: int = 20,
    negatives: int = 20,
    steps: int | None = None,
    methods: Sequence[str] = ("base", "persam", "lora"),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    say = progress or (lambda message: None)
    root = Path(tempfile.mkdtemp(prefix="segapp-eval-personal-"))
    store = ConceptStore(root)
    seg = PersonalSegmenter(bundle, store)
    raw = PersonalSegmenter(bundle, store, verify=False)  # the adapter's own [SEG] masks
    rows_of = [*methods, *(["lora_no_verifier"] if "lora" in methods else [])]
    rows: dict[str, dict[int, list[float]]] = {m: {k: [] for k in shots} for m in rows_of}
    fp: dict[str, dict[int, list[bool]]] = {m: {k: [] for k in shots} for m in rows_of}
    fit_s: dict[str, dict[int, list[float]]] = {m: {k: [] for k in shots} for m in methods}
    per_concept = []
    try:
        for ci, concept in enumerate(sample_concepts(concepts, seed)):
            shot, pos, neg = concept_data(
                concept, ci, shots=max(shots), scenes=scenes, negatives=negatives, seed=seed
            )
            entry: dict[str, Any] = {"concept": concept.slug}
            if "base" in methods:  # the name only: "the red ringed pentagon"
                words = f"the {concept.color} {concept.texture} {concept.shape}"
                ious, fps = score(seg, f"segment {words}", None, pos, neg)
                for k in shots:
                    rows["base"][k] += ious
                    fp["base"][k] += fps
                entry["base"] = round(float(np.mean(ious)), 4)
                entry["base_fp"] = round(float(np.mean(fps)), 4)
            for method in (m for m in methods if m != "base"):
                for k in shots:
                    say(f"{concept.slug}: {method} {k}-shot")
                    name = f"c{ci}-{method}-{k}"
                    info = fit_concept(
                        bundle,
                        store,
                        "eval",
                        name,
                        [s[0] for s in shot[:k]],
                        [s[1] for s in shot[:k]],
                        method=method,
                        steps=steps,
                    )
                    ious, fps = score(seg, f"segment <{name}>", "eval", pos, neg)
                    rows[method][k] += ious
                    fp[method][k] += fps
                    fit_s[method][k].append(info.fit_seconds)
                    entry[f"{method}_{k}shot"] = round(float(np.mean(ious)), 4)
                    entry[f"{method}_{k}shot_fp"] = round(float(np.mean(fps)), 4)
                    if method == "lora":
                        ious, fps = score(raw, f"segment <{name}>", "eval", pos, neg)
                        rows["lora_no_verifier"][k] += ious
                        fp["lora_no_verifier"][k] += fps
            per_concept.append(entry)
            say(str(entry))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary: dict[str, Any] = {
        "eval": "personal",
        "model": bundle.source,
        "concepts": concepts,
        "positive_scenes_per_concept": scenes,
        "negative_scenes_per_concept": negatives,
        "lora_steps": steps or FitConfig().steps,
        "miou": {
            m: {f"{k}shot": round(float(np.mean(rows[m][k])), 4) for k in shots} for m in rows_of
        },
        "false_positive_rate": {
            m: {f"{k}shot": round(float(np.mean(fp[m][k])), 4) for k in shots} for m in rows_of
        },
        "fit_seconds_median": {
            m: {f"{k}shot": round(statistics.median(fit_s[m][k]), 2) for k in shots}
            for m in methods
            if m != "base"
        },
        "per_concept": per_concept,
        "threads": torch.get_num_threads(),
    }
    return summary


def bench_personalize(
    bundle: Bundle, *, shots: int = 5, steps: int | None = None, switches: int = 20
) -> dict[str, Any]:
    """Fit time, peak memory, adapter size on disk, adapter switch time (two users)."""
    import resource

    from segapp.benchmarks import machine

    root = Path(tempfile.mkdtemp(prefix="segapp-bench-personalize-"))
    try:
        store = ConceptStore(root)
        concepts = sample_concepts(2, 0)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        infos = []
        fit_times = []
        for user, concept in zip(("alice", "bob"), concepts, strict=True):
            shot, pos, _ = concept_data(concept, 0, shots=shots, scenes=1, negatives=0, seed=0)
            t0 = time.perf_counter()
            infos.append(
                fit_concept(
                    bundle,
                    store,
                    user,
                    "thing",
                    [s[0] for s in shot],
                    [s[1] for s in shot],
                    steps=steps,
                )
            )
            fit_times.append(time.perf_counter() - t0)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seg = PersonalSegmenter(bundle, store)
        seg.set_image(pos[0][0])
        for user in ("alice", "bob"):  # load both (first load is not a switch)
            seg.predict("segment <thing>", user=user)
        switch, total, base = [], [], []
        for i in range(switches):
            user = ("alice", "bob")[i % 2]
            res = seg.predict("segment <thing>", user=user)
            switch.append(res.timings["adapter_switch"])
            total.append(res.timings["predict_total"])
            t0 = time.perf_counter()
            seg.predict("the red circle")
            base.append(time.perf_counter() - t0)
        med = statistics.median
        return {
            "bench": "personalize",
            "model": bundle.source,
            "shots": shots,
            "steps": infos[0].steps,
            "fit_s": [round(t, 2) for t in fit_times],
            "peak_rss_mb": round(rss1 / 1024, 1),
            "fit_rss_growth_mb": round((rss1 - rss0) / 1024, 1),
            "adapter_bytes": infos[0].size_bytes,
            "adapter_files": sorted(p.name for p in Path(infos[0].path).iterdir()),
            "switch_ms_median": round(1000 * med(switch), 3),
            "switch_ms_max": round(1000 * max(switch), 3),
            "personal_predict_ms": round(1000 * med(total), 2),
            "base_predict_ms": round(1000 * med(base), 2),
            "switch_vs_predict": round(med(switch) / med(total), 4),
            "machine": {**machine(), "platform": platform.platform()},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
