"""Published LISA checkpoints (xinlai/LISA-7B-v1, LISA-13B-llama2-v1, ...) -> SegLLM by names.

LISA's release is `LISAForCausalLM.save_pretrained()` of LLaVA-v1 + SAM + the [SEG] head, in
Hugging Face layout (config.json, pytorch_model-0000k-of-0000n.bin + index, a LLaMA tokenizer with
`[SEG]`, `<im_start>`, `<im_end>` added). Its merge script leaves the CLIP tower out (the config
names it: `mm_vision_tower` = openai/clip-vit-large-patch14), so the tower comes from its own
folder. No LLaVA code is used: segapp builds its own SegLLM from the config and copies each
stored tensor to the parameter that segapp.checkpoints.lisa_keys's table names.

config.json fields read (LISA's own names): architectures, hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, vocab_size, max_position_embeddings,
rms_norm_eps, rope_theta, rope_scaling, hidden_act, tie_word_embeddings, mm_hidden_size,
mm_vision_tower / vision_tower, mm_vision_select_layer, mm_vision_select_feature,
mm_projector_type (absent: linear), image_aspect_ratio, out_dim. SAM's size is read from the
stored shapes; the tokenizer from the folder with AutoTokenizer (offline).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from segapp.checkpoints.lisa_keys import (
    CLIP_INLINE,
    FCS_STORED,
    SAM_STORED,
    clip_rename,
    lisa_rename,
    stored_name,
)
from segapp.checkpoints.sam import infer_sam_fields, sam_source
from segapp.checkpoints.state import (
    Source,
    StoredTensors,
    index_checkpoint,
    load_strict,
    stored_shapes,
)
from segapp.config import ModelConfig
from segapp.errors import ModelError
from segapp.precision import Placement, place_, set_dtypes_
from segapp.tokenizer import SEG_TOKEN

if TYPE_CHECKING:
    from segapp.build import Bundle

ARCHITECTURES = ("LISAForCausalLM",)
LLAVA_ARCHITECTURES = ("LlavaLlamaForCausalLM",)  # loadable only to train a [SEG] head
REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
    "mm_hidden_size",
)


def is_lisa_dir(directory: Path) -> bool:
    """Whether `directory` holds a Hugging Face LISA (or LLaVA-v1) checkpoint, by config.json."""
    try:
        data = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    known = (*ARCHITECTURES, *LLAVA_ARCHITECTURES)
    return isinstance(data, dict) and any(a in known for a in data.get("architectures") or [])


# ---- config ------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"missing {path.name}", str(path.parent)) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"unreadable {path.name}: {exc}", str(path.parent)) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} is not a JSON object", str(path.parent))
    return data


def read_clip_config(directory: Path) -> CLIPVisionConfig:
    """The vision half of a CLIP folder's config (CLIPConfig or CLIPVisionConfig), offline."""
    try:
        vision = CLIPVisionConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise ModelError(f"unreadable CLIP config: {exc}", str(directory)) from None
    defaults = CLIPVisionConfig()
    for name in ("hidden_act", "layer_norm_eps"):
        if getattr(vision, name) != getattr(defaults, name):
            raise ModelError(
                f"CLIP {name}={getattr(vision, name)!r} is not supported "
                f"(segapp builds {getattr(defaults, name)!r})",
                str(directory),
            )
    return vision


