"""LISA's losses: text cross-entropy, per-pixel BCE and Dice (on sigmoid), IoU-head regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean Dice loss over masks; logits/targets M x H x W."""
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    num = 2 * (p * t).sum(-1) + eps
    den = p.sum(-1) + t.sum(-1) + eps
    return (1 - num / den).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel BCE averaged over pixels and masks."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of (logits > 0) with binary targets, per mask (M,); empty union scores 1."""
    pred = logits > 0
    tgt = targets > 0.5
    inter = (pred & tgt).flatten(1).sum(-1).float()
    union = (pred | tgt).flatten(1).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE; labels Q x L with -100 where no loss (prompt, image, padding)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100)
