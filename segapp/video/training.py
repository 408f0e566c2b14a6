"""Video samples for `segapp train --video-fraction F`: the LLM reads a clip's sampled frames
(optionally DyCoke-merged, as at inference), and its `[SEG]` must segment the target on other
frames of the clip through SAM (One-Token-Seg-All), with LISA's loss.

`video_losses` is added to the image loss on a share F of the joint-stage steps (see
`is_video_step`); it never touches the image batches, so F = 0 trains exactly as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from segapp.config import ModelConfig, TrainConfig
from segapp.data.queries import in_order
from segapp.data.videos import generate_clip
from segapp.modeling.losses import bce_loss, dice_loss, text_loss
from segapp.modeling.segllm import SegLLM
from segapp.preprocess import mask_tensor, sam_tensor, vision_tensor
from segapp.tokenizer import ChatFormat
from segapp.video.sampling import sample_frames
from segapp.video.ttm import temporal_token_merge

MERGES: tuple[float | None, ...] = (None, 0.5, 0.7)  # TTM ratios a video sample is read with


@dataclass
class VideoSample:
    vision_pixels: torch.Tensor  # T x 3 x V x V, the frames the LLM reads
    sam_pixels: torch.Tensor  # F x 3 x S x S, frames the [SEG] prompt is decoded on
    sam_masks: torch.Tensor  # F x S x S target masks (padded SAM frame)
    instruction: str
    answer: str
    merge: float | None


def is_video_step(step: int, fraction: float) -> bool:
    """True on a share `fraction` of steps, spread evenly (deterministic, resumable)."""
    return fraction > 0 and int((step + 1) * fraction) > int(step * fraction)


def make_video_sample(
    cfg: ModelConfig,
    seed: int,
    step: int,
    *,
    dense: int = 4,
    sam_frames: int = 2,
    answer_order: str = "seg_first",
) -> VideoSample:
    rng = np.random.default_rng([seed, step, 11])
    clip = generate_clip("train", int(rng.integers(2**31)))
    picks = sample_frames(len(clip.frames), dense=dense).dense
    vis = torch.stack([vision_tensor(clip.frames[i], cfg.vision_image_size)[0] for i in picks])
    chosen = rng.choice(len(clip.frames), size=sam_frames, replace=False)
    sam = torch.stack([sam_tensor(clip.frames[i], cfg.sam_image_size)[0] for i in chosen])
    masks = mask_tensor(clip.masks[chosen], cfg.sam_image_size)
    merge = MERGES[int(rng.integers(len(MERGES)))]
    answer = in_order(clip.answer, answer_order)
    return VideoSample(vis, sam, masks, clip.instruction, answer, merge)


def video_losses(
    model: SegLLM, sample: VideoSample, chat: ChatFormat, cfg: ModelConfig, tcfg: TrainConfig
) -> dict[str, torch.Tensor]:
    """Text CE + 2.0 BCE + 0.5 Dice of one video sample ('video_total' is their weighted sum)."""
    device = model.device
    feats = model.vision_tower(pixel_values=sample.vision_pixels.to(device)).last_hidden_state
    tokens = model.project(feats[:, 1:], cfg.vision_image_size)  # T x N x H
    t, n, _ = tokens.shape
    if sample.merge is None:
        visual, offsets = tokens.reshape(t * n, -1), torch.arange(t * n)
    else:
        merged = temporal_token_merge(tokens.detach(), sample.merge)
        visual = tokens[merged.index[:, 0], merged.index[:, 1]]  # gradients flow to kept tokens
        offsets = merged.flat_positions.cpu()
    vchat = dataclasses.replace(chat, image_tokens=len(visual))
    prompt, answer = vchat.prompt_ids(sample.instruction), vchat.answer_ids(sample.answer)
    ids = torch.tensor([prompt + answer], device=device)
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt) :] = ids[0, len(prompt) :]
    slots = (ids[0] == model.image_token_id).cpu()
    first = int(slots.nonzero()[0, 0])
    positions = torch.arange(ids.shape[1])
    positions[slots] = first + offsets
    positions[first + len(visual) :] += t * n - len(visual)
    embeds = model.embed_inputs(ids, visual[None])
    out = model.llm(
        inputs_embeds=embeds, position_ids=positions[None].to(device), output_hidden_states=True
    )
    ce = text_loss(out.logits, labels)
    hidden = out.hidden_states[-1][SegLLM.seg_source_mask(ids, model.seg_token_id)]
    terms = {"video_ce": ce}
    total = tcfg.ce_weight * ce
    if hidden.shape[0]:
        prompts = model.seg_prompts(hidden[:1])  # one target per clip; no pointer in video
        emb = model.encode_sam(sample.sam_pixels.to(device))
        size = model.sam.image_encoder.img_size
        logits = []
        for f in range(emb.shape[0]):  # One-Token-Seg-All: the same prompt on every frame
            low, _ = model.decode_masks(emb[f : f + 1], prompts)
            logits.append(F.interpolate(low, (size, size), mode="bilinear")[:, 0])
        pred = torch.cat(logits)
        target = sample.sam_masks.to(device)
        terms["video_bce"] = bce_loss(pred, target)
        terms["video_dice"] = dice_loss(pred, target)
        total = (
            total + tcfg.bce_weight * terms["video_bce"] + tcfg.dice_weight * terms["video_dice"]
        )
    terms["video_total"] = total
    return terms
