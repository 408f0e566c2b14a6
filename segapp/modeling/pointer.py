"""The `[SEG]` pointer: each `[SEG]` hidden state picks the image token that holds its target.

SAM segments an object well from one point on it; the `[SEG]` embedding alone carries little
location. So a model with a pointer gives SAM two prompt tokens per `[SEG]`: the projected
hidden state (LISA's `text_hidden_fcs`) and SAM's own positive-point token at the centre of the
image patch the pointer picked. The pointer scores image tokens by a scaled dot product between
a query from the `[SEG]` hidden state and keys from the image tokens' last-layer hidden states.
"""

from __future__ import annotations

import torch
from torch import nn


class SegPointer(nn.Module):
    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, dim)
        self.k = nn.Linear(width, dim)

    def scores(self, seg: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """seg M x H, image M x N x H (or N x H, shared by every [SEG]) -> M x N logits."""
        keys = self.k(image)
        query = self.q(seg)
        if keys.dim() == 2:
            return query @ keys.T / self.q.out_features**0.5
        return torch.einsum("md,mnd->mn", query, keys) / self.q.out_features**0.5

    @staticmethod
    def on_target(cover: torch.Tensor) -> torch.Tensor:
        """M x N bool: the tokens that count as the target (a fifth of the patch or more, or
        the token it covers most)."""
        return (cover >= 0.2) | (cover == cover.amax(-1, keepdim=True))

    @classmethod
    def loss(cls, scores: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        """-log P(pointing at any target token), averaged over the M [SEG] tokens."""
        hit = scores.masked_fill(~cls.on_target(cover), float("-inf")).logsumexp(-1)
        return (scores.logsumexp(-1) - hit).mean()
