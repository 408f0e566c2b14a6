"""The fitting pool of a LoRA concept: augmented scenes made from the shots, encoded once by
the frozen encoders, and the concept verifier fitted on part of it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segapp.build import Bundle
from segapp.data.batches import deepest_point, patch_cover
from segapp.modeling.segllm import SegLLM
from segapp.personalize.concepts import augment, cutout
from segapp.personalize.reference import COLOUR_BINS, Reference, shot_colours
from segapp.personalize.verify import (
    Verifier,
    fit_verifier,
    mask_features,
    scene_candidates,
)
from segapp.preprocess import (
    THUMBNAIL_SIZE,
    mask_tensor,
    sam_tensor,
    sam_thumbnail,
    vision_tensor,
)


@dataclass
class Pool:
    """Fitting examples with their frozen encodings."""

    tokens: torch.Tensor  # P x N x H vision tokens
    sam: torch.Tensor  # P x D x h x w SAM embeddings
    masks: torch.Tensor  # P x S x S targets in the SAM frame (zeros for negatives)
    points: torch.Tensor  # P x 2 deepest target point, SAM frame
    positive: torch.Tensor  # P bool
    cover: torch.Tensor  # P x N share of each LLM image token the target covers
    thumbs: torch.Tensor  # P x 3 x T x T RGB of the SAM frame (verifier features)
    input_sizes: list[tuple[int, int]]  # (h, w) of each image inside the SAM frame
    shots: int  # the first ``shots`` examples are the user's shots themselves


@torch.no_grad()
def build_pool(
    model: SegLLM,
    bundle: Bundle,
    shots: list[tuple[np.ndarray, np.ndarray]],
    *,
    positives: int,
    negatives: int,
    seed: int,
) -> Pool:
    rng = np.random.default_rng([23, seed])
    cuts = [cutout(img, m) for img, m in shots]
    items = list(shots)
    items += [augment(cuts, rng, present=True) for _ in range(positives)]
    items += [augment(cuts, rng, present=False) for _ in range(negatives)]
    cfg = bundle.config
    vis = torch.stack([vision_tensor(img, cfg.vision_image_size)[0] for img, _ in items])
    framed = [sam_tensor(img, cfg.sam_image_size) for img, _ in items]
    sam = torch.stack([px for px, _ in framed])
    tokens, embs = [], []
    for i in range(0, len(items), 32):
        tokens.append(model.encode_vision(vis[i : i + 32].to(model.device)))
        embs.append(model.encode_sam(sam[i : i + 32].to(model.device)))
    points, masks, covers = [], [], []
    grid = cfg.vision_image_size // cfg.vision_patch // cfg.vision_merge
    for img, m in items:
        covers.append(patch_cover(m[None], grid)[0])
        scale = cfg.sam_image_size / max(img.shape[:2])
        x, y = deepest_point(m) if m.any() else (0.0, 0.0)
        points.append((x * scale, y * scale))
        masks.append(mask_tensor(m[None], cfg.sam_image_size)[0])
    dev = model.device
    return Pool(
        tokens=torch.cat(tokens),
        sam=torch.cat(embs),
        masks=torch.stack(masks).to(dev),
        points=torch.tensor(points, dtype=torch.float32, device=dev),
        positive=torch.tensor([bool(m.any()) for _, m in items], device=dev),
        cover=torch.stack(covers).to(dev),
        thumbs=torch.stack([sam_thumbnail(px) for px in sam]),
        input_sizes=[size for _, size in framed],
        shots=len(shots),
    )


@torch.no_grad()
def fit_pool_verifier(model: SegLLM, pool: Pool, scenes: int) -> Verifier:
    """The concept verifier (see verify.py) on up to ``scenes`` of the pool's augmented scenes
    (the shots themselves included), with the fitted adapter's mask decoder."""
    pick = np.linspace(0, len(pool.positive) - 1, min(scenes, len(pool.positive))).round()
    shots = torch.stack([_target(pool, i) for i in range(pool.shots)])
    own = [
        mask_features(pool.thumbs[i], pool.sam[i : i + 1], shots[i : i + 1])
        for i in range(pool.shots)
    ]
    forms = torch.cat([form for _, form in own])
    hists = torch.cat([appearance[:, :COLOUR_BINS] for appearance, _ in own])  # see mask_features
    colours = shot_colours(pool.thumbs[: pool.shots], shots)
    reference = Reference(shots, forms, colours, hists)
    found = []
    for i in sorted({int(v) for v in pick}):
        target = _target(pool, i) if bool(pool.positive[i]) else None
        found.append(
            scene_candidates(
                model, pool.thumbs[i], pool.sam[i : i + 1], pool.input_sizes[i], target, reference
            )
        )
    return fit_verifier(found, reference)


def _target(pool: Pool, i: int) -> torch.Tensor:
    """Example ``i``'s target as a THUMBNAIL_SIZE square bool mask in the SAM frame."""
    low = pool.masks[i][None, None].float().cpu()
    return F.interpolate(low, (THUMBNAIL_SIZE, THUMBNAIL_SIZE), mode="area")[0, 0] >= 0.5
