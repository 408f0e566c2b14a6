"""Point refinement: clicked positive / negative points sharpen one `[SEG]` mask through SAM.

The selected `[SEG]` prompt token and SAM's own point tokens go into the mask decoder together
(sparse prompts 1 x (1 + P + 1) x D, SAM's padding point included), so the LLM's target stays
the anchor and the points move its border.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from segapp.errors import InputError
from segapp.predictor import ImageCache, MaskResult, Segmenter, mask_labels
from segapp.preprocess import postprocess_logits


def check_points(
    points: Sequence[tuple[float, float, int]], size: tuple[int, int] | None = None
) -> None:
    """InputError unless there are points, labelled 0/1, inside an image of `size` (H, W)."""
    if not points:
        raise InputError("no points: click on the image to add some", "points")
    for x, y, label in points:
        if label not in (0, 1):
            raise InputError(f"point label must be 0 or 1, got {label}", "points")
        if size is not None and not (0 <= x < size[1] and 0 <= y < size[0]):
            raise InputError(f"point ({x}, {y}) is outside the {size[1]}x{size[0]} image", "points")


@torch.inference_mode()
def refine_mask(
    segmenter: Segmenter,
    cache: ImageCache,
    instruction: str,
    points: Sequence[tuple[float, float, int]],
    index: int | None = 0,
) -> MaskResult:
    """Mask `index` of the answer to `instruction`, re-decoded with `points` added.

    points: (x, y, label) in original image pixels (label 1 positive, 0 negative).
    index None, or an answer without that many masks: the points alone prompt SAM.
    """
    model, device = segmenter.model, segmenter.device
    sam_size = model.sam.image_encoder.img_size
    label = "refined"
    tokens = []
    if index is not None:
        _, prompt = segmenter.prompt_ids(instruction)
        ids = torch.tensor([prompt], device=device)
        gen = model.generate(ids, cache.image_tokens, max_new_tokens=segmenter.max_new_tokens)
        count = len(gen.seg_hidden)
        if not 0 <= index < max(count, 1):
            raise InputError(f"mask {index} does not exist (the answer has {count})", "mask")
        if count:
            tokens.append(model.generation_prompts(gen)[index : index + 1])
            answer = segmenter.bundle.chat.decode(gen.token_ids)
            label = mask_labels(answer, count)[index]
    (height, width), (h, w) = cache.original_size, cache.sam_input_size
    scale = torch.tensor([w / width, h / height], device=device)
    coords = torch.tensor([[p[0], p[1]] for p in points], device=device, dtype=torch.float32)
    labels = torch.tensor([[int(p[2]) for p in points]], device=device)
    pe = model.sam.prompt_encoder
    point_tokens = pe._embed_points((coords * scale)[None], labels, pad=True)
    tokens.append(point_tokens.to(cache.sam_embedding.dtype))
    sparse = torch.cat([t.to(cache.sam_embedding.dtype) for t in tokens], dim=1)
    low, iou = model.decode_masks(cache.sam_embedding, sparse)
    logits = postprocess_logits(low, cache.sam_input_size, cache.original_size, sam_size)
    mask = (logits[0] > 0).cpu().numpy()
    return MaskResult(label, float(iou[0, 0].float().clamp(0, 1)), mask)