def model_config_from_lisa(
    hf: dict[str, Any],
    vision: CLIPVisionConfig,
    sam_fields: dict[str, Any],
    *,
    name: str,
    chat_format: str,
    where: str,
    new_head: bool = False,
    vocab_size: int | None = None,
) -> ModelConfig:
    """segapp's ModelConfig for a LISA config.json + its CLIP tower + its SAM's shapes.

    new_head: also accept a plain LLaVA-v1 config (its [SEG] head is about to be trained);
    vocab_size: the tokenizer's size when tokens were added to the stored vocabulary.
    """
    known = (*ARCHITECTURES, *LLAVA_ARCHITECTURES) if new_head else ARCHITECTURES
    if not any(a in known for a in hf.get("architectures", [])):
        raise ModelError(
            f"not a LISA checkpoint (architectures {hf.get('architectures')}, "
            f"expected {ARCHITECTURES[0]})",
            where,
        )
    for field in REQUIRED_FIELDS:
        if field not in hf:
            raise ModelError(f"config.json has no {field!r}", where)
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "mm_vision_select_feature": (hf.get("mm_vision_select_feature", "patch"), "patch"),
        "rope_scaling": (hf.get("rope_scaling"), None),
    }
    for field, (value, supported) in unsupported.items():
        if value != supported:
            raise ModelError(f"config.json {field}={value!r} is not supported", where)
    projector = hf.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        raise ModelError(f"projector type {projector!r} is not supported", where)
    if hf["mm_hidden_size"] != vision.hidden_size:
        raise ModelError(
            f"mm_hidden_size {hf['mm_hidden_size']} does not match the CLIP tower's width "
            f"{vision.hidden_size}",
            where,
        )
    out_dim = hf.get("out_dim", sam_fields["prompt_dim"])  # LLaVA has none: SAM's width
    if out_dim != sam_fields["prompt_dim"]:
        raise ModelError(
            f"out_dim {out_dim} does not match SAM's {sam_fields['prompt_dim']}", where
        )
    return ModelConfig(
        name=name,
        vision_image_size=int(vision.image_size),  # type: ignore[arg-type]
        vision_patch=int(vision.patch_size),  # type: ignore[arg-type]
        vision_hidden=vision.hidden_size,
        vision_layers=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        vision_mlp=vision.intermediate_size,
        vocab_size=max(hf["vocab_size"], vocab_size or 0),
        llm_hidden=hf["hidden_size"],
        llm_layers=hf["num_hidden_layers"],
        llm_heads=hf["num_attention_heads"],
        llm_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        llm_mlp=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        llm_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        image_pos=False,
        projector=projector,
        vision_select_layer=hf.get("mm_vision_select_layer", -2),
        vision_resize="crop" if hf.get("image_aspect_ratio", "square") == "square" else "pad",
        chat_format=chat_format,
        **sam_fields,
    )


# ---- where the parts are -----------------------------------------------------------------------
def find_vision_tower(
    directory: Path, hf: dict[str, Any], explicit: Path | None, weights: Path, default: str
) -> Path:
    """The CLIP folder: --vision-tower, else <checkpoint>/vision_tower, else the config's
    mm_vision_tower as a local path, else weights/<its last path part>, else weights/<default>."""
    if explicit is not None:
        if not (explicit / "config.json").is_file():
            raise ModelError("no CLIP config.json there", str(explicit))
        return explicit
    name = str(hf.get("mm_vision_tower") or hf.get("vision_tower") or default)
    candidates = [
        directory / "vision_tower",
        Path(name),
        weights / Path(name).name,
        weights / default,
    ]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    raise ModelError(
        f"vision tower {name!r} is not on this machine: put it in {weights / Path(name).name} "
        f"(`segapp weights fetch {default}` where a network exists) or pass --vision-tower DIR",
        str(directory),
    )


def load_hf_tokenizer(directory: Path, *, add_seg: bool = False) -> PreTrainedTokenizerFast:
    """The checkpoint's own tokenizer (AutoTokenizer, local files only), with `[SEG]` in it
    (`add_seg`: added, as LISA adds it, when a plain LLaVA tokenizer lacks it)."""
    try:
        # config given, so AutoTokenizer does not read LISA's config.json as transformers' own,
        # unrelated LlavaConfig (same model_type "llava"); tokenizer_config.json names the class
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), local_files_only=True, config=LlamaConfig()
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        hint = ""
        if (directory / "tokenizer.model").is_file() and not (
            directory / "tokenizer.json"
        ).is_file():
            hint = " (LLaMA's tokenizer.model needs: pip install sentencepiece protobuf)"
        raise ModelError(f"cannot load the tokenizer: {exc}{hint}", str(directory)) from None
    if SEG_TOKEN not in tokenizer.get_vocab():
        if not add_seg:
            raise ModelError(f"the tokenizer has no {SEG_TOKEN} token", str(directory))
        tokenizer.add_tokens([SEG_TOKEN])
    return cast(PreTrainedTokenizerFast, tokenizer)


def _shapes_under(stored: StoredTensors, prefix: str) -> dict[str, tuple[int, ...]]:
    files = {stored.weight_map[k] for k in stored.weight_map if k.startswith(prefix)}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes.update(
            {k[len(prefix) :]: v for k, v in stored_shapes(path).items() if k.startswith(prefix)}
        )
    return shapes


