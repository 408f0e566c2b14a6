"""DyCoke stage 1: temporal token merging (TTM) over per-frame visual tokens.

DyCoke (CVPR 2025) drops the visual tokens of a frame that did not change since a reference
frame: their content is carried by the reference. Frames go in windows of 4 (f0..f3):
f1 is compared with f0, f3 with f2 and f2 with f0, token by *corresponding* token (same patch),
by cosine similarity. Each compared frame keeps the ``int((1 - K) * N)`` tokens with the lowest
similarity (the ones that changed most); f0 keeps all of its N tokens, so a full window keeps
``N + 3 * int((1 - K) * N)`` tokens, a retained fraction of ``(1 + 3 (1 - K)) / 4``.
Every window is handled, a short last one included (the public code skips f2 of the last
window; this does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WINDOW = 4
# (compared frame, reference frame) inside a window, in DyCoke's order
PAIRS: tuple[tuple[int, int], ...] = ((1, 0), (3, 2), (2, 0))


@dataclass
class Merged:
    """Kept tokens of a T x N x D clip, in (frame, patch) order.

    tokens: M x D kept tokens; index: M x 2 long (frame, patch) of each kept token, so the
    token's original flat position in the unmerged T * N sequence is ``frame * N + patch``.
    """

    tokens: torch.Tensor
    index: torch.Tensor
    per_frame: int  # N: tokens per frame before merging
    frames: int  # T

    @property
    def total(self) -> int:
        """T * N: tokens before merging."""
        return self.frames * self.per_frame

    @property
    def flat_positions(self) -> torch.Tensor:
        """M long: position of each kept token in the unmerged, frame-major T * N sequence."""
        return self.index[:, 0] * self.per_frame + self.index[:, 1]


def keep_count(n: int, k: float) -> int:
    """Tokens a compared frame keeps: int((1 - K) * N)."""
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"merge ratio K must be in [0, 1], got {k}")
    return int((1.0 - k) * n)


def temporal_token_merge(tokens: torch.Tensor, k: float, *, window: int = WINDOW) -> Merged:
    """DyCoke TTM on ``tokens`` (T x N x D per-frame visual tokens) with merge ratio ``k``.

    Returns the kept tokens and their (frame, patch) indices (see `Merged`). ``k = 0`` keeps
    every token in the original order (exactly the unmerged sequence). Windows are
    ``[0, 4), [4, 8), ...``; a short last window of 2 or 3 frames uses the pairs that exist
    (f1 vs f0; f2 vs f0), a last window of one frame keeps it whole (it is an f0).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be T x N x D, got shape {tuple(tokens.shape)}")
    t, n, _ = tokens.shape
    keep = keep_count(n, k)
    patches = torch.arange(n, device=tokens.device)
    kept_patches: list[torch.Tensor] = [patches] * t  # f0 of every window keeps all
    for start in range(0, t, window):
        size = min(window, t - start)
        for cur, ref in PAIRS:
            if cur >= size:
                continue
            sim = F.cosine_similarity(
                tokens[start + cur].float(), tokens[start + ref].float(), dim=-1
            )
            # stable sort: ties (e.g. identical frames) keep the lowest patch indices
            order = torch.sort(sim, stable=True).indices[:keep]
            kept_patches[start + cur] = order.sort().values
    frames = torch.cat(
        [
            torch.full((len(p),), f, dtype=torch.long, device=tokens.device)
            for f, p in enumerate(kept_patches)
        ]
    )
    cols = torch.cat(kept_patches).long()
    return Merged(tokens[frames, cols], torch.stack([frames, cols], 1), n, t)


def fill_merged(values: torch.Tensor, kept: torch.Tensor, *, window: int = WINDOW) -> torch.Tensor:
    """Per-token values (T x N x ...) with every merged token's entry taken from its reference.

    kept: T x N bool, the tokens TTM kept (their `values` are used as given). A dropped token
    was "the same" as the token at its patch in the frame it was compared with, so it inherits
    that token's value (f1 and f2 from f0, f3 from f2, which is complete by then).
    """
    out = values.clone()
    for start in range(0, values.shape[0], window):
        for cur, ref in sorted(PAIRS):
            if start + cur < values.shape[0]:
                dropped = ~kept[start + cur]
                out[start + cur][dropped] = out[start + ref][dropped]
    return out


def retained_fraction(k: float) -> float:
    """(1 + 3 (1 - K)) / 4: the share of tokens a full window keeps (ignoring int rounding)."""
    return (1.0 + 3.0 * (1.0 - k)) / 4.0
