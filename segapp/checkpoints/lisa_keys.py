"""How a published LISA checkpoint's stored tensor names map onto SegLLM's parameter names.

Mapping (stored prefix -> SegLLM prefix, first match wins; `{clip}` is `vision_tower.` or, with
transformers releases whose CLIPVisionModel nests a `vision_model`, `vision_tower.vision_model.`):

| LISA checkpoint                              | SegLLM             | what                                   |
|----------------------------------------------|--------------------|----------------------------------------|
| model.visual_model.                          | sam.               | SAM ViT-H: image_encoder, prompt_encoder, mask_decoder (segment_anything names) |
| model.text_hidden_fcs.0.                     | text_hidden_fcs.   | ModuleList[Sequential(Linear 0, ReLU, Linear 2, Dropout)] -> Sequential(0, ReLU, 2) |
| model.mm_projector.                          | projector.         | LLaVA-v1: one Linear(mm_hidden_size, hidden_size) |
| model.vision_tower.vision_tower.vision_model. | {clip}            | CLIP ViT-L/14 when stored inline (LISA's release leaves it out) |
| model.                                       | llm.model.         | LLaMA: embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, norm |
| lm_head.                                     | llm.lm_head.       | LM head (tie_word_embeddings = false)  |
| *.rotary_emb.inv_freq, *.position_ids        | (dropped)          | buffers older transformers saved; recomputed |

CLIP tower folder (openai/clip-vit-large-patch14, a CLIPModel):

| CLIP checkpoint                              | SegLLM             | what                                   |
|----------------------------------------------|--------------------|----------------------------------------|
| vision_model.                                | {clip}             | the vision half                        |
| text_model., text_projection., visual_projection., logit_scale | (dropped) | the text half LLaVA does not use |
"""

from __future__ import annotations

from segapp.checkpoints.state import Rename

CLIP = "{clip}"
# (stored prefix, SegLLM prefix): the table above, in match order
LISA_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("model.visual_model.", "sam."),
    ("model.text_hidden_fcs.0.", "text_hidden_fcs."),
    ("model.mm_projector.", "projector."),
    ("model.vision_tower.vision_tower.vision_model.", CLIP),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)
CLIP_KEY_MAP: tuple[tuple[str, str], ...] = (("vision_model.", CLIP),)
DROPPED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")
CLIP_DROPPED_PREFIXES = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
SAM_STORED, FCS_STORED = "model.visual_model.", "model.text_hidden_fcs."
CLIP_INLINE = "model.vision_tower.vision_tower.vision_model."
UNMAPPED = "(unmapped) "  # never a module name


def _rename(table: tuple[tuple[str, str], ...], key: str, clip: str) -> str | None:
    for stored, target in table:
        if key.startswith(stored):
            return target.replace(CLIP, clip) + key[len(stored) :]
    return None


def lisa_rename(clip: str, *, drop_sam: bool = False) -> Rename:
    """Stored LISA name -> SegLLM name (None: dropped). A name no rule covers maps to no model
    name at all, so the strict loader reports it as unexpected."""

    def rename(key: str) -> str | None:
        if key.endswith(DROPPED_SUFFIXES) or (drop_sam and key.startswith(SAM_STORED)):
            return None
        return _rename(LISA_KEY_MAP, key, clip) or UNMAPPED + key

    return rename


def clip_rename(clip: str) -> Rename:
    """Stored CLIP-folder name -> SegLLM name (the text half dropped)."""

    def rename(key: str) -> str | None:
        if key.startswith(CLIP_DROPPED_PREFIXES) or key.endswith(DROPPED_SUFFIXES):
            return None
        return _rename(CLIP_KEY_MAP, key, clip) or UNMAPPED + key

    return rename


def stored_name(target: str, clip: str, *, clip_inline: bool) -> str:
    """SegLLM name -> the name a user finds in the checkpoint (for error messages)."""
    table = LISA_KEY_MAP if clip_inline or not target.startswith(clip) else CLIP_KEY_MAP
    for stored, prefix in table:
        prefix = prefix.replace(CLIP, clip)
        if target.startswith(prefix):
            return stored + target[len(prefix) :]
    return target
