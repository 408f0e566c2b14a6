"""Registry: preset name or weights directory -> (SegLLM, tokenizer, config).

A segapp weights directory holds config.json (ModelConfig fields), model.safetensors and
tokenizer.json. A published LISA checkpoint folder (Hugging Face layout) is recognised by its
config.json and loaded through `segapp.checkpoints.lisa`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerFast

from segapp.config import (
    CHECKPOINT_PRESETS,
    MODEL_PRESETS,
    SEGAPP_FORMATS,
    ModelConfig,
    valid_threshold,
)
from segapp.errors import ModelError
from segapp.modeling.builders import (
    build_image_pos,
    build_llm,
    build_projector,
    build_sam,
    build_text_hidden_fcs,
    build_vision_tower,
    init_weights_,
)
from segapp.modeling.pointer import SegPointer
from segapp.modeling.segllm import SegLLM
from segapp.precision import Placement, place_, resolve_placement
from segapp.tokenizer import ChatFormat, chat_format_for, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def weights_root() -> Path:
    """Where bundled and fetched weights live (SEGAPP_WEIGHTS overrides the repo's weights/)."""
    return Path(os.environ.get("SEGAPP_WEIGHTS", REPO_ROOT / "weights"))


@dataclass
class Bundle:
    """A built model with everything needed to talk to it."""

    model: SegLLM
    tokenizer: PreTrainedTokenizerFast
    config: ModelConfig
    chat: ChatFormat
    source: str  # preset name or directory it came from


def image_token_count(cfg: ModelConfig) -> int:
    return (cfg.vision_image_size // cfg.vision_patch // cfg.vision_merge) ** 2


def build_segllm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> SegLLM:
    """The one construction path for tiny and real models (random init)."""
    if len(tokenizer) > cfg.vocab_size:
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens, config allows {cfg.vocab_size}")
    projector, fcs = build_projector(cfg), build_text_hidden_fcs(cfg)
    init_weights_(projector)
    init_weights_(fcs)
    image_pos = build_image_pos(cfg)
    if image_pos is not None:
        init_weights_(image_pos)
    pointer = SegPointer(cfg.llm_hidden, cfg.seg_pointer) if cfg.seg_pointer else None
    if pointer is not None:
        init_weights_(pointer)
    video_pointer = (
        SegPointer(cfg.llm_hidden, cfg.video_seg_pointer) if cfg.video_seg_pointer else None
    )
    if video_pointer is not None:
        init_weights_(video_pointer)
    if not valid_threshold(cfg.target_threshold):
        raise ModelError(
            f"target_threshold must be in (0, 1], got {cfg.target_threshold}",
            "ModelConfig.target_threshold",
        )
    target_head = torch.nn.Linear(cfg.llm_hidden, 1) if cfg.target_head else None
    if not 0.0 <= cfg.video_presence < 1.0:
        raise ModelError(
            f"video_presence must be in [0, 1), got {cfg.video_presence}",
            "ModelConfig.video_presence",
        )
    motion = (
        torch.nn.Linear(cfg.llm_hidden, cfg.llm_hidden, bias=False) if cfg.video_motion else None
    )
    if motion is not None:  # zero: a fresh motion map leaves the tokens as they were
        torch.nn.init.zeros_(motion.weight)
    chat = chat_format_for(cfg.chat_format, tokenizer, image_token_count(cfg))
    no_target_ids = _no_target_ids(cfg, chat)
    return SegLLM(
        vision_tower=build_vision_tower(cfg),
        projector=projector,
        llm=build_llm(cfg),
        text_hidden_fcs=fcs,
        sam=build_sam(cfg),
        image_pos=image_pos,
        seg_pointer=pointer,
        video_seg_pointer=video_pointer,
        video_motion=motion,
        video_presence=cfg.video_presence,
        target_head=target_head,
        target_threshold=cfg.target_threshold,
        image_token_id=chat.image_id,
        seg_token_id=chat.seg_id,
        eos_token_id=chat.eos_id,
        vision_select_layer=cfg.vision_select_layer,
        vision_merge=cfg.vision_merge,
        prefix_attention=cfg.prefix_attention,
        no_target_ids=no_target_ids,
        no_target_threshold=cfg.no_target_threshold,
    )


def _no_target_ids(cfg: ModelConfig, chat: ChatFormat) -> tuple[int, ...]:
    """First token of each of `cfg.no_target_openings` as this model's answers spell it."""
    if not valid_threshold(cfg.no_target_threshold):
        raise ModelError(
            f"no_target_threshold must be in (0, 1], got {cfg.no_target_threshold}",
            "ModelConfig.no_target_threshold",
        )
    ids = []
    for opening in cfg.no_target_openings:
        tokens = chat.answer_ids(opening)[:-1]  # without </s>
        if not opening.strip() or not tokens:
            raise ModelError(f"no_target_openings entry {opening!r} has no tokens", "ModelConfig")
        ids.append(tokens[0])
    return tuple(sorted(set(ids)))


def save_bundle(
    model: SegLLM, tokenizer: PreTrainedTokenizerFast, cfg: ModelConfig, out: Path
) -> None:
    """Write config.json, model.safetensors, tokenizer.json (each atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:  # the tied LM head shares storage with the embedding: store it once
        state.pop("llm.lm_head.weight", None)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "segapp": "SegLLM"})
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json.tmp").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    os.replace(out / "config.json.tmp", out / "config.json")
    if cfg.chat_format in SEGAPP_FORMATS:
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json.tmp"))
        os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
        return
    # a checkpoint's own (LLaMA) tokenizer: its special-token settings live beside tokenizer.json
    with tempfile.TemporaryDirectory(dir=out) as tmp_dir:
        tokenizer.save_pretrained(tmp_dir)
        for file in sorted(Path(tmp_dir).iterdir()):
            os.replace(file, out / file.name)


def load_bundle(directory: Path, *, device: str | torch.device = "cpu") -> Bundle:
    """Load a weights directory; every parameter must be present with the right shape."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (directory / name).is_file():
            raise ModelError(f"missing {name}", str(directory))
    try:
        cfg = ModelConfig.from_dict(json.loads((directory / "config.json").read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelError(f"unreadable config.json: {exc}", str(directory)) from None
    if cfg.chat_format in SEGAPP_FORMATS:
        tokenizer = load_tokenizer(directory)
    else:  # saved from a checkpoint's own tokenizer (see save_bundle)
        from segapp.checkpoints.lisa import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(directory)
    model = build_segllm(cfg, tokenizer)
    state = load_file(str(directory / "model.safetensors"))
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("llm.lm_head.weight", None)
    for key, value in expected.items():
        if key not in state:
            raise ModelError(f"checkpoint is missing parameter {key}", str(directory))
        if tuple(state[key].shape) != tuple(value.shape):
            raise ModelError(
                f"parameter {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}",
                str(directory),
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ModelError(f"unexpected parameter {unexpected[0]} in checkpoint", str(directory))
    model.load_state_dict(state, strict=False)
    model.llm.tie_weights()
    model.to(device).eval()
    chat = chat_format_for(cfg.chat_format, tokenizer, image_token_count(cfg))
    return Bundle(model, tokenizer, cfg, chat, str(directory))


@dataclass(frozen=True)
class LoadOptions:
    """How to load any model: precision / quantization (see segapp.precision) and, for published
    checkpoints, where the parts LISA's release does not hold come from."""

    precision: str | None = None  # None: the model's default (fp32 tiny; bf16 LISA on CUDA)
    quantize: str | None = None  # None, "8bit" or "4bit"
    vision_tower: Path | None = None  # CLIP folder for a LISA checkpoint
    sam_checkpoint: Path | None = None  # segment-anything .pth replacing the model's SAM
    new_head: bool = False  # accept a plain LLaVA folder, its [SEG] head untrained (training)


def _bundle_placement(device: str | torch.device, options: LoadOptions) -> Placement | None:
    """None keeps a segapp bundle exactly as stored (float32)."""
    if options.precision is None and options.quantize is None:
        return None
    return resolve_placement(str(device), options.precision, options.quantize)


def _load_bundle_with(directory: Path, device: str | torch.device, options: LoadOptions) -> Bundle:
    """load_bundle, then a SAM .pth and precision / quantization when asked for."""
    placement = _bundle_placement(device, options)  # fails fast, before anything is read
    bundle = load_bundle(directory, device=device)
    if options.sam_checkpoint is not None:
        from segapp.checkpoints.sam import load_sam_checkpoint

        load_sam_checkpoint(bundle.model.sam, options.sam_checkpoint)
    if placement is not None:
        place_(bundle.model, placement)
    return bundle


def _load_dir(directory: Path, device: str | torch.device, options: LoadOptions) -> Bundle:
    from segapp.checkpoints.lisa import is_lisa_dir, load_lisa

    if is_lisa_dir(directory):
        return load_lisa(
            directory,
            name=directory.name,
            vision_tower=options.vision_tower,
            sam_checkpoint=options.sam_checkpoint,
            placement=_lisa_placement(device, options),
            new_head=options.new_head,
        )
    return _load_bundle_with(directory, device, options)


def _lisa_placement(device: str | torch.device, options: LoadOptions) -> Placement:
    device = str(device)
    default = "bf16" if device.startswith("cuda") else "fp32"
    return resolve_placement(device, options.precision, options.quantize, model_default=default)


def _preset_loader(name: str) -> Callable[..., Bundle]:
    def load(device: str | torch.device = "cpu", options: LoadOptions | None = None) -> Bundle:
        options = options or LoadOptions()
        _bundle_placement(device, options)  # an unavailable mode fails before a missing folder
        directory = weights_root() / name
        if not directory.is_dir():
            raise ModelError(
                f"weights for preset {name!r} not found; train them with `segapp train`",
                str(directory),
            )
        return _load_bundle_with(directory, device, options)

    return load


def _checkpoint_loader(name: str) -> Callable[..., Bundle]:
    preset = CHECKPOINT_PRESETS[name]

    def load(device: str | torch.device = "cpu", options: LoadOptions | None = None) -> Bundle:
        from segapp.checkpoints.lisa import load_lisa

        options = options or LoadOptions()
        placement = _lisa_placement(device, options)  # an unavailable mode fails first
        directory = weights_root() / name
        if not directory.is_dir():
            raise ModelError(
                f"weights for {name!r} ({preset.hub_repo}) are not installed: copy them there, "
                f"or run `segapp weights fetch {name}` where a network exists",
                str(directory),
            )
        return load_lisa(
            directory,
            name=name,
            chat_format=preset.chat_format,
            vision_tower=options.vision_tower,
            vision_default=preset.vision_tower,
            sam_checkpoint=options.sam_checkpoint,
            placement=placement,
        )

    return load


# preset name -> loader; keys are the CLI's --model choices
MODEL_REGISTRY: dict[str, Callable[..., Bundle]] = {
    **{name: _preset_loader(name) for name in MODEL_PRESETS},
    **{name: _checkpoint_loader(name) for name in CHECKPOINT_PRESETS},
}


def load_model(
    name_or_dir: str,
    *,
    device: str | torch.device = "cpu",
    options: LoadOptions | None = None,
) -> Bundle:
    """A preset name (see MODEL_REGISTRY) or a path to a weights directory (segapp's own layout
    or a LISA checkpoint folder)."""
    options = options or LoadOptions()
    if name_or_dir in MODEL_REGISTRY:
        return MODEL_REGISTRY[name_or_dir](device=device, options=options)
    path = Path(name_or_dir)
    if path.is_dir():
        return _load_dir(path, device, options)
    choices = ", ".join(sorted(MODEL_REGISTRY))
    raise ModelError(
        f"unknown model {name_or_dir!r}: use one of {choices} or a weights directory", "--model"
    )