@contextmanager
def _building(placement: Placement):
    """Create parameters straight in the target dtype (and on the target device when no
    quantization follows): a 13B model is never held in float32 on the way."""
    old = torch.get_default_dtype()
    device = "cpu" if placement.quantize else placement.device
    torch.set_default_dtype(placement.dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


# ---- loading -----------------------------------------------------------------------------------
def load_lisa(
    directory: Path,
    *,
    name: str = "lisa",
    chat_format: str = "llava_v1",
    vision_tower: Path | None = None,
    vision_default: str = "clip-vit-large-patch14",
    sam_checkpoint: Path | None = None,
    placement: Placement | None = None,
    new_head: bool = False,
) -> Bundle:
    """Build a SegLLM from a LISA checkpoint folder; every parameter filled or an error.

    sam_checkpoint: a segment-anything .pth that replaces the checkpoint's own SAM (any of
    vit_b / vit_l / vit_h; the checkpoint's fine-tuned mask decoder goes with it).
    new_head: accept a plain LLaVA-v1 folder (no text_hidden_fcs, maybe no `[SEG]` token): the
    head keeps its fresh initialisation and `[SEG]` gets a new embedding row, ready for
    `segapp train --init-from` to train them.
    """
    # late: segapp.build reaches this module lazily, from its registry
    from segapp.build import Bundle, build_segllm, image_token_count, weights_root
    from segapp.tokenizer import chat_format_for

    placement = placement or Placement()
    where = str(directory)
    if not directory.is_dir():
        raise ModelError("checkpoint folder not found", where)
    hf = read_json(directory / "config.json")
    stored = index_checkpoint(directory)
    has_head = any(k.startswith(FCS_STORED) for k in stored.weight_map)
    if not has_head and not new_head:
        raise ModelError(
            "checkpoint has no text_hidden_fcs (a plain LLaVA model?): it needs a trained [SEG] "
            "head first: `segapp train --init-from DIR --sam SAM.pth --out NEW_DIR`",
            where,
        )
    if sam_checkpoint is not None:
        from segapp.checkpoints.sam import sam_fields_of_file

        sam_fields = sam_fields_of_file(sam_checkpoint)
    elif any(k.startswith(SAM_STORED) for k in stored.weight_map):
        sam_fields = infer_sam_fields(_shapes_under(stored, SAM_STORED), where=where)
    else:
        raise ModelError(
            "checkpoint has no SAM (model.visual_model.*): pass --sam sam_vit_h_4b8939.pth", where
        )
    clip_inline = any(k.startswith(CLIP_INLINE) for k in stored.weight_map)
    clip_dir = find_vision_tower(directory, hf, vision_tower, weights_root(), vision_default)
    vision = read_clip_config(clip_dir)
    tokenizer = load_hf_tokenizer(directory, add_seg=new_head)
    cfg = model_config_from_lisa(
        hf,
        vision,
        sam_fields,
        name=name,
        chat_format=chat_format,
        where=where,
        new_head=new_head,
        vocab_size=len(tokenizer),
    )
    with _building(placement):
        model = build_segllm(cfg, tokenizer)
    set_dtypes_(model, placement)

    clip = (
        "vision_tower.vision_model."
        if hasattr(model.vision_tower, "vision_model")
        else "vision_tower."
    )
    sources = [Source(stored, lisa_rename(clip, drop_sam=sam_checkpoint is not None))]
    if not clip_inline:
        sources.append(Source(index_checkpoint(clip_dir), clip_rename(clip)))
    if sam_checkpoint is not None:
        sources.append(sam_source(sam_checkpoint))
    skip = ["llm.lm_head.weight"] if cfg.tie_embeddings else []
    if not has_head:  # keeps build_segllm's initialisation, to be trained
        skip += [k for k in model.state_dict() if k.startswith("text_hidden_fcs.")]
    load_strict(
        model,
        sources,
        skip=skip,
        describe=lambda target: stored_name(target, clip, clip_inline=clip_inline),
        grow_rows=("llm.model.embed_tokens.weight", "llm.lm_head.weight") if new_head else (),
    )
    if cfg.tie_embeddings:
        model.llm.tie_weights()
    place_(model, placement)
    chat = chat_format_for(cfg.chat_format, tokenizer, image_token_count(cfg))
    return Bundle(model, tokenizer, cfg, chat, where)
