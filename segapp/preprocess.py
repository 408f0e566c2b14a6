"""Image and mask preprocessing: numpy HxWx3 uint8 in, normalised padded tensors out.

Both encoders see the image resized so its longest side is the encoder size, padded at the
bottom/right (segment_anything's ResizeLongestSide convention), so coordinates map by one scale.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
CLIP_MEAN = (122.7709, 116.7460, 104.0937)
CLIP_STD = (68.5005, 66.6322, 70.3232)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after scaling so the longest side equals `size` (rounded like segment_anything)."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def image_tensor(
    image: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 -> (3 x size x size float32 normalised and zero-padded, (h, w) before pad)."""
    h, w = resized_shape(image.shape[0], image.shape[1], size)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    if (h, w) != tuple(image.shape[:2]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    x = (x[0] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return F.pad(x, (0, size - w, 0, size - h)), (h, w)


THUMBNAIL_SIZE = 128  # side of the small RGB copy of the SAM frame kept with an image's cache


def sam_thumbnail(sam_pixels: torch.Tensor) -> torch.Tensor:
    """3 x S x S SAM input (normalised, zero-padded) -> 3 x T x T RGB in 0..255 in the same
    frame (padding black): what mask-pooled colour features are computed on."""
    x = sam_pixels.float().cpu()
    inside = x.abs().sum(0, keepdim=True) > 0
    rgb = (
        x * torch.tensor(SAM_STD)[:, None, None] + torch.tensor(SAM_MEAN)[:, None, None]
    ) * inside
    small = F.interpolate(rgb[None], (THUMBNAIL_SIZE, THUMBNAIL_SIZE), mode="area")[0]
    return small.clamp(0, 255)


def sam_tensor(image: np.ndarray, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    return image_tensor(image, size, SAM_MEAN, SAM_STD)


def vision_tensor(
    image: np.ndarray, size: int, *, crop: bool = False
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Vision tower input. crop=False: longest side + pad (the tiny model's convention, returns
    (h, w) before the pad); crop=True: CLIPImageProcessor's shortest side to `size` (bicubic)
    then a centre crop, as LLaVA / LISA were trained (returns (size, size))."""
    if not crop:
        return image_tensor(image, size, CLIP_MEAN, CLIP_STD)
    height, width = image.shape[:2]
    scale = size / min(height, width)
    h, w = max(size, int(round(height * scale))), max(size, int(round(width * scale)))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[0, :, top : top + size, left : left + size].clamp(0, 255)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    return x, (size, size)


def mask_tensor(masks: np.ndarray, size: int) -> torch.Tensor:
    """T x H x W bool -> T x size x size float {0,1} in the padded encoder frame."""
    t = masks.shape[0]
    if t == 0:
        return torch.zeros(0, size, size)
    h, w = resized_shape(masks.shape[1], masks.shape[2], size)
    x = torch.from_numpy(masks.astype(np.float32))[:, None]
    x = F.interpolate(x, size=(h, w), mode="area")[:, 0]
    return F.pad((x > 0.5).float(), (0, size - w, 0, size - h))


def postprocess_logits(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], size: int
) -> torch.Tensor:
    """M x 1 x h x w low-res logits -> M x H x W logits at the original image size."""
    x = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, original_size, mode="bilinear", align_corners=False)
    return x[:, 0]
