"""The video pipeline's data: how a video is read (`VideoOptions`), what each pass hands the
next (`FrameTokens`, `SamFrame`, `VideoAnswer`) and what `VideoSegmenter.run` wrote
(`VideoResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segapp.video.io import MAX_FRAME_PIXELS
from segapp.video.sampling import FrameSample
from segapp.video.tracks import PointTrack


@dataclass(frozen=True)
class VideoOptions:
    """How a video is read, sampled and decoded."""

    dense_frames: int = field(default=4, metadata={"help": "frames the LLM sees in full (TTM)"})
    sparse_frames: int = field(
        default=0, metadata={"help": "extra frames pooled to one token each (sparse-dense)"}
    )
    sampling: str = field(default="uniform", metadata={"help": "'uniform' or 'sparse-dense'"})
    max_new_tokens: int = field(default=48, metadata={"help": "answer length limit"})
    prune_layer: int = field(default=3, metadata={"help": "DyCoke stage-2 layer L"})
    point_tracks: bool | None = field(
        default=None,
        metadata={
            "help": "with a [SEG] pointer: add SAM's point token where [SEG] points on each LLM "
            "frame (interpolated between them) to the [SEG] prompt (None: on for a model with "
            "its own video pointer, off otherwise: an image-trained pointer finds the video "
            "target too rarely, see the tiny model's card)"
        },
    )
    presence: float | None = field(
        default=None,
        metadata={
            "help": "with point tracks: a frame gets no mask from a [SEG] whose presence there "
            "is below this (the target is not in that frame; 0 = off). A model trained by "
            "`segapp train-video` reads presence as the probability its video pointer gives "
            "the frame's best token, others as the frame's share of the pointer's attention "
            "over the most-pointed frame's. None: the model's own `video_presence` (off for "
            "models without one)"
        },
    )
    compile_llm: bool = field(
        default=False,
        metadata={
            "help": "run the LLM prefill's layers under torch.compile (one compile of about "
            "10 s on first use, for every prompt length; needs a C++ compiler on CPU, falls "
            "back to eager with a warning): faster, and the gain from merging comes closer "
            "to what the token count allows"
        },
    )
    sam_batch: int = field(default=8, metadata={"help": "frames per SAM encoder and decoder call"})
    overlay_max_side: int = field(default=1280, metadata={"help": "overlay video size limit"})
    max_pixels: int = field(default=MAX_FRAME_PIXELS, metadata={"help": "largest frame"})


@dataclass
class FrameTokens:
    """Vision tokens of the sampled frames: dense T x N x H, sparse S x H (pooled frames)."""

    sample: FrameSample
    dense: torch.Tensor
    sparse: torch.Tensor
    vision_s: float


@dataclass
class SamFrame:
    """One decoded frame: row `row` of its SAM encoder call's embeddings (B x D x h x w)."""

    index: int
    rgb: np.ndarray
    batch: torch.Tensor
    row: int
    input_size: tuple[int, int]  # (h, w) inside the padded SAM frame

    @property
    def embedding(self) -> torch.Tensor:
        """1 x D x h x w."""
        return self.batch[self.row : self.row + 1]


@dataclass
class VideoAnswer:
    """The LLM's answer about a video: text, one SAM prompt per `[SEG]`, and what it cost."""

    instruction: str
    answer: str
    prompts: torch.Tensor  # M x 1 x D sparse prompt embeddings
    labels: list[str]
    stats: dict[str, Any]
    track: PointTrack | None = None  # where each [SEG] points on the LLM's frames


@dataclass
class VideoResult:
    """What `VideoSegmenter.run` wrote (see the package docstring for the file formats)."""

    instruction: str
    answer: str
    labels: list[str]
    frames: int
    out_dir: Path
    mask_dir: Path
    overlay_path: Path
    results_path: Path
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "answer": self.answer,
            "labels": self.labels,
            "frames": self.frames,
            "mask_dir": str(self.mask_dir),
            "overlay": str(self.overlay_path),
            "results": str(self.results_path),
            "stats": self.stats,
        }
