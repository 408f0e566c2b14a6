"""fit_concept: a user's 1-5 shots -> a stored concept (peft LoRA adapter or PerSAM feature).

LoRA fitting works on a private copy of the model (the served one is never touched): the
shots are pasted into synthetic scenes (scale, flip, rotation, colour jitter) with hard
negatives (hue-shifted copies, other objects repainted with the shot's pixels) and scenes
without the object as negatives; the
frozen encoders run once over this pool; then the LLM's LoRA, the concept-token row, the
[SEG] head's and the mask decoder's LoRA train on templated instructions with LISA's loss
(text CE + BCE + Dice) plus the point-prompt anchor of base training. Last, the concept
verifier (verify.py) is fitted on SAM's candidate masks over part of the same pool.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segapp.build import Bundle
from segapp.config import _f
from segapp.data.batches import pad_rows
from segapp.errors import InputError
from segapp.modeling.losses import bce_loss, dice_loss, lm_loss, mask_iou
from segapp.modeling.pointer import SegPointer
from segapp.modeling.segllm import SegLLM
from segapp.personalize.adapters import (
    base_copy,
    concept_prompt_ids,
    concept_slot,
    new_training_adapter,
    trainable_parameters,
)
from segapp.personalize.pool import Pool, build_pool, fit_pool_verifier
from segapp.personalize.store import (
    METHODS,
    ConceptInfo,
    ConceptStore,
    shot_hash,
    validate_slug,
)
from segapp.scheduler import Progress
from segapp.tokenizer import SEG_TOKEN
from segapp.train_losses import pointer_choice

MAX_SHOTS = 5
INSTRUCTIONS = (
    "segment {c}",
    "segment {c}.",
    "where is {c}?",
    "find {c} in the image.",
    "can you segment {c}?",
    "please segment {c}.",
    "show me {c}.",
    "{c}",
    "what is {c} in this image? please output the mask.",
)
POSITIVE = f"Sure, {SEG_TOKEN}."
NEGATIVE = "Sorry, I cannot find it."


@dataclass(frozen=True)
class FitConfig:
    """Schedule of one LoRA concept fit (defaults: a 5-shot tiny-model fit, verifier included,
    in < 60 s on 2 cores)."""

    steps: int = _f(200, "optimisation steps")
    positives: int = _f(120, "augmented scenes holding the object (the shots themselves added)")
    negatives: int = _f(80, "augmented scenes without it (half with hue-shifted look-alikes)")
    batch: int = _f(8, "conversations per step")
    lr: float = _f(1e-2, "peak AdamW learning rate (linear warm-up, cosine decay)")
    rank: int = _f(8, "LoRA rank")
    decoder: bool = _f(True, "also a LoRA on the mask decoder's token-to-image attention")
    mlp: bool = _f(False, "also a LoRA on the LLM's MLP projections")
    pointer_weight: float = _f(
        1.0, "weight of a fit-only head pointing each [SEG] at its target's image tokens"
    )
    verifier_scenes: int = _f(
        72, "augmented scenes the concept verifier is fitted on (0: no verifier)"
    )
    seed: int = _f(0, "augmentation and sampling seed")
    color_init: bool = _f(
        True, "start the concept token at the embedding of the shots' nearest colour word"
    )


def check_shots(images: Sequence[Any], masks: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validated (H x W x 3 uint8, H x W bool) pairs; InputError naming the bad shot."""
    if len(images) != len(masks):
        raise InputError(f"{len(images)} images but {len(masks)} masks", "--masks")
    if not 1 <= len(images) <= MAX_SHOTS:
        raise InputError(f"give 1 to {MAX_SHOTS} shots, got {len(images)}", "--images")
    shots = []
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        where = f"shot {i + 1}"
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise InputError(f"image must be H x W x 3 uint8, got {img.shape} {img.dtype}", where)
        m = np.asarray(mask)
        if m.ndim == 3 and m.shape[2] in (1, 3, 4) and (m == m[..., :1]).all():
            m = m[..., 0]  # a grey PNG read as RGB(A)
        if m.ndim != 2:
            raise InputError(f"mask must be a 2-D H x W array, got shape {m.shape}", where)
        values = np.unique(m)
        if m.dtype != np.bool_ and not set(values.tolist()) <= {0, 1, 255}:
            raise InputError(
                f"not a mask: expected two values (0 and 1 or 255), found {len(values)}", where
            )
        if m.shape != img.shape[:2]:
            raise InputError(
                f"mask is {m.shape[1]}x{m.shape[0]} but its image is {img.shape[1]}x{img.shape[0]}",
                where,
            )
        m = m.astype(bool)
        if not m.any():
            raise InputError("mask is empty: it must cover the object", where)
        shots.append((np.ascontiguousarray(img), m))
    return shots


