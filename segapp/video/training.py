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

from segapp.config import ModelConfig, TrainConfig
from segapp.data.answers import in_order
from segapp.data.batches import patch_cover
from segapp.data.videos import generate_clip
from segapp.modeling.losses import bce_loss, dice_loss, lm_loss
from segapp.modeling.pointer import SegPointer
from segapp.modeling.segllm import SegLLM
from segapp.preprocess import mask_tensor, sam_tensor, vision_tensor
from segapp.tokenizer import ChatFormat
from segapp.train_losses import AuxHeads, decode_per_image, pointer_choice, target_bce
from segapp.video.sampling import sample_frames
from segapp.video.tracks import PointTrack, all_tokens, pointer_grid
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
    frames: tuple[int, ...] = ()  # the video frames of vision_pixels
    sam_frames: tuple[int, ...] = ()  # the video frames of sam_pixels
    vision_cover: torch.Tensor | None = None  # T x N share of each LLM token the target covers


def is_video_step(step: int, fraction: float) -> bool:
    """True on a share `fraction` of steps, spread evenly (deterministic, resumable)."""
    return fraction > 0 and int((step + 1) * fraction) > int(step * fraction)


def make_video_sample(
    cfg: ModelConfig,
    seed: int,
    step: int,
    *,
    extra: int = 0,
    dense: int = 4,
    sam_frames: int = 2,
    answer_order: str = "seg_first",
) -> VideoSample:
    """Clip `extra` of joint step `step` (extra 0: the clip of the one-clip recipe, the same
    stream as before several clips per step existed; each further one draws its own)."""
    rng = np.random.default_rng([seed, step, 11] + ([extra] if extra else []))
    clip = generate_clip("train", int(rng.integers(2**31)))
    picks = sample_frames(len(clip.frames), dense=dense).dense
    vis = torch.stack([vision_tensor(clip.frames[i], cfg.vision_image_size)[0] for i in picks])
    chosen = rng.choice(len(clip.frames), size=sam_frames, replace=False)
    sam = torch.stack([sam_tensor(clip.frames[i], cfg.sam_image_size)[0] for i in chosen])
    masks = mask_tensor(clip.masks[chosen], cfg.sam_image_size)
    merge = MERGES[int(rng.integers(len(MERGES)))]
    answer = in_order(clip.answer, answer_order, clip.phrase)  # restate: the phrase too
    grid = cfg.vision_image_size // cfg.vision_patch // cfg.vision_merge
    cover = patch_cover(clip.masks[list(picks)], grid)
    return VideoSample(
        vis,
        sam,
        masks,
        clip.instruction,
        answer,
        merge,
        tuple(int(i) for i in picks),
        tuple(int(i) for i in chosen),
        cover,
    )


@dataclass
class ClipPass:
    """One teacher-forced LLM pass over a video sample (`clip_pass`)."""

    ce: torch.Tensor  # text cross-entropy of the answer
    ids: torch.Tensor  # 1 x L prompt + answer token ids
    last: torch.Tensor  # 1 x L x H last-layer hidden states
    slots: torch.Tensor  # L bool (cpu): the visual tokens' positions
    hidden: torch.Tensor  # S x H hidden states that predicted each [SEG]
    index: torch.Tensor  # V x 2 (frame, patch) of each visual token the LLM read


def clip_pass(
    model: SegLLM, tokens: torch.Tensor, sample: VideoSample, chat: ChatFormat
) -> ClipPass:
    """The LLM reads the T x N frame tokens (DyCoke-merged at `sample.merge`, kept tokens at
    their unmerged RoPE positions, as `segapp video` does) and the instruction, teacher-forced
    on the sample's answer."""
    device = model.device
    t, n, _ = tokens.shape
    if sample.merge is None:
        visual, offsets, index = tokens.reshape(t * n, -1), torch.arange(t * n), all_tokens(t, n)
    else:
        merged = temporal_token_merge(tokens.detach(), sample.merge)
        visual = tokens[merged.index[:, 0], merged.index[:, 1]]  # gradients flow to kept tokens
        offsets, index = merged.flat_positions.cpu(), merged.index.cpu()
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
    mask = model.lm_attention_mask(
        torch.tensor([len(prompt)], device=device), ids.shape[1], None, embeds.dtype
    )
    ce, last = lm_loss(
        model.llm,
        labels,
        inputs_embeds=embeds,
        position_ids=positions[None].to(device),
        attention_mask=mask,
    )
    hidden = last[SegLLM.seg_source_mask(ids, model.seg_token_id)]
    return ClipPass(ce, ids, last, slots, hidden, index)


