"""SegLLM: a multimodal causal LM whose `[SEG]` hidden states prompt SAM's mask decoder.

Data flow (shapes for B images, Q sequences, M `[SEG]` tokens):
  vision pixels B x 3 x V x V -> vision tower -> projector -> B x N x H image tokens
  (+ optionally image_pos: SAM's own Fourier encoding of each patch centre, projected to H,
  so the LLM can point at a location in the very coordinates SAM's prompts use)
  input ids Q x L with N `<image>` slots each -> token embeddings with image tokens spliced in
  -> causal LM -> last-layer hidden states Q x L x H
  hidden state that predicts each `[SEG]` (LISA's convention) -> text_hidden_fcs -> M x D
  (+ with a pointer: SAM's point token at the image patch each [SEG] points at -> M x 2 x D)
  SAM pixels B x 3 x S x S -> SAM image encoder -> B x D x h x w (cached per image)
  each prompt -> segment_anything's MaskDecoder as sparse_prompt_embeddings M x K x D,
  dense prompt = no_mask_embed -> M x 1 x 4h x 4w mask logits (+ an IoU score each).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from segment_anything.modeling import Sam
from torch import nn
from transformers import PreTrainedModel

from segapp.modeling.generation import Generation, first_tokens, generate_batch
from segapp.modeling.pointer import SegPointer


class SegLLM(nn.Module):
    def __init__(
        self,
        *,
        vision_tower: nn.Module,
        projector: nn.Module,
        llm: PreTrainedModel,
        text_hidden_fcs: nn.Module,
        sam: Sam,
        image_pos: nn.Module | None = None,
        seg_pointer: SegPointer | None = None,
        video_seg_pointer: SegPointer | None = None,
        video_motion: nn.Module | None = None,
        video_presence: float = 0.0,
        target_head: nn.Module | None = None,
        target_threshold: float = 0.7,
        image_token_id: int,
        seg_token_id: int,
        eos_token_id: int,
        vision_select_layer: int = -1,
        vision_merge: int = 1,
        prefix_attention: bool = False,
        no_target_ids: tuple[int, ...] = (),
        no_target_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.text_hidden_fcs = text_hidden_fcs
        self.sam = sam
        self.image_pos = image_pos
        self.seg_pointer = seg_pointer
        self.video_seg_pointer = video_seg_pointer  # None: video uses seg_pointer
        # video token deviation from its patch's mean over the frames -> added to the token
        self.video_motion = video_motion
        self.video_presence = video_presence  # > 0: the video pointer says per frame
        # image token hidden state -> logit that the token lies on what the instruction asks
        # for; a multi-target answer adds the objects it marks (segapp/targets.py)
        self.target_head = target_head
        self.target_threshold = target_threshold
        self.image_token_id = image_token_id
        self.seg_token_id = seg_token_id
        self.eos_token_id = eos_token_id
        self.vision_merge = vision_merge
        self.prefix_attention = prefix_attention  # prompt bidirectional, answer causal
        self.vision_select_layer = vision_select_layer  # LLaVA takes the second-to-last layer
        # first tokens of the answers that say nothing matches, and the probability they need
        # together to open the answer (`first_tokens`)
        self.no_target_ids = no_target_ids
        self.no_target_threshold = no_target_threshold

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    def first_tokens(self, logits: torch.Tensor) -> list[int]:
        """The first answer token of each row (`generation.first_tokens`)."""
        return first_tokens(self, logits)

    @property
    def video_pointer(self) -> SegPointer | None:
        """The pointer video uses: its own if the model has one, else the image pointer."""
        return self.video_seg_pointer or self.seg_pointer

    def add_motion(self, dense: torch.Tensor) -> torch.Tensor:
        """T x N x H video tokens (frame t, patch n) -> the same plus their motion: a learnt
        linear map of each token's deviation from its patch's mean over the T frames (zero
        where nothing changed). Unchanged without a motion map or with one frame."""
        if self.video_motion is None or dense.shape[0] < 2:
            return dense
        return dense + self.video_motion(dense - dense.mean(0, keepdim=True))

    # ---- encoders (expensive, cached by the predictor) -------------------------------------
    def encode_vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x V x V (CLIP-normalised) -> B x N x H projected patch tokens (CLS dropped)."""
        dtype = next(self.projector.parameters()).dtype
        if self.vision_select_layer == -1:
            feats = self.vision_tower(pixel_values=pixels.to(dtype)).last_hidden_state[:, 1:]
        else:
            out = self.vision_tower(pixel_values=pixels.to(dtype), output_hidden_states=True)
            feats = out.hidden_states[self.vision_select_layer][:, 1:]
        return self.project(feats, pixels.shape[-1])

    def project(self, feats: torch.Tensor, vision_size: int) -> torch.Tensor:
        """B x N x C vision features -> B x N' x H LLM tokens (+ patch-centre positions).

        With vision_merge k > 1, each k x k block of patches becomes one token whose input is
        the block's features concatenated (N' = N / k^2), before the projector.
        """
        k = self.vision_merge
        if k > 1:
            b, n, c = feats.shape
            g = int(round(n**0.5))
            feats = feats.reshape(b, g // k, k, g // k, k, c).permute(0, 1, 3, 2, 4, 5)
            feats = feats.reshape(b, (g // k) ** 2, k * k * c)
        tokens = self.projector(feats)
        if self.image_pos is not None:
            tokens = tokens + self.image_pos(
                self.patch_position_encoding(feats.shape[1], vision_size)
            )
        return tokens

    def patch_centres(self, n_patches: int, vision_size: int) -> torch.Tensor:
        """N x 2 (x, y): each vision patch centre in SAM input pixels.

        Both encoders see the image resized longest-side and padded bottom/right, so a vision
        pixel maps to SAM's frame by one scale factor.
        """
        grid = int(round(n_patches**0.5))
        scale = self.sam.prompt_encoder.input_image_size[0] / vision_size
        step = vision_size / grid
        centres = (torch.arange(grid, device=self.device, dtype=torch.float32) + 0.5) * step * scale
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        return torch.stack([xs.flatten(), ys.flatten()], -1)

    def patch_position_encoding(self, n_patches: int, vision_size: int) -> torch.Tensor:
        """N x D: SAM's positional encoding of each vision patch centre in the SAM input frame."""
        pe = self.sam.prompt_encoder
        coords = self.patch_centres(n_patches, vision_size)[None]
        dtype = next(self.image_pos.parameters()).dtype if self.image_pos is not None else None
        return pe.pe_layer.forward_with_coords(coords, pe.input_image_size)[0].to(dtype)

    @property
    def vision_size(self) -> int:
        """Square input size of the vision tower, pixels."""
        return int(cast(Any, self.vision_tower).config.image_size)

    @property
    def image_grid_tokens(self) -> int:
        """Image tokens per image the LLM sees (before any token reduction)."""
        patch = int(cast(Any, self.vision_tower).config.patch_size)
        return (self.vision_size // patch // self.vision_merge) ** 2

    def encode_sam(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S (SAM-normalised, padded) -> B x D x h x w image embedding."""
        dtype = self.sam.image_encoder.patch_embed.proj.weight.dtype
        return self.sam.image_encoder(pixels.to(dtype))

    # ---- LLM -------------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings with image tokens spliced in at the `<image>` slots.

        input_ids: Q x L, holding exactly N image-token slots per row; image_tokens: Q x N x H.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        if n_slots != image_tokens.shape[0] * image_tokens.shape[1]:
            raise ValueError(
                f"{n_slots} image slots in the input ids but {image_tokens.shape[0]} x "
                f"{image_tokens.shape[1]} image tokens"
            )
        embeds = embeds.clone()
        embeds[slots] = image_tokens.reshape(-1, image_tokens.shape[-1]).to(embeds.dtype)
        return embeds

    def seg_prompts(
        self,
        hidden: torch.Tensor,
        image_hidden: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        *,
        choice: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M x H `[SEG]` hidden states -> M x K x D sparse prompt tokens for SAM.

        K = 1 (text_hidden_fcs) without a pointer or without `image_hidden` (M x N' x H or
        N' x H: last-layer hidden states of the image tokens the LLM kept; `image_index`: their
        patch numbers, default 0..N'-1). With both, K = 2: the second token is SAM's
        positive-point token at the centre of the patch each `[SEG]` points at (`choice`: M
        token positions to use instead of the pointer's argmax, for training).
        """
        prompts = self.text_hidden_fcs(hidden)[:, None, :]
        if self.seg_pointer is None or image_hidden is None:
            return prompts
        if choice is None:
            choice = self.seg_pointer.scores(hidden, image_hidden).argmax(-1)
        patch = choice if image_index is None else image_index.to(choice.device)[choice]
        points = self.patch_centres(self.image_grid_tokens, self.vision_size)[patch]
        return torch.cat([prompts, self.point_token(points).to(prompts.dtype)], 1)

    def without_point(self, prompts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`prompts` (M x K x D) with the point token of the `rows` (M bool) replaced by SAM's
        not-a-point embedding: a group `[SEG]` (the union of several targets) must not be
        pulled to the one object its pointer points at."""
        if prompts.shape[1] < 2:
            return prompts
        blank = self.sam.prompt_encoder.not_a_point_embed.weight[0].to(prompts.dtype)
        point = torch.where(rows[:, None], blank, prompts[:, 1])
        return torch.cat([prompts[:, :1], point[:, None], prompts[:, 2:]], 1)

    def generation_prompts(self, gen: Generation) -> torch.Tensor:
        """`seg_prompts` for a finished generation (M x K x D; M = 0 without `[SEG]`)."""
        if not len(gen.seg_hidden):
            width = self.sam.prompt_encoder.embed_dim
            return gen.seg_hidden.new_zeros(0, 1, width)
        return self.seg_prompts(gen.seg_hidden, gen.image_hidden, gen.image_index)

    def lm_attention_mask(
        self,
        prompt_len: torch.Tensor,
        length: int,
        padding: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """The `attention_mask` to hand the causal LM for Q rows of `length` tokens.

        prompt_len: Q prompt lengths (everything before the answer); padding: Q x L (1 = real
        token) or None. A causal model gets `padding` back unchanged (transformers adds the
        causal part). With `prefix_attention`, a Q x 1 x L x L additive mask where query i may
        read key j if j <= i, or if both are in the prompt (a prefix LM), and j is no padding.
        Generation prefills with the whole prompt, so there every position reads every other.
        """
        if not self.prefix_attention:
            return padding
        device = prompt_len.device
        pos = torch.arange(length, device=device)
        causal = pos[None, :] <= pos[:, None]  # L x L: query row, key column
        in_prompt = pos[None, :] < prompt_len[:, None]  # Q x L
        allowed = causal[None] | (in_prompt[:, :, None] & in_prompt[:, None, :])
        if padding is not None:
            allowed = allowed & padding.to(device=device, dtype=torch.bool)[:, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def prefill_attention_mask(self, embeds: torch.Tensor) -> torch.Tensor | None:
        """`lm_attention_mask` for prefilling whole prompts (embeds Q x L x H, no padding)."""
        rows, length = embeds.shape[:2]
        prompt_len = torch.full((rows,), length, device=embeds.device)
        return self.lm_attention_mask(prompt_len, length, None, embeds.dtype)

    @staticmethod
    def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
        """Q: tokens before each row's first labelled (answer) position; -100 marks no label."""
        labelled = labels != -100
        first = labelled.int().argmax(1)
        return torch.where(labelled.any(1), first, labels.shape[1])

    @staticmethod
    def seg_source_mask(input_ids: torch.Tensor, seg_token_id: int) -> torch.Tensor:
        """Q x L bool: positions whose next token is `[SEG]` (their hidden state predicts it)."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        mask[:, :-1] = input_ids[:, 1:] == seg_token_id
        return mask

    # ---- SAM decoder -----------------------------------------------------------------------
    def decode_masks(
        self,
        image_embedding: torch.Tensor,
        sparse: torch.Tensor,
        image_of: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for the prompts of one image, or of several images in one decoder call.

        image_embedding: 1 x D x h x w (or B x D x h x w with `image_of`); sparse: M x K x D
        prompt tokens (K = 1 for [SEG]); image_of: M indices into the B images (None: all
        prompts are on the one image).
        Returns low-res logits M x 1 x 4h x 4w and predicted IoU M x 1.
        """
        pe = self.sam.prompt_encoder
        dtype = image_embedding.dtype
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *pe.image_embedding_size)
        dense = dense.to(dtype)
        if image_of is not None:
            # SAM's decoder pairs one image with all its prompts (it repeats the embedding per
            # prompt and adds the dense prompt). Handing it a zero image and each prompt's own
            # embedding as the dense prompt gives exactly the same sums, so prompts on
            # different images run in one batched call (the per-image loop was ~1700 small
            # matmuls of a training step).
            dense = image_embedding[image_of] + dense
            image_embedding = image_embedding.new_zeros(1, *image_embedding.shape[1:])
        return self.sam.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=pe.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    def point_token(self, points: torch.Tensor) -> torch.Tensor:
        """M x 2 (x, y) positive points in SAM input pixels -> M x 1 x D prompt tokens.

        The same embedding SAM's prompt encoder gives a positive point (pixel-centre shift,
        Fourier positional encoding + the positive-label embedding), without the padding point,
        so a point prompt has the shape of a `[SEG]` prompt.
        """
        pe = self.sam.prompt_encoder
        coords = (points + 0.5)[:, None, :]
        emb = pe.pe_layer.forward_with_coords(coords, pe.input_image_size)
        return emb + pe.point_embeddings[1].weight

    # ---- generation ------------------------------------------------------------------------
    def generate(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        *,
        max_new_tokens: int = 48,
        no_target: bool = True,
    ) -> Generation:
        """Greedy decoding with a KV cache for one sequence (input_ids 1 x L, image 1 x N x H).

        Keeps the last-layer hidden state of every step that emits `[SEG]`. `no_target=False`
        takes the first token greedily too (`first_tokens` otherwise).
        """
        return self.generate_batch(
            input_ids, image_tokens, max_new_tokens=max_new_tokens, no_target=no_target
        )[0]

    def generate_batch(
        self,
        input_ids: torch.Tensor,
        image_tokens: torch.Tensor,
        *,
        max_new_tokens: int,
        no_target: bool = True,
    ) -> list[Generation]:
        """Greedy decoding of B equal-length prompts at once (`generation.generate_batch`)."""
        return generate_batch(
            self, input_ids, image_tokens, max_new_tokens=max_new_tokens, no_target=no_target
        )
