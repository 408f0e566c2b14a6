"""Builders: ModelConfig -> the parts SegLLM is assembled from.

Hyperparameters live here and in `segapp.config`; the modules themselves take built parts.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from segapp.config import ModelConfig

# segment_anything's published encoder sizes: (embed_dim, depth, heads, global_attn_indexes)
SAM_VIT_SIZES: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


class ConvStem(nn.Module):
    """A convolutional stem in place of CLIP's patch embedding, with the same B x C x g x g
    output: stride-2 3 x 3 convolutions (GroupNorm + GELU between them) down to one vector per
    patch. A from-scratch ViT whose patches are one linear map learns outlines slowly: on the
    synthetic world, in the same 150 s, the object probe told the 9 shapes apart 47% of the
    time with the patch embedding and 72% with this stem (2 cores).

    `patchify` > 1 makes the first layer a non-overlapping `patchify` x `patchify` convolution
    (the 'conv4' stem: 4 x 4, then 3 x 3 stride-2 convolutions), which skips the full-resolution
    feature maps: about a fifth of the plain stem's training time on 2 cores; the later
    overlapping convolutions still see across patch borders."""

    def __init__(self, patch: int, width: int, patchify: int = 1) -> None:
        super().__init__()
        steps = patch.bit_length() - 1
        first = patchify.bit_length() - 1  # stride-2 steps the first layer stands for
        if patch != 1 << steps or steps < 1 or patchify != 1 << first or first >= steps:
            from segapp.errors import ModelError

            raise ModelError(
                f"a conv stem needs a power-of-two patch above its first stride, not {patch}",
                "vision_patch",
            )
        convs = steps - max(first, 1) + 1  # layers in all
        inner = 3 * width // 4
        channels = [3] + [max(8, inner >> (convs - 1 - i)) for i in range(1, convs)] + [width]
        if first:
            channels[1] = max(channels[1], 8 * patchify)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(channels, channels[1:], strict=False)):
            if i == 0 and first:
                layers.append(nn.Conv2d(a, b, patchify, patchify))
            else:
                layers.append(nn.Conv2d(a, b, 3, 2, 1))
            if i < convs - 1:
                layers += [nn.GroupNorm(4, b), nn.GELU()]
        self.net = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The last convolution's weight (CLIP reads the input dtype off `.weight`)."""
        return cast(nn.Conv2d, self.net[-1]).weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def build_vision_tower(cfg: ModelConfig) -> CLIPVisionModel:
    """A CLIP ViT; its patch tokens (CLS dropped) are what the LLM sees."""
    tower = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=cfg.vision_image_size,
            patch_size=cfg.vision_patch,
            hidden_size=cfg.vision_hidden,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            intermediate_size=cfg.vision_mlp,
        )
    )
    if cfg.vision_stem in ("conv", "conv4"):
        embeddings = cast(Any, tower).embeddings
        patchify = 4 if cfg.vision_stem == "conv4" else 1
        embeddings.patch_embedding = ConvStem(cfg.vision_patch, cfg.vision_hidden, patchify)
    elif cfg.vision_stem != "patch":
        from segapp.errors import ModelError

        raise ModelError(f"unknown vision stem {cfg.vision_stem!r}", "ModelConfig.vision_stem")
    return tower


def build_projector(cfg: ModelConfig) -> nn.Module:
    """Vision width -> LLM width: LLaVA-1.5's two-layer MLP ('mlp2x_gelu', the tiny model's) or
    LLaVA-v1's single Linear ('linear', what LISA's `mm_projector` is); with projector_norm a
    LayerNorm follows, so image tokens enter the LLM at a fixed scale."""
    width = cfg.vision_hidden * cfg.vision_merge**2
    layers: list[nn.Module]
    if cfg.projector == "linear":
        layers = [nn.Linear(width, cfg.llm_hidden)]
    elif cfg.projector == "mlp2x_gelu":
        layers = [
            nn.Linear(width, cfg.llm_hidden),
            nn.GELU(),
            nn.Linear(cfg.llm_hidden, cfg.llm_hidden),
        ]
    else:
        from segapp.errors import ModelError

        raise ModelError(f"unknown projector {cfg.projector!r}", "ModelConfig.projector")
    if not cfg.projector_norm:
        return layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    return nn.Sequential(*layers, nn.LayerNorm(cfg.llm_hidden))


def _rope(cfg: ModelConfig) -> dict[str, Any]:
    """rope_theta only when it differs from LLaMA's default (transformers 5 folds it into
    rope_parameters; 4.x reads it directly: both accept the keyword)."""
    return {} if cfg.rope_theta == 10000.0 else {"rope_theta": cfg.rope_theta}


def build_llm(cfg: ModelConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.llm_hidden,
            intermediate_size=cfg.llm_mlp,
            num_hidden_layers=cfg.llm_layers,
            num_attention_heads=cfg.llm_heads,
            num_key_value_heads=cfg.llm_kv_heads or cfg.llm_heads,
            max_position_embeddings=cfg.max_positions,
            rms_norm_eps=cfg.llm_norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **_rope(cfg),
        )
    )


def build_text_hidden_fcs(cfg: ModelConfig) -> nn.Sequential:
    """LISA's [SEG] head: Linear(H, H) -> ReLU -> Linear(H, prompt_dim)."""
    return nn.Sequential(
        nn.Linear(cfg.llm_hidden, cfg.llm_hidden),
        nn.ReLU(inplace=True),
        nn.Linear(cfg.llm_hidden, cfg.prompt_dim),
    )


def build_image_pos(cfg: ModelConfig) -> nn.Linear | None:
    """Projection of SAM's patch-centre positional encoding into the LLM width (or None)."""
    if not cfg.image_pos:
        return None
    return nn.Linear(cfg.prompt_dim, cfg.llm_hidden)


def build_sam(cfg: ModelConfig) -> Sam:
    """segment_anything's own Sam, at tiny size or at a published ViT size (random init)."""
    global_idx: tuple[int, ...]
    if cfg.sam_variant == "tiny":
        dim, depth, heads = cfg.sam_encoder_dim, cfg.sam_encoder_depth, cfg.sam_encoder_heads
        img_size, patch, window, global_idx = cfg.sam_image_size, cfg.sam_patch, 0, ()
        prompt_dim, rel_pos = cfg.prompt_dim, False
    elif cfg.sam_variant in SAM_VIT_SIZES:
        dim, depth, heads, global_idx = SAM_VIT_SIZES[cfg.sam_variant]
        img_size, patch, window, prompt_dim, rel_pos = 1024, 16, 14, 256, True
    else:
        from segapp.errors import ModelError

        raise ModelError(f"unknown SAM variant {cfg.sam_variant!r}", "ModelConfig.sam_variant")
    grid = img_size // patch
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        out_chans=prompt_dim,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=rel_pos,
        window_size=window,
        global_attn_indexes=global_idx,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    tiny = cfg.sam_variant == "tiny"
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=cfg.decoder_depth if tiny else 2,
            embedding_dim=prompt_dim,
            mlp_dim=cfg.decoder_mlp if tiny else 2048,
            num_heads=cfg.sam_encoder_heads if tiny else 8,
        ),
        transformer_dim=prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=prompt_dim if tiny else 256,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_weights_(module: nn.Module, std: float = 0.02) -> None:
    """Small normal init for freshly built linear layers (the [SEG] head, projector)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = [
    "build_vision_tower",
    "build_projector",
    "build_llm",
    "build_text_hidden_fcs",
    "build_image_pos",
    "build_sam",
    "count_parameters",
    "init_weights_",
]