def video_losses(
    model: SegLLM,
    sample: VideoSample,
    chat: ChatFormat,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    aux: AuxHeads | None = None,
) -> dict[str, torch.Tensor]:
    """Text CE + 2.0 BCE + 0.5 Dice of one video sample ('video_total' is their weighted sum).

    With `tcfg.video_token_losses` (and the training-only heads `aux`), also the target head's
    BCE and the `[SEG]` pointer's cross-entropy over every visual token of every LLM frame,
    the dense "which tokens are the target" signal the image batches get."""
    device = model.device
    feats = model.vision_tower(pixel_values=sample.vision_pixels.to(device)).last_hidden_state
    tokens = model.add_motion(model.project(feats[:, 1:], cfg.vision_image_size))  # T x N x H
    run = clip_pass(model, tokens, sample, chat)
    ce, ids, last, slots, hidden, index = (
        run.ce,
        run.ids,
        run.last,
        run.slots,
        run.hidden,
        run.index,
    )
    terms = {"video_ce": ce}
    total = tcfg.ce_weight * ce
    track: PointTrack | None = None
    if tcfg.video_token_losses:
        if aux is None or sample.vision_cover is None:
            raise ValueError("video_token_losses needs the training heads and the clip's cover")
        image_hidden = last[0, slots.to(device)]  # V x H, the kept visual tokens in order
        cover = sample.vision_cover.to(device)[index[:, 0], index[:, 1]]  # V
        if tcfg.target_weight:
            terms["video_target"] = target_bce(aux.target, image_hidden, cover)
            total = total + tcfg.target_weight * terms["video_target"]
        if hidden.shape[0] and bool(cover.gt(0).any()):
            scores = (model.video_pointer or aux.pointer).scores(hidden[:1], image_hidden)
            terms["video_seg_pointer"] = SegPointer.loss(scores, cover[None])
            total = total + tcfg.pointer_weight * terms["video_seg_pointer"]
            if model.video_seg_pointer is not None:  # SAM is prompted with its track
                grid = pointer_grid(scores, index, *sample.vision_cover.shape)[0]  # T x N
                track = _track_on(model, grid, sample, tcfg)
    if hidden.shape[0]:
        prompts = model.seg_prompts(hidden[:1])  # one target per clip
        if tcfg.video_pointer and model.seg_pointer is not None:
            track, terms["video_pointer"] = _pointer_track(
                model, hidden[:1], last, ids, index, sample, tcfg
            )
            total = total + tcfg.pointer_weight * terms["video_pointer"]
        emb = model.encode_sam(sample.sam_pixels.to(device))
        frames = emb.shape[0]
        # One-Token-Seg-All: the same prompt on every frame, all frames in one decoder call
        frame_prompts = prompts.expand(frames, -1, -1)
        if track is not None:  # with the pointer's point on each frame, as `segapp video`
            points = torch.cat([track.at(f) for f in sample.sam_frames])
            frame_prompts = torch.cat(
                [frame_prompts, model.point_token(points).to(prompts.dtype)], 1
            )
        image_of = torch.arange(frames, device=emb.device)
        pred, _ = decode_per_image(model, emb, frame_prompts, image_of)
        target = sample.sam_masks.to(device)
        terms["video_bce"] = bce_loss(pred, target)
        terms["video_dice"] = dice_loss(pred, target)
        total = (
            total + tcfg.bce_weight * terms["video_bce"] + tcfg.dice_weight * terms["video_dice"]
        )
    terms["video_total"] = total
    return terms


def _track_on(
    model: SegLLM, grid: torch.Tensor, sample: VideoSample, tcfg: TrainConfig
) -> PointTrack:
    """The track SAM is prompted with from the pointer's T x N grid: on each LLM frame,
    `pointer_teacher` of the time its best token on the target, else where it points (a frame
    without the target: where it points), as `segapp video` prompts SAM."""
    assert sample.vision_cover is not None
    n = sample.vision_cover.shape[1]
    choice = pointer_choice(grid, sample.vision_cover.to(grid.device), tcfg.pointer_teacher, None)
    points = model.patch_centres(n, model.vision_size)[choice]
    return PointTrack(list(sample.frames), points[None])


def _pointer_track(
    model: SegLLM,
    hidden: torch.Tensor,
    last: torch.Tensor,
    ids: torch.Tensor,
    index: torch.Tensor,
    sample: VideoSample,
    tcfg: TrainConfig,
) -> tuple[PointTrack, torch.Tensor]:
    """The `[SEG]` pointer on every LLM frame: its loss against the target's cover per frame
    (a frame without the target adds nothing) and the point track SAM is prompted with
    (`pointer_teacher` of the frames on the target, else where the pointer points)."""
    assert model.video_pointer is not None and sample.vision_cover is not None
    slots = ids[0] == model.image_token_id
    image_hidden = last[0, slots]
    t, n = sample.vision_cover.shape
    scores = model.video_pointer.scores(hidden, image_hidden)
    grid = pointer_grid(scores, index, t, n)[0]  # T x N
    loss = SegPointer.loss(grid, sample.vision_cover.to(grid.device))
    return _track_on(model, grid, sample, tcfg), loss
