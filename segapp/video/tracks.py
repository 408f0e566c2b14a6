"""Point tracks: where a `[SEG]` points on each frame the LLM read, and in between.

The `[SEG]` pointer scores the LLM's visual tokens (last-layer hidden states). Over a video
those are the kept tokens of T sampled frames; `pointer_grid` lays the scores out per frame
and patch (a token DyCoke's TTM dropped scores as its reference token: it was found unchanged
there), and `PointTrack` turns each frame's best patch into SAM's point prompt on any frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from segapp.video.ttm import fill_merged

if TYPE_CHECKING:
    from segapp.modeling.segllm import SegLLM


def all_tokens(t: int, n: int) -> torch.Tensor:
    """(T * N) x 2 (frame, patch) of every token, frame-major: the unmerged sequence."""
    frames, patches = torch.meshgrid(torch.arange(t), torch.arange(n), indexing="ij")
    return torch.stack([frames.flatten(), patches.flatten()], -1)


def pointer_grid(scores: torch.Tensor, index: torch.Tensor, t: int, n: int) -> torch.Tensor:
    """M x V pointer scores of the kept tokens at (frame, patch) `index` (V x 2) -> M x T x N.

    Differentiable in `scores` (training uses it as inference does)."""
    m = scores.shape[0]
    frames, patches = index[:, 0].to(scores.device), index[:, 1].to(scores.device)
    grid = scores.new_full((t, n, m), float("-inf")).index_put((frames, patches), scores.T)
    kept = torch.zeros(t, n, dtype=torch.bool, device=scores.device)
    kept[frames, patches] = True
    return fill_merged(grid, kept).permute(2, 0, 1)


@dataclass
class PointTrack:
    """M x T x 2 points (x, y, SAM input pixels) at video frames `frames` (T increasing).

    Other frames interpolate linearly between their neighbours (held at the ends): the pointer
    sees only the sampled frames, the object moves in between."""

    frames: list[int]
    points: torch.Tensor

    def at(self, frame: int) -> torch.Tensor:
        """M x 2 points at video frame `frame`."""
        f = self.frames
        if frame <= f[0] or len(f) == 1:
            return self.points[:, 0]
        if frame >= f[-1]:
            return self.points[:, -1]
        j = next(i for i in range(1, len(f)) if f[i] >= frame)
        w = (frame - f[j - 1]) / (f[j] - f[j - 1])
        return (1 - w) * self.points[:, j - 1] + w * self.points[:, j]


def point_track(
    model: SegLLM,
    seg_hidden: torch.Tensor,
    image_hidden: torch.Tensor,
    index: torch.Tensor,
    frames: Sequence[int],
) -> PointTrack:
    """Each `[SEG]`'s best patch on every LLM frame (`frames`: their video frame numbers), as
    SAM points. seg_hidden M x H; image_hidden V x H at (frame, patch) `index` (V x 2)."""
    pointer = model.video_pointer
    assert pointer is not None
    t, n = len(frames), model.image_grid_tokens
    grid = pointer_grid(pointer.scores(seg_hidden, image_hidden).float(), index, t, n)
    centres = model.patch_centres(n, model.vision_size)
    return PointTrack(list(frames), centres[grid.argmax(-1)])  # M x T x 2
