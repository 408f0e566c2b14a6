"""LISA's losses: text cross-entropy, per-pixel BCE and Dice (on sigmoid), IoU-head regression."""

from __future__ import annotations

from typing import Any

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


def lm_loss(llm: Any, labels: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a transformers causal LM for training: (text CE as `text_loss`, last-layer hidden
    states Q x L x H).

    The LM head runs only on the positions that carry a label (the answer: ~1/5 of a training
    row, the rest is prompt and image tokens), not on every position as the model's own
    forward does; same loss, a fifth of the head and the log-softmax. A model whose logits are
    more than its head's output (soft-capped) takes the plain path.
    """
    config = llm.config
    if getattr(config, "final_logit_softcapping", None) or not hasattr(llm, "get_decoder"):
        out = llm(**inputs, output_hidden_states=True)
        return text_loss(out.logits, labels), out.hidden_states[-1]
    last = llm.get_decoder()(**inputs).last_hidden_state
    shift = labels[:, 1:]
    keep = shift != -100
    logits = llm.get_output_embeddings()(last[:, :-1][keep])
    if not bool(keep.any()):  # what the full path gives: the mean of nothing
        return logits.sum() * float("nan"), last
    return F.cross_entropy(logits.float(), shift[keep]), last
