"""`segapp train-video`: teach a trained model where video targets are, its images untouched.

A tiny LLM reading four frames as 4 x 64 tokens has to compare each patch across frames to
tell which shape moved fastest, changed colour, grew, appeared or went behind the square;
trained jointly on images and a share of clips it mostly does not (on the weights bundled
until 2026-12-06, a pointer trained on its frozen hidden states found the video target in
37% of the LLM's frames that show it, about chance among 2-4 shapes; 65% with the motion map
below). The video adapter gives it the comparison and a way to say where the answer lies,
and trains nothing else:

- a motion map (`SegLLM.video_motion`, `ModelConfig.video_motion`): each frame token plus a
  linear map of its deviation from the same patch's mean over the LLM's frames, before TTM
  (zero where nothing changed; zero-initialised, so it starts as the model was);
- a video `[SEG]` pointer (`ModelConfig.video_seg_pointer`) scoring every visual token of
  every LLM frame, trained per frame (cross-entropy towards the target's tokens, where the
  target is visible) and per token (BCE: the token lies on the target), so
  the sigmoid of a frame's best score says whether the target is there at all.

`segapp video` then prompts SAM on every frame with the `[SEG]` embedding plus the point
where the pointer points (interpolated between the LLM's frames), and leaves a frame empty
where that probability is below `ModelConfig.video_presence`. Every other weight is frozen and
the image path never reads the new modules, so image answers and masks stay exactly as they
were.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from segapp.build import Bundle, save_bundle
from segapp.config import SEGAPP_FORMATS
from segapp.data.answers import ANSWER_ORDERS
from segapp.data.videos import FRAMES as CLIP_FRAMES
from segapp.errors import InputError
from segapp.modeling.builders import init_weights_
from segapp.modeling.pointer import SegPointer
from segapp.modeling.segllm import SegLLM
from segapp.tokenizer import ChatFormat
from segapp.video.tracks import pointer_grid
from segapp.video.training import VideoSample, clip_pass, make_video_sample


@dataclass(frozen=True)
class AdapterConfig:
    """Schedule of `segapp train-video`."""

    steps: int = 4000  # one synthetic clip per step
    lr: float = 2e-3  # AdamW peak, linear warm-up then cosine decay (as `segapp train`)
    warmup: int = 100
    pointer_width: int = 64  # a fresh video pointer's width (a model's own is kept)
    presence: float = 0.3  # stored as ModelConfig.video_presence (chosen on val)
    answer_order: str = "restate"  # how the model answers (the bundled recipe's)
    # LLM frames per clip, taken in turn (4: what `segapp video` reads by default; 8: what
    # `--frames 8` reads, where merging saves most)
    frames: tuple[int, ...] = (4,)
    seed: int = 0
    threads: int = 0  # torch CPU threads (0 = all cores)
    log_every: int = 100

    def check(self) -> None:
        """One-line errors for values that cannot train."""
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, got {self.steps}", "--steps")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}", "--lr")
        if not 0.0 < self.presence < 1.0:
            raise InputError(f"--presence must be in (0, 1), got {self.presence}", "--presence")
        if self.answer_order not in ANSWER_ORDERS:
            raise InputError(f"unknown answer order {self.answer_order!r}", "--answer-order")
        if not self.frames or min(self.frames) < 2 or max(self.frames) > CLIP_FRAMES:
            raise InputError(
                f"--frames must be from 2 to {CLIP_FRAMES} (a training clip's frames), got "
                f"{' '.join(map(str, self.frames))}",
                "--frames",
            )


def add_video_modules(model: SegLLM, width: int) -> list[torch.nn.Parameter]:
    """Freeze every weight of `model`, give it a motion map and a video pointer (fresh ones
    where it has none: the map at zero, so the model reads video as before) and return their
    parameters, the only ones that train."""
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = model.llm.config.hidden_size
    if model.video_motion is None:
        motion = torch.nn.Linear(hidden, hidden, bias=False)
        torch.nn.init.zeros_(motion.weight)
        model.video_motion = motion.to(model.device)
    if model.video_seg_pointer is None:
        pointer = SegPointer(hidden, width)
        init_weights_(pointer)
        model.video_seg_pointer = pointer.to(model.device)
    params = [*model.video_motion.parameters(), *model.video_seg_pointer.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def adapter_losses(model: SegLLM, sample: VideoSample, chat: ChatFormat) -> dict[str, torch.Tensor]:
    """The video pointer's losses on one clip: 'where' (per LLM frame showing the target,
    cross-entropy towards its tokens) and 'present' (per token, BCE: the token is on the
    target as the pointer counts it, a fifth of the patch or the target's most-covered token;
    every token of a frame without the target is off it)."""
    assert model.video_seg_pointer is not None and sample.vision_cover is not None
    with torch.no_grad():  # the frozen encoders
        tokens = model.encode_vision(sample.vision_pixels.to(model.device))
    run = clip_pass(model, model.add_motion(tokens), sample, chat)
    if not run.hidden.shape[0]:
        raise ValueError("the clip's answer has no [SEG]")
    image_hidden = run.last[0, run.slots.to(model.device)]
    scores = model.video_seg_pointer.scores(run.hidden[:1], image_hidden)
    t, n = sample.vision_cover.shape
    grid = pointer_grid(scores, run.index, t, n)[0]  # T x N (dropped tokens: their reference's)
    cover = sample.vision_cover.to(grid.device)
    seen = cover.amax(-1) > 0
    where = SegPointer.loss(grid[seen], cover[seen]) if bool(seen.any()) else grid.sum() * 0
    on = SegPointer.on_target(cover) & seen[:, None]  # nothing on a frame without it
    present = F.binary_cross_entropy_with_logits(grid, on.float())
    return {"where": where, "present": present, "total": where + present}


def fit_video_adapter(
    bundle: Bundle, out_dir: Path, acfg: AdapterConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Train the video adapter of `bundle`'s model and save the whole model to `out_dir`
    (a segapp weights directory; `train_video_log.jsonl` and `train_video_config.json`
    beside it). Returns the last logged losses."""
    from tqdm import tqdm

    from segapp.train import lr_at

    acfg.check()
    cfg, model = bundle.config, bundle.model
    if cfg.chat_format not in SEGAPP_FORMATS or model.seg_pointer is None:
        raise InputError(
            "segapp train-video needs a segapp model with a [SEG] pointer (the tiny preset "
            "or weights segapp trained)",
            "--init-from",
        )
    if acfg.threads:
        torch.set_num_threads(acfg.threads)
    torch.manual_seed(acfg.seed)
    params = add_video_modules(model, acfg.pointer_width)
    opt = torch.optim.AdamW(params, lr=acfg.lr, weight_decay=0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_video_log.jsonl"
    log_path.write_text("")
    model.eval()  # nothing here uses dropout; frozen norms stay as they are
    started = time.perf_counter()
    window: list[dict[str, float]] = []
    last: dict[str, Any] = {}
    bar = tqdm(range(acfg.steps), desc="train-video", unit="clip", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, acfg.steps, acfg.warmup, acfg.lr)
        sample = make_video_sample(
            cfg,
            acfg.seed,
            step,
            dense=acfg.frames[step % len(acfg.frames)],
            sam_frames=1,
            answer_order=acfg.answer_order,
        )
        terms = adapter_losses(model, sample, bundle.chat)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        window.append({k: float(v.detach()) for k, v in terms.items()})
        if (step + 1) % acfg.log_every == 0 or step + 1 == acfg.steps:
            last = {k: round(sum(w[k] for w in window) / len(window), 4) for k in window[0]}
            last.update(step=step + 1, elapsed_s=round(time.perf_counter() - started, 1))
            window = []
            bar.set_postfix(where=last["where"], present=last["present"])
            with log_path.open("a") as fh:
                fh.write(json.dumps(last) + "\n")
    bar.close()
    for p in params:
        p.requires_grad_(False)
    assert model.video_seg_pointer is not None
    width = model.video_seg_pointer.q.out_features
    saved = cfg.replace(video_motion=True, video_seg_pointer=width, video_presence=acfg.presence)
    save_bundle(model, bundle.tokenizer, saved, out_dir)
    (out_dir / "train_video_config.json").write_text(
        json.dumps({**asdict(acfg), "init_from": bundle.source}, indent=2) + "\n"
    )
    bundle.config = saved
    model.video_presence = acfg.presence
    return last


__all__ = ["AdapterConfig", "add_video_modules", "adapter_losses", "fit_video_adapter"]
