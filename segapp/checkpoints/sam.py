"""segment-anything checkpoints (sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth).

The published .pth files are `Sam.state_dict()` of segment_anything itself, so the names map
one to one onto SegLLM's `sam.` part. The architecture is read from the tensor shapes: a
published ViT size is recognised by its encoder width and depth; anything else is built as
segapp's 'tiny' layout with the stored dimensions (what the tests use).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from segapp.checkpoints.state import Source, load_strict, single_file, stored_shapes
from segapp.errors import ModelError
from segapp.modeling.builders import SAM_VIT_SIZES

# stored name (segment-anything's Sam) -> SegLLM name
SAM_PREFIX = "sam."


def _count(shapes: dict[str, tuple[int, ...]], pattern: str) -> int:
    found = {m.group(1) for k in shapes if (m := re.match(pattern, k))}
    return len(found)


def infer_sam_fields(shapes: dict[str, tuple[int, ...]], *, where: str) -> dict[str, Any]:
    """ModelConfig SAM fields from the shapes of a Sam state dict (names without prefix)."""
    try:
        dim, _, patch, _ = shapes["image_encoder.patch_embed.proj.weight"]
        grid = shapes["image_encoder.pos_embed"][1]
        prompt_dim = shapes["image_encoder.neck.0.weight"][0]
        decoder_mlp = shapes["mask_decoder.transformer.layers.0.mlp.lin1.weight"][0]
    except (KeyError, ValueError, IndexError):
        raise ModelError("not a segment-anything SAM state dict", where) from None
    depth = _count(shapes, r"image_encoder\.blocks\.(\d+)\.")
    decoder_depth = _count(shapes, r"mask_decoder\.transformer\.layers\.(\d+)\.")
    rel_pos = shapes.get("image_encoder.blocks.0.attn.rel_pos_h")
    for variant, (v_dim, v_depth, _, _) in SAM_VIT_SIZES.items():
        if (dim, depth, patch, grid * patch, prompt_dim) == (v_dim, v_depth, 16, 1024, 256):
            return {"sam_variant": variant, "prompt_dim": 256}
    if rel_pos is not None:
        raise ModelError(
            f"SAM encoder of width {dim} and depth {depth} is not vit_b / vit_l / vit_h", where
        )
    return {
        "sam_variant": "tiny",
        "sam_image_size": grid * patch,
        "sam_patch": patch,
        "sam_encoder_dim": dim,
        "sam_encoder_depth": depth,
        "prompt_dim": prompt_dim,
        "decoder_depth": decoder_depth,
        "decoder_mlp": decoder_mlp,
    }


def sam_fields_of_file(path: Path) -> dict[str, Any]:
    return infer_sam_fields(stored_shapes(path), where=str(path))


def sam_source(path: Path) -> Source:
    """A SAM .pth as a Source for SegLLM (names prefixed with `sam.`)."""
    return Source(single_file(path), lambda key: SAM_PREFIX + key)


def load_sam_checkpoint(sam: torch.nn.Module, path: Path) -> None:
    """Fill a segment_anything Sam from a .pth in its own key layout, strictly."""
    load_strict(sam, [Source(single_file(path), lambda key: key)])
