"""Frozen configuration dataclasses and named presets.

Every field carries its help string in ``metadata["help"]`` so the CLI and docs can show it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors dataclasses.field
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a SegLLM: vision tower -> projector -> causal LM -> [SEG] head -> SAM."""

    name: str = _f("tiny", "preset name this config was made from")
    # vision tower (CLIP ViT) seen by the LLM
    vision_image_size: int = _f(128, "square input size of the vision tower, pixels")
    vision_patch: int = _f(16, "vision tower patch size; tokens = (size / patch)^2")
    vision_hidden: int = _f(128, "vision tower width")
    vision_layers: int = _f(2, "vision tower depth")
    vision_heads: int = _f(4, "vision tower attention heads")
    vision_mlp: int = _f(256, "vision tower MLP width")
    # causal LM
    vocab_size: int = _f(1024, "tokenizer vocabulary size, special tokens included")
    llm_hidden: int = _f(128, "LLM width")
    llm_layers: int = _f(4, "LLM depth")
    llm_heads: int = _f(4, "LLM attention heads")
    llm_mlp: int = _f(384, "LLM MLP width")
    max_positions: int = _f(256, "longest sequence the LLM accepts (image tokens included)")
    # SAM
    sam_image_size: int = _f(128, "SAM input size (ResizeLongestSide + pad), pixels")
    sam_patch: int = _f(8, "SAM encoder patch size; embedding grid = size / patch")
    sam_encoder_dim: int = _f(96, "SAM image encoder width")
    sam_encoder_depth: int = _f(3, "SAM image encoder depth")
    sam_encoder_heads: int = _f(4, "SAM image encoder heads")
    prompt_dim: int = _f(64, "SAM prompt / mask decoder width (256 for real SAM)")
    decoder_depth: int = _f(2, "two-way transformer depth in SAM's mask decoder")
    decoder_mlp: int = _f(256, "two-way transformer MLP width")
    sam_variant: str = _f("tiny", "'tiny' (trained here) or 'vit_b' / 'vit_l' / 'vit_h'")
    vision_merge: int = _f(
        1, "merge k x k neighbouring vision patches into one LLM token (concatenated channels)"
    )
    image_pos: bool = _f(
        True,
        "add SAM's positional encoding of each patch centre to the image tokens, so [SEG] can "
        "point in SAM's coordinates (off for published LISA checkpoints)",
    )
    seg_pointer: int = _f(
        0,
        "width of the [SEG] pointer (0 = none): each [SEG] also picks the image token of its "
        "target and adds SAM's point prompt at that patch centre (off for published LISA)",
    )
    video_seg_pointer: int = _f(
        0,
        "width of a second [SEG] pointer for video (0 = video uses the image pointer): it "
        "scores every visual token of the LLM's frames, so where it points gives the point "
        "track and how much of it each frame holds says whether the target is there",
    )
    video_motion: bool = _f(
        False,
        "video tokens also carry their motion: each LLM frame's token plus a learnt linear map "
        "of how it differs from the same patch's mean over the LLM's frames (what moved, "
        "changed colour, grew, appeared or went), before TTM; trained by `segapp train-video`",
    )
    video_presence: float = _f(
        0.0,
        "with a video pointer trained per token (`segapp train-video`): a frame keeps a "
        "[SEG]'s mask only if the pointer gives its best token on that frame at least this "
        "probability (the target is there); 0 = every frame keeps it",
    )
    multi_group: bool = _f(
        False,
        "trained with `--multi-order group_first`: the first [SEG] of a multi-target answer "
        "segments the whole group, and the predictor splits it into its connected components "
        "to find the targets the per-target [SEG]s missed",
    )
    target_head: bool = _f(
        False,
        "a linear head on the image tokens' last-layer hidden states saying which tokens lie on "
        "what the instruction asks for (trained by --target-weight); a multi-target answer "
        "adds the objects it marks that none of the answer's [SEG] masks covers",
    )
    target_threshold: float = _f(
        0.7,
        "probability the target head needs on an image token before a multi-target answer "
        "adds the object there",
    )
    vision_stem: str = _f(
        "patch",
        "vision tower input layer: 'patch' (CLIP's one strided convolution, as in published "
        "checkpoints), 'conv' (four 3 x 3 stride-2 convolutions: outlines, hence shapes, are "
        "learnt far sooner from scratch) or 'conv4' (a 4 x 4 patchify convolution, then two "
        "3 x 3 stride-2 ones: about a third of conv's cost)",
    )
    projector_norm: bool = _f(
        False,
        "LayerNorm on the projector output: image tokens keep the scale of text embeddings, so "
        "the added patch-position term is not drowned by large vision features",
    )
    prefix_attention: bool = _f(
        False,
        "the prompt (instruction and image tokens) attends bidirectionally and only the answer "
        "causally (a prefix LM), so every image token can compare itself with all the others "
        "(off for published LISA checkpoints, which are causal throughout)",
    )
    no_target_openings: tuple[str, ...] = _f(
        (),
        "how this model's answers begin when nothing in the image matches ('There is no', "
        "'Sorry, I cannot find'); with no_target_threshold they let the first answer token "
        "decide whether anything is there (empty: plain greedy decoding)",
    )
    no_target_threshold: float = _f(
        0.5,
        "begin the answer with the likeliest first token of a no_target_openings entry when "
        "those first tokens together hold at least this probability (greedy decoding from "
        "there); below 0.5 the model says 'nothing here' more readily than greedy decoding",
    )
    # fields for published LLaVA / LISA checkpoints; the defaults are the tiny model's choices
    projector: str = _f("mlp2x_gelu", "'mlp2x_gelu' (LLaVA-1.5) or 'linear' (LLaVA-v1, as in LISA)")
    vision_select_layer: int = _f(
        -1, "vision tower layer whose patch tokens the LLM sees (-1 last, LLaVA uses -2)"
    )
    vision_resize: str = _f(
        "pad",
        "vision tower input: 'pad' (longest side + pad, like SAM) or 'crop' (CLIP's shortest "
        "side + centre crop, as LLaVA / LISA were trained)",
    )
    llm_kv_heads: int = _f(0, "LLM key/value heads (0 = llm_heads, no grouped-query attention)")
    llm_norm_eps: float = _f(1e-6, "LLM RMSNorm epsilon")
    rope_theta: float = _f(10000.0, "LLM rotary embedding base")
    tie_embeddings: bool = _f(True, "LM head shares the input embedding matrix")
    chat_format: str = _f(
        "segapp",
        "prompt template: 'segapp' (image, then instruction), 'segapp_text_first' (instruction, "
        "then image), 'llava_v1' or 'llava_llama_2' (LISA / LLaVA)",
    )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All fields, except checkpoint-only ones left at their default (so a tiny model's
        config.json keeps exactly the keys it always had)."""
        data = dataclasses.asdict(self)
        for name in CHECKPOINT_ONLY_FIELDS:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            from segapp.errors import ModelError

            raise ModelError(f"unknown model config fields {unknown}", "config.json")
        if "no_target_openings" in data:  # a JSON list
            data = {**data, "no_target_openings": tuple(data["no_target_openings"])}
        return cls(**data)


def valid_threshold(value: float) -> bool:
    """A probability threshold that can be reached (no_target_threshold, target_threshold):
    in (0, 1]."""
    return 0.0 < value <= 1.0


# chat formats of segapp's own models (its own byte-level BPE tokenizer.json)
SEGAPP_FORMATS = ("segapp", "segapp_text_first")

# fields added after the first tiny model; written to config.json only when not at the default
CHECKPOINT_ONLY_FIELDS = (
    "projector",
    "vision_select_layer",
    "vision_resize",
    "llm_kv_heads",
    "llm_norm_eps",
    "rope_theta",
    "tie_embeddings",
    "chat_format",
    "seg_pointer",
    "vision_stem",
    "projector_norm",
    "prefix_attention",
    "video_seg_pointer",
    "video_motion",
    "video_presence",
    "multi_group",
    "target_head",
    "target_threshold",
    "no_target_openings",
    "no_target_threshold",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


@dataclass(frozen=True)
class TrainConfig:
    """Schedule of `segapp train` (two stages: SAM warm-up on point prompts, then joint)."""

    steps: int = _f(2500, "joint-stage optimisation steps")
    sam_warmup_steps: int = _f(300, "stage-1 steps training SAM alone from point prompts")
    images_per_batch: int = _f(8, "scenes per step; image encoders run once per scene")
    queries_per_image: int = _f(3, "instructions per scene (LISA-style several conversations)")
    lr: float = _f(2e-3, "peak AdamW learning rate")
    warmup: int = _f(100, "linear warm-up steps of each stage")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas")
    ce_weight: float = _f(1.0, "text cross-entropy weight")
    bce_weight: float = _f(2.0, "per-pixel BCE weight")
    dice_weight: float = _f(0.5, "Dice weight")
    iou_weight: float = _f(1.0, "weight of SAM's IoU head regression (mask score)")
    point_weight: float = _f(
        1.0, "MSE pulling each [SEG] prompt towards SAM's point token at its target"
    )
    pointer_weight: float = _f(
        1.0, "cross-entropy of a training-only head pointing each [SEG] at its target's patch"
    )
    pointer_teacher: float = _f(
        0.5,
        "share of [SEG] point prompts taken on the target (else where the pointer points); a "
        "model with a pointer trains the [SEG]-only prompt on every fifth step when it also "
        "trains on video (video prompts every frame with [SEG] alone)",
    )
    probe_weight: float = _f(0.5, "per-patch attribute probe on the vision tower (training only)")
    probe_swap: float = _f(
        0.0,
        "share of each batch's scenes the probe also reads with their colour channels "
        "reordered (shape learnt apart from colour; 0 = off)",
    )
    target_weight: float = _f(
        0.0,
        "BCE of a head marking the image tokens on a query's targets; saved with the model "
        "(ModelConfig.target_head), where it completes multi-target answers",
    )
    target_marks: str = _f(
        "half",
        "the target head's positives: 'half' (image tokens a target covers by half or more) "
        "or 'every' (also each target's most-covered token; other partly covered tokens are "
        "left out of the loss)",
    )
    token_probe: float = _f(
        0.0,
        "weight of the object probe on the image tokens the LLM reads (projector output), so "
        "colour / shape / size / texture stay linearly readable where instructions meet them",
    )
    dense_probe: float = _f(
        0.0,
        "weight of the object probe read per token: every vision patch, and every image token "
        "the LLM reads, that one object covers by half or more names that object's colour, "
        "shape, size and texture with the pooled probes' own heads (training only; 0 = off). "
        "Pooled, an object's shape may live in its outline patches alone, but the LLM "
        "compares the instruction with each token",
    )
    relation_probe: float = _f(
        0.0,
        "weight of a probe asking each object's pooled tokens (vision patches, and the image "
        "tokens the LLM reads) how many objects share its colour / shape / size / texture and "
        "whether it is the largest or smallest of its group (training only; 0 = off): what "
        "counting, multi-target and superlative instructions turn on",
    )
    answer_order: str = _f(
        "seg_first",
        "one-target answers: 'seg_first' (\"It is [SEG], the red circle.\", what the model "
        "answers with) or 'describe_first' (\"It is the red circle [SEG].\", a training "
        "scaffold) or 'restate' (\"It is the red shape [SEG], the red circle.\": the "
        "instruction's own phrase copied before [SEG]; the bundled recipe) or "
        "'restate_reason_after' (restate, with a reason that led the answer moved after the "
        'description: "It is the round thing [SEG], the red circle: a wheel is round.")',
    )
    multi_order: str = _f(
        "count_first",
        "multi-target answers: 'count_first' (\"There are two circles: the red one [SEG] and "
        "the blue one [SEG].\", the bundled recipe) or 'list_first' (\"The circles: the red "
        'one [SEG], the blue one [SEG]; two in all.": each step asks whether another match '
        "lies to the right, instead of a count said before any target) or 'group_first' (\"The "
        'circles [SEG]: the red one [SEG] and the blue one [SEG].": a first [SEG] for the '
        "whole group, whose mask's connected components give the count)",
    )
    grad_clip: float = _f(1.0, "gradient norm clip")
    seed: int = _f(0, "random seed (data and init)")
    video_fraction: float = _f(
        0.0,
        "share of joint-stage steps that add a synthetic video sample's loss (segapp.video."
        "training); 0 = image-only training",
    )
    video_clips: int = _f(1, "synthetic clips per video step (their losses averaged)")
    video_sam_frames: int = _f(
        2,
        "frames of each training clip the [SEG] prompt is decoded on by SAM (frames without "
        "the target teach an empty mask; the decoder is cheap next to the LLM)",
    )
    video_pointer: bool = _f(
        False,
        "video samples also train the [SEG] pointer on each LLM frame and prompt SAM with its "
        "point track (as `segapp video` does with a pointer model)",
    )
    video_token_losses: bool = _f(
        False,
        "video samples also train, over every LLM frame's visual tokens, the target head "
        "(with target_weight) and the [SEG] pointer's cross-entropy (SAM is still prompted "
        "with [SEG] alone, as `segapp video` does by default)",
    )
    threads: int = _f(0, "torch CPU threads; 0 = all cores (set it lower on a busy machine)")
    workers: int = _f(1, "data-generating worker processes")
    checkpoint_every: int = _f(250, "steps between resumable checkpoints")
    log_every: int = _f(25, "steps between loss-log lines")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


MODEL_PRESETS: dict[str, ModelConfig] = {
    # the vision tower reads the synthetic world at full resolution (256 px, 16 x 16 patches,
    # fine enough to tell shapes apart) and the LLM sees 2 x 2-merged tokens (8 x 8 = 64)
    "tiny": ModelConfig(vision_image_size=256, vision_layers=3, vision_merge=2, seg_pointer=64),
}


@dataclass(frozen=True)
class CheckpointPreset:
    """A published checkpoint: where it lives under weights/, where it is fetched from, how to
    talk to it. Its shapes are read from the checkpoint's own config.json at load time."""

    hub_repo: str = _f("", "Hugging Face repo id `segapp weights fetch` downloads")
    chat_format: str = _f("llava_v1", "conversation template the checkpoint was trained with")
    vision_tower: str = _f(
        "clip-vit-large-patch14", "weights/ folder of the CLIP tower (LISA does not store it)"
    )
    description: str = _f("", "one line for `segapp weights list` and --help")


# preset name -> published checkpoint; LISA's own chat.py uses the llava_v1 template for all of
# them (llama2 variants included)
CHECKPOINT_PRESETS: dict[str, CheckpointPreset] = {
    "lisa-7b": CheckpointPreset(
        "xinlai/LISA-7B-v1", description="LISA-7B-v1, LLaVA-Lightning-7B inside"
    ),
    "lisa-7b-explanatory": CheckpointPreset(
        "xinlai/LISA-7B-v1-explanatory", description="LISA-7B-v1, explains its answers"
    ),
    "lisa-13b": CheckpointPreset(
        "xinlai/LISA-13B-llama2-v1", description="LISA-13B-llama2-v1, LLaVA LLaMA-2-13B inside"
    ),
    "lisa-13b-explanatory": CheckpointPreset(
        "xinlai/LISA-13B-llama2-v1-explanatory",
        description="LISA-13B-llama2-v1, explains its answers",
    ),
}

# other fetchable pieces (no model of their own): the CLIP tower the LISA checkpoints name
AUXILIARY_WEIGHTS: dict[str, str] = {
    "clip-vit-large-patch14": "openai/clip-vit-large-patch14",
}
