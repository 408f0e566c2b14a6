"""The user's shots as the concept verifier's reference: how close a candidate's form and
outline come to the shots' own (see verify.py for where these features are used)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from segapp.personalize.concepts import JITTER_HUE, JITTER_VALUE

HIST_LEVELS = 4  # per RGB channel: 64 colour bins
COLOUR_BINS = HIST_LEVELS**3  # the histogram that opens mask_features' appearance
MATCH_SIZE = 32  # side of the common frame silhouettes are compared in
MATCH_TURNS = 24  # rotations of each shot's silhouette tried (x 2 mirrored)
MATCH_SPAN = 1.5  # the common frame's half-side, in sqrt(object area)


def colour_bins(thumb: torch.Tensor) -> torch.Tensor:
    """F*F x 64 one-hot colour bin of every pixel."""
    q = (thumb.flatten(1).T / 256 * HIST_LEVELS).long().clamp(0, HIST_LEVELS - 1)
    return F.one_hot(bin_index(q[:, 0], q[:, 1], q[:, 2]), COLOUR_BINS).float()


def bin_index(r: Any, g: Any, b: Any) -> Any:
    """The colour bin (0..63) of per-channel levels (0..HIST_LEVELS-1), arrays or tensors."""
    return (r * HIST_LEVELS + g) * HIST_LEVELS + b


def silhouettes(masks: torch.Tensor, turns: int = 1, mirror: bool = False) -> torch.Tensor:
    """C x F x F bool masks -> C x R x MATCH_SIZE² 0/1 silhouettes in a common frame: centred
    on the mask's centroid, MATCH_SPAN x sqrt(area) to each side, turned through ``turns``
    angles (x 2 with ``mirror``): R = turns x (2 if mirror else 1)."""
    m = masks.float()
    count, side = m.shape[0], m.shape[-1]
    pos = torch.arange(side, dtype=torch.float32) + 0.5
    area = m.flatten(1).sum(1).clamp(min=1)
    cy = (m.sum(2) * pos).sum(1) / area
    cx = (m.sum(1) * pos).sum(1) / area
    half = MATCH_SPAN * area.sqrt() * 2 / side  # in grid_sample's -1..1 units
    angle = 2 * np.pi * torch.arange(turns, dtype=torch.float32) / turns
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    if mirror:
        flip = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
        rot = torch.cat([rot, rot @ flip])
    r = rot.shape[0]
    linear = half[:, None, None, None] * rot[None]  # C x R x 2 x 2
    shift = torch.stack([cx, cy], 1) * 2 / side - 1  # C x 2
    theta = torch.cat([linear, shift[:, None, :, None].expand(count, r, 2, 1)], -1)
    grid = F.affine_grid(theta.reshape(-1, 2, 3), [count * r, 1, MATCH_SIZE, MATCH_SIZE], False)
    source = m[:, None].repeat_interleave(r, 0)
    out = F.grid_sample(source, grid, align_corners=False) >= 0.5
    return out.reshape(count, r, -1).float()


def shot_colours(thumbs: torch.Tensor, masks: torch.Tensor, share: float = 0.05) -> torch.Tensor:
    """64 bools: the colour bins holding at least ``share`` of the shots' object pixels, with
    the shots seen at both ends of the fit's colour jitter too (hue and brightness, see
    concepts.JITTER_*): a colour near a bin edge, a yellow whose green channel is 200 say,
    falls in the next bin a little darker or redder, and without those bins a jittered fitting
    copy loses that part of itself when snapped, which blurs what its silhouette teaches.

    thumbs: K x 3 x F x F RGB; masks: K x F x F bool."""
    found = torch.zeros(COLOUR_BINS, dtype=torch.bool)
    for hue in (-JITTER_HUE, 0.0, JITTER_HUE):
        for value in (1 - JITTER_VALUE, 1.0, 1 + JITTER_VALUE):
            counts = sum(
                colour_bins(_jitter(t, hue, value))[m.flatten()].sum(0)
                for t, m in zip(thumbs, masks, strict=True)
            )
            assert isinstance(counts, torch.Tensor)
            found |= counts / counts.sum().clamp(min=1) >= share
    return found


def _jitter(thumb: torch.Tensor, hue: float, value: float) -> torch.Tensor:
    """3 x F x F RGB with its hue turned by ``hue`` (OpenCV units) and brightness x ``value``."""
    if hue == 0.0 and value == 1.0:
        return thumb
    rgb = thumb.permute(1, 2, 0).clamp(0, 255).numpy().astype(np.uint8)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue, 180)
    hsv[..., 2] = np.clip(hsv[..., 2] * value, 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return torch.from_numpy(out).permute(2, 0, 1).float()


@dataclass
class Reference:
    """The shots' own masks (K x F x F bool, SAM frame at FEATURE_SIZE) and form features."""

    masks: torch.Tensor
    forms: torch.Tensor  # K x B
    colours: torch.Tensor | None = None  # 64 bools: colour bins the shots are made of
    hists: torch.Tensor | None = None  # K x 64: each shot's colour histogram

    def __post_init__(self) -> None:
        self.templates = silhouettes(self.masks, MATCH_TURNS, mirror=True).flatten(0, 1)

    def snap(self, masks: torch.Tensor, thumb: torch.Tensor) -> torch.Tensor:
        """Candidates' outlines snapped to the image: the pixels within 3 px of each mask whose
        colour bin is one of the shots' (a candidate left with under a third of its pixels
        keeps its own outline)."""
        if self.colours is None:
            return masks
        near = F.max_pool2d(masks.float()[:, None], 7, 1, 3)[:, 0] > 0
        ours = (colour_bins(thumb) @ self.colours.float()).reshape(thumb.shape[1:]) > 0
        snapped = near & ours[None]
        enough = snapped.flatten(1).sum(1) >= masks.flatten(1).sum(1) / 3
        return torch.where(enough[:, None, None], snapped, masks)

    def refine(self, mask: np.ndarray, pixels: np.ndarray, cell: float) -> np.ndarray:
        """The picked mask's outline snapped to the image at full resolution: the pixels within
        3/4 of a low-res mask cell (``cell`` image pixels) of ``mask`` whose colour bin is one
        of the shots'. A mask left with under a third of its pixels is returned unchanged.

        The decoder's low-res logits place an outline to within about a cell; on objects whose
        colours the shots pin down this recovers the exact edge (measured: 5-shot mIoU 0.840 to
        0.920 in ``segapp eval personal``, see README)."""
        if self.colours is None or not mask.any():
            return mask
        radius = max(1, round(0.75 * cell))
        kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
        near = cv2.dilate(mask.astype(np.uint8), kernel) > 0
        q = pixels.astype(np.int64) * HIST_LEVELS // 256
        snapped = near & self.colours.cpu().numpy()[bin_index(q[..., 0], q[..., 1], q[..., 2])]
        return snapped if snapped.sum() >= mask.sum() / 3 else mask

    def likeness(self, hist: torch.Tensor) -> torch.Tensor | None:
        """C x 2 for C candidates' colour histograms (C x 64): the best intersection with a
        shot's histogram, and the share of the candidate's pixels in the shots' colour bins;
        None for a reference stored without histograms."""
        if self.hists is None or self.colours is None:
            return None
        inter = torch.minimum(hist[:, None], self.hists[None]).sum(2).max(1).values
        return torch.stack([inter, hist[:, self.colours].sum(1)], 1)

    def compare(
        self, form: torch.Tensor, masks: torch.Tensor, thumb: torch.Tensor | None = None
    ) -> torch.Tensor:
        """C x (B + 1): each of the C candidates' form features' distance to the nearest
        shot's, and the best IoU of its silhouette (snapped to the shots' colours when
        ``thumb`` is given) with any turned or mirrored shot's."""
        gap = (form[:, None, :] - self.forms[None]).abs().min(1).values
        if thumb is not None:
            masks = self.snap(masks, thumb)
        own = silhouettes(masks)[:, 0]
        inter = own @ self.templates.T
        union = own.sum(1, keepdim=True) + self.templates.sum(1)[None] - inter
        match = (inter / union.clamp(min=1)).max(1).values
        return torch.cat([gap, match[:, None]], 1)
