"""Multi-target answers completed from the target head: the objects the instruction asks for
that none of the answer's `[SEG]` masks covers.

The tiny model reads the image as 8 x 8 tokens and answers "all the circles" with two `[SEG]`s
whatever the count (on the first 700 test samples, 74 of 97 multi-target instructions have two
targets, and in 17 of those the two `[SEG]` masks were the same object). Its target head, a
linear read-out of each image token's last-layer hidden state trained with `--target-weight`,
says per token whether it lies on something the instruction asks for, and it does so for every
target at once rather than one per `[SEG]`. For a multi-target answer (two `[SEG]`s or more)
the predictor:

1. keeps the `[SEG]` masks, an empty one or a repeat (IoU > 0.5 with one kept) dropped;
2. prompts SAM at every image token the head marks with probability >= `target_threshold`,
   most probable first, with the `[SEG]` embedding whose pointer scores that token highest and
   the point at the token's patch centre;
3. adds each such mask that is not tiny and that no kept mask covers by half.

One-target answers are left alone: there the pointer already chose among the marked tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from segapp.modeling.generation import Generation
    from segapp.modeling.segllm import SegLLM


def target_probs(model: SegLLM, gen: Generation) -> torch.Tensor | None:
    """N' probabilities that each image token the LLM saw lies on a target (None: the model has
    no target head, or the generation kept no image hidden states)."""
    if model.target_head is None or gen.image_hidden is None:
        return None
    return torch.sigmoid(model.target_head(gen.image_hidden).float()[:, 0])


def marked_prompts(model: SegLLM, gen: Generation) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM prompts (C x 2 x D) for the image tokens the target head marks (probability >=
    `model.target_threshold`), most probable first, and those probabilities (C). Each prompt
    is the `[SEG]` whose pointer scores the token highest, with the point at that token's patch
    centre. Empty without a target head, a pointer or a `[SEG]`."""
    probs = target_probs(model, gen)
    width = model.sam.prompt_encoder.embed_dim
    if probs is None or model.seg_pointer is None or not len(gen.seg_hidden):
        return gen.seg_hidden.new_zeros(0, 2, width), gen.seg_hidden.new_zeros(0)
    assert gen.image_hidden is not None  # target_probs returned None otherwise
    order = probs.argsort(descending=True)
    tokens = order[probs[order] >= model.target_threshold]
    scores = model.seg_pointer.scores(gen.seg_hidden, gen.image_hidden)  # M x N'
    seg = scores[:, tokens].argmax(0)
    prompts = model.seg_prompts(
        gen.seg_hidden[seg], gen.image_hidden, gen.image_index, choice=tokens
    )
    return prompts, probs[tokens]


def complete_targets(
    named: list[np.ndarray], marked: list[np.ndarray], *, min_area: float = 0.003
) -> tuple[list[int], list[int]]:
    """Which masks a multi-target answer returns: the indices of the `named` ([SEG]) masks
    kept (not empty, IoU <= 0.5 with every one kept before), then those of the `marked` masks
    added (in the given order: at least `min_area` of the image and covered by less than half
    by every mask kept so far). Masks are H x W bool; `group_masks` uses the same rule for a
    group mask's connected components."""
    kept: list[np.ndarray] = []
    kept_named: list[int] = []
    for i, mask in enumerate(named):
        if mask.any() and all(binary_iou(mask, k) <= 0.5 for k in kept):
            kept.append(mask)
            kept_named.append(i)
    added: list[int] = []
    for i, mask in enumerate(marked):
        area = int(mask.sum())
        if area < min_area * mask.size:
            continue
        if any(int((mask & k).sum()) >= 0.5 * area for k in kept):  # (IoU > 0.5 implies it)
            continue
        kept.append(mask)
        added.append(i)
    return kept_named, added


def binary_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two H x W bool masks (0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0
