"""VideoSegmenter: reason once over (merged) frame tokens, then segment every frame.

Two streaming passes over the video:
1. `encode_frames`: only the sampled frames go through the vision tower -> `FrameTokens`
   (T x N x H dense tokens, S pooled sparse tokens). Cached per (video, sampling).
2. `reason`: DyCoke TTM on the dense tokens (or none), the LLM answers once, with optional
   DyCoke KV pruning while decoding -> `VideoAnswer` (one SAM prompt per `[SEG]`).
3. `iter_masks`: every frame through SAM's encoder; each `[SEG]` prompt is decoded on every
   frame (One-Token-Seg-All; one decoder call per `sam_batch` frames) -> per-frame masks,
   yielded one frame at a time.
`run` ties them together and writes masks, an overlay video and results.jsonl
(segapp.video.outputs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch

from segapp.build import Bundle
from segapp.errors import InputError
from segapp.images import check_instruction
from segapp.modeling.reduction import KVPrune, reduced_generate
from segapp.predictor import mask_labels
from segapp.preprocess import postprocess_logits, sam_tensor, vision_tensor
from segapp.scheduler import Progress
from segapp.video.io import VideoInfo, iter_frames, probe_video
from segapp.video.outputs import FrameOutputs
from segapp.video.sampling import sample_frames
from segapp.video.tracks import all_tokens, point_track
from segapp.video.ttm import keep_count, temporal_token_merge
from segapp.video.types import FrameTokens, SamFrame, VideoAnswer, VideoOptions, VideoResult

__all__ = [
    "FrameTokens",
    "SamFrame",
    "VideoAnswer",
    "VideoOptions",
    "VideoResult",
    "VideoSegmenter",
]


def _shrink(rgb: np.ndarray, side: int) -> np.ndarray:
    """Area-downscale a frame whose longest side exceeds 2 * `side` (4K frames), so the encoders'
    float resize never holds a full-resolution float copy."""
    h, w = rgb.shape[:2]
    if max(h, w) <= 2 * side:
        return rgb
    scale = 2 * side / max(h, w)
    dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(cv2.resize(rgb, dsize, interpolation=cv2.INTER_AREA))


class VideoSegmenter:
    """Reason about a video with the LLM once, segment every frame with SAM."""

    def __init__(self, bundle: Bundle, options: VideoOptions | None = None) -> None:
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.options = options or VideoOptions()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def presence(self) -> float:
        """The presence a frame needs to keep a `[SEG]`'s mask (0 = off): the options', else
        the model's own (`video_presence`, set by `segapp train-video`)."""
        if self.options.presence is not None:
            return self.options.presence
        return self.model.video_presence

    # ---- pass 1: the frames the LLM reads -------------------------------------------------
    def probe(self, source: str | Path) -> VideoInfo:
        return probe_video(source, max_pixels=self.options.max_pixels)

    @torch.inference_mode()
    def encode_frames(self, source: str | Path, info: VideoInfo | None = None) -> FrameTokens:
        """Vision tokens of the sampled frames (streamed; only those frames are decoded)."""
        opt = self.options
        info = info or self.probe(source)
        sample = sample_frames(
            info.frames, dense=opt.dense_frames, sparse=opt.sparse_frames, mode=opt.sampling
        )
        cfg = self.bundle.config
        t0 = time.perf_counter()
        tokens: dict[int, torch.Tensor] = {}
        for index, rgb in iter_frames(source, sample.all, max_pixels=opt.max_pixels):
            small = _shrink(rgb, cfg.vision_image_size)
            vis, _ = vision_tensor(small, cfg.vision_image_size, crop=cfg.vision_resize == "crop")
            tokens[index] = self.model.encode_vision(vis[None].to(self.device))[0]
        missing = [i for i in sample.all if i not in tokens]
        if missing:
            raise InputError(f"frame {missing[0]} could not be decoded", str(source))
        dense = torch.stack([tokens[i] for i in sample.dense])
        width = dense.shape[-1]
        sparse = (
            torch.stack([tokens[i].mean(0) for i in sample.sparse])
            if sample.sparse
            else dense.new_zeros(0, width)
        )
        return FrameTokens(sample, dense, sparse, time.perf_counter() - t0)

    # ---- the LLM, once ----------------------------------------------------------------------
    @torch.inference_mode()
    def reason(
        self,
        frames: FrameTokens,
        instruction: str,
        *,
        merge: float | None = 0.7,
        prune: float | None = None,
    ) -> VideoAnswer:
        """Answer `instruction` over the frame tokens.

        merge: DyCoke TTM ratio K (None: every dense token). prune: DyCoke stage-2 ratio P
        (None: decode over the whole cache). Kept tokens keep the RoPE positions they have in
        the unmerged sequence (and their patch's SAM positional encoding, added before TTM).
        """
        text = check_instruction(instruction)
        dense = self.model.add_motion(frames.dense)  # a model with a motion map: what changed
        t, n, _ = dense.shape
        s = frames.sparse.shape[0]
        if merge is None:
            visual = dense.reshape(t * n, -1)
            offsets = torch.arange(t * n)
        else:
            keep_count(n, merge)  # validates K
            merged = temporal_token_merge(dense, merge)
            visual, offsets = merged.tokens, merged.flat_positions.cpu()
        visual = torch.cat([frames.sparse, visual])
        offsets = torch.cat([torch.arange(s), s + offsets])
        total = s + t * n
        chat = dataclasses.replace(self.bundle.chat, image_tokens=len(visual))
        ids = torch.tensor([chat.prompt_ids(text)], device=self.device)
        slots = (ids[0] == self.model.image_token_id).cpu()
        first = int(slots.nonzero()[0, 0])
        positions = torch.arange(ids.shape[1])
        positions[slots] = first + offsets
        positions[first + len(visual) :] += total - len(visual)
        embeds = self.model.embed_inputs(ids, visual[None])
        kv = (
            KVPrune(layer=self.options.prune_layer, keep=1.0 - prune) if prune is not None else None
        )
        if prune is not None and not 0.0 <= prune < 1.0:
            raise InputError(f"prune ratio P must be in [0, 1), got {prune}", "--prune")
        gen = reduced_generate(
            self.model,
            embeds,
            positions[None].to(self.device),
            slots,
            max_new_tokens=self.options.max_new_tokens,
            kv_prune=kv,
            compile_prefill=self.options.compile_llm,
        )
        answer = chat.decode(gen.token_ids)
        # One-Token-Seg-All: the same [SEG] prompt goes to every frame; the pointer's point (a
        # location in one frame) follows the object as a track over the LLM's frames
        prompts = (
            self.model.seg_prompts(gen.seg_hidden)
            if len(gen.seg_hidden)
            else gen.seg_hidden.new_zeros(0, 1, self.bundle.config.prompt_dim)
        )
        track = None
        tracks = self.options.point_tracks
        if tracks is None:  # auto: a model trained to point on video
            tracks = self.model.video_seg_pointer is not None
        if tracks and len(gen.seg_hidden) and gen.image_hidden is not None:
            index = merged.index.cpu() if merge is not None else all_tokens(t, n)
            track = point_track(
                self.model, gen.seg_hidden, gen.image_hidden[s:], index, frames.sample.dense
            )
        stats = {
            "merge": merge,
            "prune": prune,
            "llm_frames": t,
            "sparse_frames": s,
            "visual_tokens_kept": len(visual),
            "visual_tokens_total": total,
            "visual_tokens_decode": gen.visual_decode,
            "prompt_tokens": int(ids.shape[1]),
            "new_tokens": len(gen.token_ids),
            "prefill_s": gen.prefill_s,
            "decode_s": gen.decode_s,
            "kv_refreshes": gen.kv_refreshes,
            "kv_cache_bytes": gen.kv_cache_bytes,
        }
        labels = mask_labels(answer, len(prompts))
        return VideoAnswer(text, answer, prompts, labels, stats, track)

    # ---- pass 2: every frame through SAM -----------------------------------------------------
    @torch.inference_mode()
    def iter_sam_batches(self, source: str | Path) -> Iterator[list[SamFrame]]:
        """Every frame with its SAM image embedding, `sam_batch` frames per encoder call and
        per yielded list. Only one batch of frames is in memory at a time."""
        size = self.model.sam.image_encoder.img_size
        batch: list[tuple[int, np.ndarray]] = []

        def flush() -> list[SamFrame]:
            tensors, sizes = [], []
            for _, rgb in batch:
                px, input_size = sam_tensor(_shrink(rgb, size), size)
                tensors.append(px)
                sizes.append(input_size)
            emb = self.model.encode_sam(torch.stack(tensors).to(self.device))
            return [SamFrame(index, rgb, emb, j, sizes[j]) for j, (index, rgb) in enumerate(batch)]

        for item in iter_frames(source, max_pixels=self.options.max_pixels):
            batch.append(item)
            if len(batch) >= self.options.sam_batch:
                yield flush()
                batch = []
        if batch:
            yield flush()

    def iter_sam(self, source: str | Path) -> Iterator[SamFrame]:
        """Every frame with its SAM image embedding (see `iter_sam_batches`)."""
        for batch in self.iter_sam_batches(source):
            yield from batch

    @torch.inference_mode()
    def batch_masks(
        self, frames: list[SamFrame], answer: VideoAnswer
    ) -> list[tuple[np.ndarray, list[float]]]:
        """Per frame: M x H x W bool masks (one per `[SEG]` prompt) and M scores.

        Every prompt on every frame goes through SAM's mask decoder in one call (each prompt
        paired with its own frame's embedding; the same masks as one call per frame). With a
        point track, a frame where a `[SEG]`'s presence is below `self.presence` gets an
        empty mask and score 0 for it.
        """
        m = len(answer.prompts)
        if not m or not frames:
            return [(np.zeros((0, *f.rgb.shape[:2]), bool), []) for f in frames]
        size = self.model.sam.image_encoder.img_size
        prompts = answer.prompts.repeat(len(frames), 1, 1)  # frame-major: frame j, prompt k
        if answer.track is not None:
            points = torch.cat([answer.track.at(f.index) for f in frames]).to(self.device)
            prompts = torch.cat([prompts, self.model.point_token(points).to(prompts.dtype)], 1)
        # the frames' encoder batches side by side (no copy when they all come from one call)
        offsets: dict[int, int] = {}
        batches: list[torch.Tensor] = []
        for f in frames:
            if id(f.batch) not in offsets:
                offsets[id(f.batch)] = sum(len(b) for b in batches)
                batches.append(f.batch)
        embedding = batches[0] if len(batches) == 1 else torch.cat(batches)
        rows = [offsets[id(f.batch)] + f.row for f in frames]
        image_of = torch.tensor(rows, device=embedding.device).repeat_interleave(m)
        low, iou = self.model.decode_masks(embedding, prompts, image_of)
        scores = iou[:, 0].float().clamp(0, 1).cpu()
        presence = self.presence
        out = []
        for j, frame in enumerate(frames):
            mine = slice(j * m, (j + 1) * m)
            logits = postprocess_logits(low[mine], frame.input_size, frame.rgb.shape[:2], size)
            masks, frame_scores = (logits > 0).cpu().numpy(), scores[mine].clone()
            if answer.track is not None and presence > 0:
                absent = (answer.track.present(frame.index) < presence).numpy()
                masks[absent] = False  # the pointer finds this [SEG]'s target elsewhere
                frame_scores[torch.from_numpy(absent)] = 0.0
            out.append((masks, frame_scores.tolist()))
        return out

    def frame_masks(self, frame: SamFrame, answer: VideoAnswer) -> tuple[np.ndarray, list[float]]:
        """M x H x W bool masks (one per `[SEG]` prompt) and M scores on one frame."""
        return self.batch_masks([frame], answer)[0]

    def iter_masks(
        self, source: str | Path, answer: VideoAnswer
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[float]]]:
        """Yield (frame index, frame RGB, M x H x W bool masks, M scores) for every frame:
        each `[SEG]` prompt decoded on every frame (One-Token-Seg-All), streamed one batch of
        `sam_batch` frames at a time."""
        for frames in self.iter_sam_batches(source):
            for frame, (masks, scores) in zip(
                frames, self.batch_masks(frames, answer), strict=True
            ):
                yield frame.index, frame.rgb, masks, scores

    # ---- everything, with files --------------------------------------------------------------
    def run(
        self,
        video_path: str | Path,
        instruction: str,
        out_dir: str | Path,
        merge: float | None = 0.7,
        prune: float | None = None,
        progress: Progress | None = None,
    ) -> VideoResult:
        """Segment `instruction`'s targets in every frame of `video_path` into `out_dir`."""
        started = time.perf_counter()
        report = progress or (lambda fraction, stage: None)
        text = check_instruction(instruction)
        report(0.0, "reading video")
        info = self.probe(video_path)
        report(0.02, f"encoding {min(info.frames, self.options.dense_frames)} frames for the LLM")
        tokens = self.encode_frames(video_path, info)
        report(0.08, "reasoning")
        answer = self.reason(tokens, text, merge=merge, prune=prune)
        outputs = FrameOutputs(
            Path(out_dir), info.fps, overlay_max_side=self.options.overlay_max_side
        )
        sam_started = time.perf_counter()
        complete = False
        try:
            for index, rgb, masks, scores in self.iter_masks(video_path, answer):
                row = {
                    "image": f"{video_path}#{index}",
                    "instruction": answer.instruction,
                    "answer": answer.answer,
                }
                outputs.write(index, rgb, masks, scores, answer.labels, row)
                done = outputs.frames
                report(0.1 + 0.9 * done / info.frames, f"segmenting frame {done}/{info.frames}")
            complete = True
        finally:
            outputs.close(complete=complete)
        done = outputs.frames
        stats = {
            **answer.stats,
            "frames": done,
            "vision_s": round(tokens.vision_s, 4),
            "sam_s": round(time.perf_counter() - sam_started, 4),
            "total_s": round(time.perf_counter() - started, 4),
        }
        report(1.0, "done")
        return VideoResult(
            answer.instruction,
            answer.answer,
            answer.labels,
            done,
            Path(out_dir),
            outputs.mask_dir,
            outputs.video.path,
            outputs.results_path,
            stats,
        )
