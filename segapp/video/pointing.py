"""Where each `[SEG]` is in every frame: the `[SEG]` pointer over a video's frame tokens.

On images the pointer picks the image token that holds the target and SAM gets a point there
(see segapp/modeling/pointer.py). In a video the LLM reads T dense frames; the pointer scores
every kept visual token, and each dense frame gets the patch its best token sits at. A token
that temporal merging dropped was nearly the same as the token at its patch in an earlier frame
(DyCoke compares a frame with its reference), so that earlier token's score stands in for it.
Every decoded frame then takes the point of its nearest dense frame in time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from segapp.modeling.segllm import SegLLM


@dataclass(frozen=True)
class FramePoints:
    """patches: M x T patch index each `[SEG]` points at in each dense frame;
    frames: the T dense frames' indices in the video (ascending)."""

    patches: torch.Tensor
    frames: tuple[int, ...]

    def nearest(self, index: int) -> int:
        """Column of the dense frame closest in time to frame `index` (earlier on a tie)."""
        return min(range(len(self.frames)), key=lambda j: (abs(self.frames[j] - index), j))


def frame_points(
    model: SegLLM,
    seg_hidden: torch.Tensor,
    image_hidden: torch.Tensor,
    flat_positions: torch.Tensor,
    per_frame: int,
    frames: tuple[int, ...],
) -> FramePoints | None:
    """The pointer's patch per `[SEG]` and dense frame, or None for a model without a pointer.

    seg_hidden: M x H; image_hidden: K x H last-layer hidden states of the kept dense tokens;
    flat_positions: K positions ``frame * per_frame + patch`` in the unmerged dense sequence.
    """
    if model.seg_pointer is None or not len(seg_hidden) or not len(image_hidden):
        return None
    scores = model.seg_pointer.scores(seg_hidden, image_hidden).float()  # M x K
    flat = flat_positions.to(scores.device)
    t = len(frames)
    grid = scores.new_full((len(seg_hidden), t * per_frame), float("-inf"))
    grid[:, flat] = scores
    grid = grid.reshape(len(seg_hidden), t, per_frame)
    for j in range(1, t):  # a merged-away token: its patch's score in the frame before
        missing = torch.isinf(grid[:, j])
        grid[:, j][missing] = grid[:, j - 1][missing]
    return FramePoints(grid.argmax(-1).cpu(), frames)


def frame_prompts(
    model: SegLLM, prompts: torch.Tensor, points: FramePoints, index: int
) -> torch.Tensor:
    """M x 2 x D prompts for frame `index`: each `[SEG]` prompt plus SAM's point token at the
    centre of the patch its pointer picked in the nearest dense frame."""
    patch = points.patches[:, points.nearest(index)].to(prompts.device)
    centres = model.patch_centres(model.image_grid_tokens, model.vision_size)[patch]
    return torch.cat([prompts, model.point_token(centres).to(prompts.dtype)], 1)
