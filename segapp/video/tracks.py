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
    """M x T x 2 points (x, y, SAM input pixels) at video frames `frames` (T increasing), and
    M x T `presence`: how sure each `[SEG]`'s pointer is that its target is on each frame
    (`token_presence`: the probability of the frame's best token, for a pointer trained per
    token by `segapp train-video`; `frame_presence`: the frame's share of the pointer's
    softmax over the share of the frame with most; near 0 = it finds nothing there).

    Other frames interpolate linearly between their neighbours (held at the ends): the pointer
    sees only the sampled frames, the object moves in between."""

    frames: list[int]
    points: torch.Tensor
    presence: torch.Tensor | None = None

    def _between(self, values: torch.Tensor, frame: int) -> torch.Tensor:
        f = self.frames
        if frame <= f[0] or len(f) == 1:
            return values[:, 0]
        if frame >= f[-1]:
            return values[:, -1]
        j = next(i for i in range(1, len(f)) if f[i] >= frame)
        w = (frame - f[j - 1]) / (f[j] - f[j - 1])
        return (1 - w) * values[:, j - 1] + w * values[:, j]

    def at(self, frame: int) -> torch.Tensor:
        """M x 2 points at video frame `frame`."""
        return self._between(self.points, frame)

    def present(self, frame: int) -> torch.Tensor:
        """M presence values at video frame `frame` (all 1 without a presence read-out)."""
        if self.presence is None:
            return torch.ones(self.points.shape[0])
        return self._between(self.presence, frame)


def frame_presence(grid: torch.Tensor) -> torch.Tensor:
    """M x T x N pointer scores -> M x T: each frame's share of the softmax over all T x N
    tokens, divided by the largest frame's share."""
    m, t, n = grid.shape
    mass = torch.softmax(grid.reshape(m, t * n), -1).reshape(m, t, n).sum(-1)
    return mass / mass.amax(-1, keepdim=True)


def token_presence(grid: torch.Tensor) -> torch.Tensor:
    """M x T x N pointer scores -> M x T: the probability of each frame's best token, for a
    pointer trained per token (`segapp train-video`: sigmoid(score) = the token lies on the
    target), so a frame without the target scores low whatever the other frames hold."""
    return torch.sigmoid(grid.amax(-1))


def point_track(
    model: SegLLM,
    seg_hidden: torch.Tensor,
    image_hidden: torch.Tensor,
    index: torch.Tensor,
    frames: Sequence[int],
) -> PointTrack:
    """Each `[SEG]`'s best patch on every LLM frame (`frames`: their video frame numbers), as
    SAM points, and how much the pointer finds it on each frame (`token_presence` for a model
    with a `video_presence` threshold, else `frame_presence`). seg_hidden M x H;
    image_hidden V x H at (frame, patch) `index` (V x 2). A token TTM dropped scores as its
    reference token, so a frame where the target stood still keeps its share."""
    pointer = model.video_pointer
    assert pointer is not None
    t, n = len(frames), model.image_grid_tokens
    grid = pointer_grid(pointer.scores(seg_hidden, image_hidden).float(), index, t, n)
    centres = model.patch_centres(n, model.vision_size)  # best patch: M x T x 2 points
    presence = token_presence(grid) if model.video_presence > 0 else frame_presence(grid)
    return PointTrack(list(frames), centres[grid.argmax(-1)], presence.cpu())
