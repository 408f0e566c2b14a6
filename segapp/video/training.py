"""Video samples for `segapp train --video-fraction F`: the LLM reads a clip's sampled frames
(optionally DyCoke-merged, as at inference), and its `[SEG]` must segment the target on other
frames of the clip through SAM (One-Token-Seg-All), with LISA's loss. A model with a `[SEG]`
pointer also learns where the target is in each dense frame (the pointer's cross-entropy, over
the frame's patches as `segapp.video.pointing` reads them), and SAM's prompt on a frame is the
`[SEG]` prompt plus the point of the nearest dense frame, as at inference.

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
from segapp.data.videos import generate_clip
from segapp.modeling.losses import bce_loss, dice_loss, text_loss
from segapp.modeling.pointer import SegPointer
from segapp.modeling.segllm import SegLLM
from segapp.preprocess import mask_tensor, sam_tensor, vision_tensor
from segapp.tokenizer import ChatFormat
from segapp.train_losses import pointer_choice
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
    cover: torch.Tensor  # T x N share of each vision patch the target covers, per dense frame
    dense_frames: tuple[int, ...]  # the T frames the LLM reads
    sam_frames: tuple[int, ...]  # the F frames decoded by SAM


def is_video_step(step: int, fraction: float) -> bool:
    """True on a share `fraction` of steps, spread evenly (deterministic, resumable)."""
    return fraction > 0 and int((step + 1) * fraction) > int(step * fraction)


def make_video_sample(
    cfg: ModelConfig, seed: int, step: int, *, dense: int = 4, sam_frames: int = 2
) -> VideoSample:
    rng = np.random.default_rng([seed, step, 11])
    clip = generate_clip("train", int(rng.integers(2**31)))
    picks = sample_frames(len(clip.frames), dense=dense).dense
    vis = torch.stack([vision_tensor(clip.frames[i], cfg.vision_image_size)[0] for i in picks])
    chosen = rng.choice(len(clip.frames), size=sam_frames, replace=False)
    sam = torch.stack([sam_tensor(clip.frames[i], cfg.sam_image_size)[0] for i in chosen])
    masks = mask_tensor(clip.masks[chosen], cfg.sam_image_size)
    merge = MERGES[int(rng.integers(len(MERGES)))]
    grid = cfg.vision_image_size // cfg.vision_patch // cfg.vision_merge
    full = mask_tensor(clip.masks[list(picks)], cfg.vision_image_size)[:, None]
    cover = F.adaptive_avg_pool2d(full, grid).flatten(1)  # T x N
    chosen_frames = tuple(int(i) for i in chosen)
    return VideoSample(
        vis, sam, masks, clip.instruction, clip.answer, merge, cover, tuple(picks), chosen_frames
    )


def _frame_sources(index: torch.Tensor, frames: int, per_frame: int) -> torch.Tensor:
    """T x N: which kept token stands for each (frame, patch): the token itself, or the latest
    kept token at that patch in an earlier frame (what `segapp.video.pointing` reads)."""
    source = torch.full((frames, per_frame), -1, dtype=torch.long)
    source[index[:, 0].cpu(), index[:, 1].cpu()] = torch.arange(len(index))
    for j in range(1, frames):
        missing = source[j] < 0
        source[j][missing] = source[j - 1][missing]
    return source


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
    kept = torch.stack([offsets // n, offsets % n], 1)  # (frame, patch) of each visual token
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
    last = out.hidden_states[-1]
    hidden = last[SegLLM.seg_source_mask(ids, model.seg_token_id)]
    terms = {"video_ce": ce}
    total = tcfg.ce_weight * ce
    if hidden.shape[0]:
        seg = hidden[:1]  # one target per clip
        prompts = model.seg_prompts(seg)
        patches: torch.Tensor | None = None  # patch each SAM frame gets a point at
        if model.seg_pointer is not None:
            source = _frame_sources(kept, t, n).to(device)
            scores = model.seg_pointer.scores(seg, last[0][slots.to(device)])[0][source]  # T x N
            cover = sample.cover.to(device)
            visible = cover.amax(-1) > 0
            if visible.any():
                terms["video_pointer"] = SegPointer.loss(scores[visible], cover[visible])
                total = total + tcfg.pointer_weight * terms["video_pointer"]
            choice = pointer_choice(scores, cover, tcfg.pointer_teacher, None)
            choice = torch.where(visible, choice, scores.detach().argmax(-1))
            nearest = [
                min(range(t), key=lambda j: (abs(sample.dense_frames[j] - f), j))
                for f in sample.sam_frames
            ]
            patches = choice[nearest]
        emb = model.encode_sam(sample.sam_pixels.to(device))
        size = model.sam.image_encoder.img_size
        logits = []
        for f in range(emb.shape[0]):  # One-Token-Seg-All: the same [SEG] prompt on every frame
            frame_prompt = prompts
            if patches is not None:
                centre = model.patch_centres(model.image_grid_tokens, model.vision_size)
                point = model.point_token(centre[patches[f : f + 1]]).to(prompts.dtype)
                frame_prompt = torch.cat([prompts, point], 1)
            low, _ = model.decode_masks(emb[f : f + 1], frame_prompt)
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