def _rows(
    bundle: Bundle, name: str, positive: list[bool], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (answer only) for one step."""
    rows = []
    for pos in positive:
        template = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))]
        prompt = concept_prompt_ids(bundle, template.format(c=f"<{name}>"), name)
        rows.append((prompt, bundle.chat.answer_ids(POSITIVE if pos else NEGATIVE)))
    return pad_rows(bundle.chat, rows)


def _step_losses(
    model: SegLLM,
    bundle: Bundle,
    pool: Pool,
    pick: torch.Tensor,
    name: str,
    rng: np.random.Generator,
    pointer: SegPointer | None,
    pointer_weight: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    positive = pool.positive[pick].tolist()
    ids, attn, labels = (t.to(model.device) for t in _rows(bundle, name, positive, rng))
    embeds = model.embed_inputs(ids, pool.tokens[pick])
    mask = model.lm_attention_mask(
        SegLLM.prompt_lengths(labels), embeds.shape[1], attn, embeds.dtype
    )
    ce, last = lm_loss(model.llm, labels, inputs_embeds=embeds, attention_mask=mask)
    terms = {"ce": ce}
    src = SegLLM.seg_source_mask(ids, model.seg_token_id)
    hidden = last[src]  # one [SEG] per positive row, in row order
    rows = pick[pool.positive[pick]]
    if hidden.shape[0] != rows.shape[0]:
        raise RuntimeError(f"{hidden.shape[0]} [SEG] tokens for {rows.shape[0]} positives")
    if rows.numel():
        slots = ids == model.image_token_id
        image_hidden = last[slots].reshape(last.shape[0], -1, last.shape[-1])
        image_hidden = image_hidden[pool.positive[pick].nonzero()[:, 0]]
        if pointer is not None:
            scores = pointer.scores(hidden, image_hidden)
            terms["pointer"] = SegPointer.loss(scores, pool.cover[rows])
        if model.seg_pointer is not None:  # the model's own pointer adds SAM's point token
            assert pointer is not None
            choice = pointer_choice(scores, pool.cover[rows], 0.5, generator)
            prompts = model.seg_prompts(hidden, image_hidden, choice=choice)
        else:
            prompts = model.seg_prompts(hidden)
        size = model.sam.image_encoder.img_size
        logits, ious = [], []
        for j, r in enumerate(rows.tolist()):
            low, iou = model.decode_masks(pool.sam[r : r + 1], prompts[j : j + 1])
            logits.append(F.interpolate(low, (size, size), mode="bilinear", align_corners=False))
            ious.append(iou[:, 0])
        lg, target = torch.cat(logits)[:, 0], pool.masks[rows]
        terms["bce"], terms["dice"] = bce_loss(lg, target), dice_loss(lg, target)
        terms["anchor"] = F.mse_loss(
            prompts[:, 0], model.point_token(pool.points[rows])[:, 0].detach()
        )
        terms["iou"] = mask_iou(lg.detach(), target).mean()
    zero = terms["ce"] * 0
    terms["total"] = (
        terms["ce"]
        + 2.0 * terms.get("bce", zero)
        + 0.5 * terms.get("dice", zero)
        + 1.0 * terms.get("anchor", zero)
        + pointer_weight * terms.get("pointer", zero)
    )
    return terms


@torch.enable_grad()  # callers may run under no_grad (a server thread, a script)
def fit_lora(
    bundle: Bundle,
    name: str,
    shots: list[tuple[np.ndarray, np.ndarray]],
    fc: FitConfig,
    progress: Progress,
    out: Path,
) -> dict[str, float]:
    """Train an adapter on a private copy of the model and save it into ``out``."""
    slot = concept_slot(bundle)
    model = base_copy(bundle.model)  # the served model (maybe with adapters) stays as is
    peft = _plain(model, slot, fc)
    if fc.color_init:
        _init_concept_row(model, bundle, shots)
    progress(0.02, "making training scenes")
    pool = build_pool(
        model, bundle, shots, positives=fc.positives, negatives=fc.negatives, seed=fc.seed
    )
    # the model's own [SEG] pointer stays frozen (the LoRA learns to aim it); a model without
    # one gets a fit-only pointer, for the "which object" signal
    pointer = model.seg_pointer
    if pointer is None and fc.pointer_weight:
        pointer = SegPointer(bundle.config.llm_hidden, 64).to(model.device)
    own = pointer is model.seg_pointer
    if own and pointer is not None:
        pointer.requires_grad_(False)  # the private copy's pointer: no gradients to compute
    params = trainable_parameters(peft) + (
        list(pointer.parameters()) if pointer and not own else []
    )
    opt = torch.optim.AdamW(params, lr=fc.lr, weight_decay=0.0)
    rng = np.random.default_rng([29, fc.seed])
    gen = torch.Generator().manual_seed(fc.seed)
    n_shots = len(shots)
    warm = max(1, fc.steps // 10)
    recent: list[float] = []
    model.train()
    for step in range(fc.steps):
        lr = fc.lr * min(1.0, (step + 1) / warm)
        if step >= warm:
            lr = fc.lr * (
                0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * (step - warm) / (fc.steps - warm)))
            )
        for g in opt.param_groups:
            g["lr"] = lr
        pick = torch.randint(len(pool.positive), (fc.batch,), generator=gen)
        pick[0] = step % n_shots  # every step sees a real shot
        terms = _step_losses(
            model, bundle, pool, pick.to(model.device), name, rng, pointer, fc.pointer_weight, gen
        )
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if "iou" in terms:
            recent = [*recent[-19:], float(terms["iou"])]
        if step % 10 == 0 or step == fc.steps - 1:
            progress(0.1 + 0.85 * (step + 1) / fc.steps, f"step {step + 1}/{fc.steps}")
    model.eval()
    peft.save_pretrained(str(out))
    metrics = {"train_iou": round(float(np.mean(recent)) if recent else 0.0, 4)}
    if fc.verifier_scenes:
        progress(0.96, "fitting the concept verifier")
        verifier = fit_pool_verifier(model, pool, fc.verifier_scenes)
        verifier.save(out)
        metrics["verifier_threshold"] = round(verifier.threshold, 4)
    return metrics


@torch.no_grad()
def _init_concept_row(
    model: SegLLM, bundle: Bundle, shots: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    """Start ``<name>`` where the base model already grounds something: the word of the world
    colour nearest to the shots' median object colour (a data-driven init, not a label)."""
    from segapp.data.world import COLORS

    rgb = np.median(np.concatenate([img[m] for img, m in shots]).astype(np.float32), axis=0)
    word = min(COLORS, key=lambda c: float(np.sum((np.asarray(COLORS[c]) - rgb) ** 2)))
    ids = bundle.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    wrapper: Any = model.llm.get_input_embeddings()  # peft's TrainableTokensWrapper
    base = wrapper.token_adapter.base_layer.weight
    delta = wrapper.token_adapter.trainable_tokens_delta["default"]
    delta.copy_(base[ids].mean(0, keepdim=True))  # peft stores the row itself, not a delta


def _plain(model: SegLLM, slot: int, fc: FitConfig):
    """A private copy may already carry served adapters (deep-copied): fit on clean weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise RuntimeError("fit_concept needs a base model without adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    return new_training_adapter(model, slot, rank=fc.rank, decoder=fc.decoder, mlp=fc.mlp)


def fit_concept(
    bundle: Bundle,
    store: ConceptStore,
    user: str,
    name: str,
    images: Sequence[Any],
    masks: Sequence[Any],
    *,
    steps: int | None = None,
    method: str = "lora",
    progress: Progress | None = None,
    config: FitConfig | None = None,
) -> ConceptInfo:
    """Fit concept ``<name>`` for ``user`` from 1-5 shots and store it (replacing an older one).

    images: H x W x 3 uint8 arrays; masks: H x W bool arrays of the same sizes, not empty.
    progress(fraction 0..1, message) is called along the way. Returns the stored ConceptInfo.
    """
    validate_slug(user, "user")
    validate_slug(name, "name")
    from segapp.personalize.adapters import RESERVED

    if name in RESERVED:
        raise InputError(f"{name!r} is reserved, choose another concept name", "--name")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}", "--method")
    shots = check_shots(images, masks)
    fc = config or FitConfig()
    if steps is not None:
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}", "--steps")
        fc = FitConfig(**{**fc.__dict__, "steps": steps})
    report = progress or (lambda fraction, message: None)
    t0 = time.perf_counter()
    info = ConceptInfo(
        user=user,
        name=name,
        method=method,
        shots=len(shots),
        shot_hashes=[shot_hash(i, m) for i, m in shots],
        base_model=bundle.source,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        steps=fc.steps if method == "lora" else 0,
    )
    holder: dict[str, dict[str, float]] = {}

    def write(directory: Path) -> None:
        if method == "lora":
            # seeded: peft draws the adapter's initial weights from torch's global generator,
            # forked here so the same shots give the same adapter whatever ran before, and
            # the caller's generator is left as it was
            cuda = [bundle.model.device] if bundle.model.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(fc.seed)
                holder["m"] = fit_lora(bundle, name, shots, fc, report, directory)
        else:
            from segapp.personalize.persam import fit_persam

            holder["m"] = fit_persam(bundle, shots, directory)
        info.fit_seconds = round(time.perf_counter() - t0, 2)
        info.metrics = holder["m"]

    stored = store.save(info, write)
    report(1.0, f"saved <{name}> for {user}")
    return stored
