"""Segmenter: encode an image once (`set_image`), then answer many instructions (`predict`).

numpy / PIL in and out; batched torch underneath. The cache of the current image is visible as
`Segmenter.cache` and the encoder call counters as `Segmenter.encoder_calls`.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from segapp.build import Bundle, load_model
from segapp.data.answers import group_noun, is_group_answer
from segapp.errors import InputError
from segapp.images import check_instruction, to_rgb_array
from segapp.modeling.generation import Generation
from segapp.preprocess import postprocess_logits, sam_tensor, sam_thumbnail, vision_tensor
from segapp.targets import complete_targets, marked_prompts
from segapp.tokenizer import SEG_TOKEN

_LEAD = re.compile(
    r"^(?:sure|yes|ok(?:ay)?|it is|it's|this is|that is|and|so|the answer is)\b[\s,]*"
)
_WHERE = re.compile(r"\s+(?:at|on|in) the (?:top|bottom|left|right|center)(?: (?:left|right))?$")


@dataclass
class MaskResult:
    """One target: a bool mask at the original image size (H x W) with its label and score."""

    label: str
    score: float
    mask: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        from segapp.export import mask_record

        return mask_record(self.mask, label=self.label, score=self.score)


@dataclass
class Result:
    """What one instruction produced: the answer text and one mask per target (per `[SEG]`,
    except that a multi-target answer may drop repeats and add objects: segapp/targets.py)."""

    instruction: str
    answer: str
    masks: list[MaskResult]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def to_dict(self, image: str | None = None) -> dict[str, Any]:
        return {
            "image": image,
            "instruction": self.instruction,
            "answer": self.answer,
            "masks": [m.to_dict() for m in self.masks],
        }


@dataclass
class ImageCache:
    """Encodings of the current image (what makes a warm `predict` cheap)."""

    key: str  # sha1 of the pixels
    original_size: tuple[int, int]  # (H, W)
    sam_input_size: tuple[int, int]  # (h, w) inside the padded SAM frame
    image_tokens: torch.Tensor  # 1 x N x H_llm projected vision tokens
    sam_embedding: torch.Tensor  # 1 x D x h x w
    thumbnail: torch.Tensor | None = None  # 3 x T x T RGB of the SAM frame (sam_thumbnail)
    pixels: np.ndarray | None = None  # H x W x 3 uint8: the image itself (mask refinement)


@dataclass
class Prepared:
    """One image normalised for both encoders (CPU work, safe to do in worker threads)."""

    key: str  # sha1 of the pixels
    original_size: tuple[int, int]  # (H, W)
    sam_input_size: tuple[int, int]  # (h, w) inside the padded SAM frame
    vision: torch.Tensor  # 3 x V x V, CLIP-normalised
    sam: torch.Tensor  # 3 x S x S, SAM-normalised and padded
    pixels: np.ndarray | None = None  # H x W x 3 uint8: the image itself


def _short(phrase: str, *, drop_place: bool = False) -> str:
    phrase = phrase.strip().lower()
    while (stripped := _LEAD.sub("", phrase).strip()) != phrase:  # "so it is the ..."
        phrase = stripped
    phrase = re.sub(r"^(?:the|a|an)\s+", "", phrase)
    return _WHERE.sub("", phrase).strip() if drop_place else phrase


def mask_labels(answer: str, count: int) -> list[str]:
    """A short label per `[SEG]`: the phrase just before it in the answer ("small red
    circle"), else the one just after it ("It is [SEG], the small red circle at the top.")."""
    pieces = answer.split(SEG_TOKEN)
    labels = []
    for i in range(min(count, len(pieces) - 1)):
        phrase = _short(re.split(r"[,:;.!?]", pieces[i])[-1])
        if not phrase:
            after = re.split(r"[:;.!?(]| because ", pieces[i + 1].lstrip(" ,"))[0]
            phrase = _short(after.split(",")[0], drop_place=True)
        labels.append(phrase or f"target {i + 1}")
    return labels + [f"target {i + 1}" for i in range(len(labels), count)]


def group_masks(
    group: MaskResult, targets: list[MaskResult], *, min_area: float = 0.003
) -> list[MaskResult]:
    """The targets of a `group_first` answer: its per-target masks, a repeat (IoU > 0.5 with
    one kept before it) or an empty one dropped, then every connected component of the group
    mask (8-connected, at least `min_area` of the image) that no kept mask covers by half,
    labelled after the group ("circles 3").

    Why: the LLM reads the image as 8 x 8 tokens and says "two" for most groups of three or
    four, while the group's union mask is at full resolution, where the synthetic test split's
    targets separate into the right number of components 92% of the time.
    """
    n, comp = cv2.connectedComponents(group.mask.astype(np.uint8), connectivity=8)
    parts = [comp == c for c in range(1, n)]
    kept, added = complete_targets([t.mask for t in targets], parts, min_area=min_area)
    masks = [targets[i] for i in kept]
    for i in added:
        masks.append(MaskResult(f"{group.label} {len(masks) + 1}", group.score, parts[i]))
    return masks


class Segmenter:
    """Reason, then segment, on one image at a time."""

    def __init__(self, bundle: Bundle, *, max_new_tokens: int = 48) -> None:
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.max_new_tokens = max_new_tokens
        self.cache: ImageCache | None = None
        self.encoder_calls = {"vision": 0, "sam": 0}

    @classmethod
    def from_pretrained(cls, name_or_dir: str = "tiny", *, device: str = "cpu") -> Segmenter:
        return cls(load_model(name_or_dir, device=device))

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prepare(self, image: Any) -> Prepared:
        """Normalise `image` (HxW[xC] array or PIL image) for both encoders; no model call."""
        rgb = to_rgb_array(image)
        key = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        cfg = self.bundle.config
        vis, _ = vision_tensor(rgb, cfg.vision_image_size, crop=cfg.vision_resize == "crop")
        sam_px, input_size = sam_tensor(rgb, self.model.sam.image_encoder.img_size)
        return Prepared(key, (rgb.shape[0], rgb.shape[1]), input_size, vis, sam_px, rgb.copy())

    @torch.inference_mode()
    def set_image(self, image: Any) -> ImageCache:
        """Encode `image` (HxW[xC] array or PIL image) with both encoders and cache the result."""
        rgb = to_rgb_array(image)
        key = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        if self.cache is not None and self.cache.key == key:
            return self.cache
        cfg = self.bundle.config
        t0 = time.perf_counter()
        vis, _ = vision_tensor(rgb, cfg.vision_image_size, crop=cfg.vision_resize == "crop")
        tokens = self.model.encode_vision(vis[None].to(self.device))
        self.encoder_calls["vision"] += 1
        t1 = time.perf_counter()
        sam_px, input_size = sam_tensor(rgb, self.model.sam.image_encoder.img_size)
        emb = self.model.encode_sam(sam_px[None].to(self.device))
        self.encoder_calls["sam"] += 1
        t2 = time.perf_counter()
        self.cache = ImageCache(
            key,
            (rgb.shape[0], rgb.shape[1]),
            input_size,
            tokens,
            emb,
            sam_thumbnail(sam_px),
            rgb.copy(),
        )
        self.last_encode_timings = {"vision_tower": t1 - t0, "sam_encoder": t2 - t1}
        return self.cache

    @torch.inference_mode()
    def encode_batch(self, images: Sequence[Prepared]) -> list[ImageCache]:
        """Run both encoders once on B prepared images (B x 3 x V x V and B x 3 x S x S).

        Returns one cache per image (not made current). A lone image is encoded next to a
        copy of itself: on CPU a batch of one takes other kernels for some layers (SAM's 3x3
        neck conv) whose float results differ in the last bits, so this keeps every image's
        encoding independent of how images were grouped into batches.
        """
        if not images:
            return []
        group = list(images) if len(images) > 1 else [images[0], images[0]]
        vis = torch.stack([p.vision for p in group]).to(self.device)
        sam_px = torch.stack([p.sam for p in group]).to(self.device)
        tokens = self.model.encode_vision(vis)
        emb = self.model.encode_sam(sam_px)
        self.encoder_calls["vision"] += 1
        self.encoder_calls["sam"] += 1
        return [
            ImageCache(
                p.key,
                p.original_size,
                p.sam_input_size,
                tokens[i : i + 1],
                emb[i : i + 1],
                sam_thumbnail(p.sam),
                p.pixels,
            )
            for i, p in enumerate(images)
        ]

    def prompt_ids(self, instruction: str) -> tuple[str, list[int]]:
        """The checked instruction and its prompt token ids; `InputError` if unusable."""
        text = check_instruction(instruction)
        ids = self.bundle.chat.prompt_ids(text)
        max_len = self.bundle.config.max_positions
        if len(ids) >= max_len - 4:
            raise InputError(
                f"instruction is too long for this model ({len(ids)} tokens with the image, "
                f"limit {max_len - 4})",
                "instruction",
            )
        return text, ids

    def _seg_logits(
        self, gen: Generation, cache: ImageCache, *, group: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (M x 1 x h x w) and predicted IoU (M x 1), one per `[SEG]`;
        `group`: the first `[SEG]` is a group's, prompted without a point."""
        prompts = self.model.generation_prompts(gen)
        if group:
            rows = torch.arange(len(prompts), device=prompts.device) == 0
            prompts = self.model.without_point(prompts, rows)
        return self.model.decode_masks(cache.sam_embedding, prompts)

    def _masks(self, answer: str, gen: Generation, cache: ImageCache) -> list[MaskResult]:
        """One mask per target `[SEG]` hidden state, at the original image size (a group
        `[SEG]`'s mask adds the targets the others missed: `group_masks`; with a target head,
        a multi-target answer's repeats are dropped and the marked objects added:
        `_with_marked`)."""
        if not len(gen.seg_hidden):
            return []
        group = self.bundle.config.multi_group and is_group_answer(answer)
        low, iou = self._seg_logits(gen, cache, group=group)
        logits = postprocess_logits(
            low,
            cache.sam_input_size,
            cache.original_size,
            self.model.sam.image_encoder.img_size,
        )
        binary = (logits > 0).cpu().numpy()
        scores = iou[:, 0].float().clamp(0, 1).cpu().tolist()
        labels = mask_labels(answer, len(binary))
        if group:
            return group_masks(
                MaskResult(labels[0], scores[0], binary[0]),
                [
                    MaskResult(lab, s, m)
                    for lab, s, m in zip(labels[1:], scores[1:], binary[1:], strict=True)
                ],
            )
        named = [MaskResult(lab, s, m) for lab, s, m in zip(labels, scores, binary, strict=True)]
        if len(named) >= 2 and self.model.target_head is not None:
            return self._with_marked(named, low, answer, gen, cache)
        return named

    def _with_marked(
        self,
        named: list[MaskResult],
        named_low: torch.Tensor,
        answer: str,
        gen: Generation,
        cache: ImageCache,
    ) -> list[MaskResult]:
        """A multi-target answer's masks completed from the target head (segapp/targets.py):
        repeats dropped, the marked objects no `[SEG]` mask covers added ("circles 3").
        Decided on SAM's low-res masks, so only the added ones are resized to the image."""
        prompts, _ = marked_prompts(self.model, gen)
        low = named_low[:0]
        iou = named_low.new_zeros(0, 1)
        if len(prompts):
            low, iou = self.model.decode_masks(cache.sam_embedding, prompts)
        # the image's part of SAM's padded low-res frame
        scale = named_low.shape[-1] / self.model.sam.image_encoder.img_size
        frame = [math.ceil(side * scale) for side in cache.sam_input_size]
        kept, added = complete_targets(
            list((named_low[:, 0, : frame[0], : frame[1]] > 0).cpu().numpy()),
            list((low[:, 0, : frame[0], : frame[1]] > 0).cpu().numpy()),
        )
        masks = [named[i] for i in kept]
        if not added:
            return masks
        logits = postprocess_logits(
            low[added],
            cache.sam_input_size,
            cache.original_size,
            self.model.sam.image_encoder.img_size,
        )
        noun = group_noun(answer) or "target"
        added_scores = iou[added, 0].float().clamp(0, 1).tolist()
        for mask, score in zip((logits > 0).cpu().numpy(), added_scores, strict=True):
            masks.append(MaskResult(f"{noun} {len(masks) + 1}", score, mask))
        return masks

    @torch.inference_mode()
    def predict(self, instruction: str) -> Result:
        """Answer `instruction` about the current image; one mask per `[SEG]` in the answer
        (a multi-target answer completed by the target head, `_masks`)."""
        if self.cache is None:
            raise InputError("no image set: call set_image(image) before predict()", "Segmenter")
        text, prompt = self.prompt_ids(instruction)
        cache = self.cache
        t0 = time.perf_counter()
        ids = torch.tensor([prompt], device=self.device)
        gen = self.model.generate(ids, cache.image_tokens, max_new_tokens=self.max_new_tokens)
        t1 = time.perf_counter()
        answer = self.bundle.chat.decode(gen.token_ids)
        masks = self._masks(answer, gen, cache)
        t2 = time.perf_counter()
        timings = {
            "llm_prefill": gen.prefill_s,
            "generation": gen.decode_s,
            "prompt_tokens": float(gen.prefill_tokens),
            "new_tokens": float(len(gen.token_ids)),
            "predict_total": t2 - t0,
            "mask_decode": t2 - t1,
        }
        return Result(text, answer, masks, timings)

    @torch.inference_mode()
    def predict_batch(self, queries: Sequence[tuple[ImageCache, str]]) -> list[Result]:
        """`predict` for many (image cache, instruction) pairs, decoding them together.

        Pairs whose prompts have the same token length share one batched greedy decoding
        (no padding, so every row computes exactly what `predict` computes alone); masks are
        decoded per pair. Bad instructions raise `InputError` before any model call.
        """
        prompts = [self.prompt_ids(instruction) for _, instruction in queries]
        by_length: dict[int, list[int]] = {}
        for index, (_, prompt) in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        results: list[Result | None] = [None] * len(queries)
        for indices in by_length.values():
            ids = torch.tensor([prompts[i][1] for i in indices], device=self.device)
            tokens = torch.cat([queries[i][0].image_tokens for i in indices])
            gens = self.model.generate_batch(ids, tokens, max_new_tokens=self.max_new_tokens)
            for i, gen in zip(indices, gens, strict=True):
                answer = self.bundle.chat.decode(gen.token_ids)
                timings = {
                    "llm_prefill": gen.prefill_s,
                    "generation": gen.decode_s,
                    "prompt_tokens": float(gen.prefill_tokens),
                    "new_tokens": float(len(gen.token_ids)),
                }
                masks = self._masks(answer, gen, queries[i][0])
                results[i] = Result(prompts[i][0], answer, masks, timings)
        return [r for r in results if r is not None]

    def segment(self, image: Any, instruction: str) -> Result:
        """set_image + predict in one call."""
        self.set_image(image)
        return self.predict(instruction)
