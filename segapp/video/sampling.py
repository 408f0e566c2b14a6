"""Which frames the LLM sees: uniform, or VideoLISA's sparse-dense sampling.

Frame indices are 0-based positions in decoding order. Every frame is still segmented
(One-Token-Seg-All); sampling only decides what the LLM reads.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("uniform", "sparse-dense")


@dataclass(frozen=True)
class FrameSample:
    """dense: frames whose every visual token the LLM sees (in order, TTM runs over them);
    sparse: frames the LLM sees pooled to one token each (empty for uniform sampling)."""

    dense: tuple[int, ...]
    sparse: tuple[int, ...] = ()

    @property
    def all(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.dense) | set(self.sparse)))


def _spread(total: int, count: int) -> tuple[int, ...]:
    """`count` frame indices at the centres of equal segments of [0, total) (all if fewer)."""
    if count >= total:
        return tuple(range(total))
    return tuple(int((i + 0.5) * total / count) for i in range(count))


def sample_frames(
    total: int, *, dense: int = 4, sparse: int = 0, mode: str = "uniform"
) -> FrameSample:
    """Pick the frames of a `total`-frame video for the LLM.

    uniform: `dense` evenly spread frames. sparse-dense: additionally `sparse` evenly spread
    frames (VideoLISA uses 32), each pooled to one token. A video shorter than `dense` frames
    gives all of its frames.
    """
    if total < 1:
        raise ValueError("a video needs at least one frame")
    if dense < 1:
        raise ValueError(f"dense frames must be at least 1, got {dense}")
    if mode not in MODES:
        raise ValueError(f"unknown sampling {mode!r}: use one of {', '.join(MODES)}")
    if mode == "uniform" or sparse <= 0:
        return FrameSample(_spread(total, dense))
    return FrameSample(_spread(total, dense), _spread(total, sparse))
