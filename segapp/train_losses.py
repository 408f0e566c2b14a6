"""Loss terms of one training step (base training; `pointer_choice` is shared with concept
fitting): SAM's point-prompt terms, LISA's text + mask terms, the `[SEG]` pointer, and the
training-only heads that are not saved with the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from segapp.config import ModelConfig, TrainConfig
from segapp.data.batches import ATTRIBUTES, RELATIONS, TrainBatch
from segapp.modeling.losses import bce_loss, dice_loss, lm_loss, mask_iou
from segapp.modeling.pointer import SegPointer
from segapp.modeling.segllm import SegLLM


def mask_terms(
    logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, tcfg: TrainConfig
) -> dict[str, torch.Tensor]:
    """logits M x S x S (upsampled to the SAM frame), iou_pred M, targets M x S x S."""
    actual = mask_iou(logits.detach(), targets)
    return {
        "bce": bce_loss(logits, targets),
        "dice": dice_loss(logits, targets),
        "iou": F.mse_loss(iou_pred.float(), actual),
    }


def decode_per_image(
    model: SegLLM, emb: torch.Tensor, sparse: torch.Tensor, image_of: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode each prompt on its own image (one batched decoder call for all of them).

    Returns logits M x S x S in the padded SAM frame and IoU predictions M, in input order,
    in float32 (the mask losses are taken in full precision).
    """
    size = model.sam.image_encoder.img_size
    low, iou = model.decode_masks(emb, sparse, image_of)
    logits = F.interpolate(low.float(), (size, size), mode="bilinear", align_corners=False)
    return logits[:, 0], iou[:, 0].float()


class ObjectProbe(torch.nn.Module):
    """Training-only linear heads reading colour/shape/size/texture off each object's patches
    (or, given `classes=RELATIONS`, how the object relates to the rest of its scene).

    Each object's feature is the mean of the vision patch tokens weighted by how much of each
    patch it covers, so the tower learns to describe whole objects (a shape is a property of
    the outline, not of one interior patch). A cheap, dense signal that teaches the
    from-scratch tower what the LLM will talk about; it is not part of the saved model.
    """

    def __init__(self, width: int, classes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        classes = classes or tuple(len(names) for names in ATTRIBUTES)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in classes)

    def forward(
        self, feats: torch.Tensor, cover: torch.Tensor, attrs: torch.Tensor
    ) -> torch.Tensor:
        """feats B x N x C, cover B x K x N, attrs B x K x A labels, one per head (-100 =
        padding) -> mean CE."""
        weights = cover / cover.sum(-1, keepdim=True).clamp_min(1e-6)
        pooled = torch.einsum("bkn,bnc->bkc", weights, feats)
        return self._heads_loss(pooled.flatten(0, 1), attrs.flatten(0, 1))

    def _heads_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """feats M x C, labels M x A -> mean over the heads of each head's CE."""
        losses = [
            F.cross_entropy(h(feats), labels[:, a])
            for a, h in enumerate(self.heads)
            if bool((labels[:, a] >= 0).any())  # an unlabelled attribute has no loss
        ]
        return torch.stack(losses).mean()

    def dense_loss(
        self, feats: torch.Tensor, cover: torch.Tensor, attrs: torch.Tensor
    ) -> torch.Tensor:
        """The same heads read each token on its own: feats B x N x C, cover B x K x N, attrs
        B x K x A -> mean CE over the tokens one object covers by half or more.

        Why: pooled over an object, its shape may be carried by the outline patches alone.
        The bundled tower's tokens named their object's shape 45% of the time one by one
        against 76% pooled (linear read-out), and "the square" failed where "the red
        shape" worked (referring gIoU 0.39 against 0.87): the LLM matches the instruction
        token by token, and its causal attention cannot gather an object from later tokens.
        """
        best = cover.max(1)  # B x N: the most-covering object of each token
        chosen = best.values >= 0.5
        labels = torch.gather(attrs, 1, best.indices[..., None].expand(-1, -1, attrs.shape[-1]))
        feats, labels = feats[chosen], labels[chosen]
        if not len(feats):
            return feats.sum() * 0.0
        return self._heads_loss(feats, labels)


class AuxHeads(torch.nn.Module):
    """The training-only heads (not saved with the model). A model without a `[SEG]` pointer of
    its own still learns to point, through a training-only one: a crisp "which object" signal
    long before the mask loss gives one."""

    def __init__(
        self, cfg: ModelConfig, *, token_probe: bool = False, relation_probe: bool = False
    ) -> None:
        super().__init__()
        self.probe = ObjectProbe(cfg.vision_hidden)
        self.pointer = SegPointer(cfg.llm_hidden, 64)
        self.target = torch.nn.Linear(cfg.llm_hidden, 1)  # see target_loss
        # built only when used, so runs without them draw the same random numbers as before
        self.token_probe = ObjectProbe(cfg.llm_hidden) if token_probe else None
        self.relation: ObjectProbe | None = None  # see relation_loss
        self.token_relation: ObjectProbe | None = None
        if relation_probe:
            self.relation = ObjectProbe(cfg.vision_hidden, RELATIONS)
            self.token_relation = ObjectProbe(cfg.llm_hidden, RELATIONS)


def merged_cover(cover: torch.Tensor, merge: int) -> torch.Tensor:
    """B x K x N per-patch object cover -> B x K x N / merge^2 per image token (the mean over
    each merge x merge block of patches, as the projector merges them)."""
    if merge == 1:
        return cover
    b, k, n = cover.shape
    g = int(round(n**0.5))
    blocks = cover.reshape(b, k, g // merge, merge, g // merge, merge)
    return blocks.mean((3, 5)).reshape(b, k, -1)


def token_probe_loss(
    aux: AuxHeads,
    tokens: torch.Tensor,
    cover: torch.Tensor,
    batch: TrainBatch,
    *,
    dense: bool = False,
) -> torch.Tensor:
    """The object probe read off the image tokens the LLM is given (B x N' x H).

    Why: in weights trained without it, the vision tower's merged features named an object's
    colour 99.6% of the time (linear read-out, training scenes), but after the projector only
    56%: nothing asked the projector to keep what instructions talk about, so the LLM could
    not match "the red shape" to red tokens (pointer on target 30% for referring
    instructions). The bundled recipe trains with it (pointer on target 63%).
    cover: B x K x N' object cover of those tokens (`merged_cover`). `dense`: the same heads
    read each token on its own (`ObjectProbe.dense_loss`).
    """
    if aux.token_probe is None:
        raise ValueError("AuxHeads was built without token_probe=True")
    if dense:
        return aux.token_probe.dense_loss(tokens, cover, batch.object_attrs)
    return aux.token_probe(tokens, cover, batch.object_attrs)


def relation_loss(
    probe: ObjectProbe | None, feats: torch.Tensor, cover: torch.Tensor, batch: TrainBatch
) -> torch.Tensor:
    """The relation probe: each object's pooled tokens (vision patches, or the LLM's image
    tokens with `cover` merged to them) say how many objects share its colour / shape / size
    / texture / colour and shape, and whether it is the largest or smallest of its group.

    Why: the bundled weights answer "all the circles" with two masks whatever the count
    (multi count 76.3%, the share of two-target queries) and score gIoU 0.30 on "the colour
    that appears only once". Under causal attention an image token cannot see the objects
    after it, but the vision tower attends across the whole scene, so it can be asked to
    carry these relations on each object, where the `[SEG]` pointer and the answer read.
    """
    if probe is None:
        raise ValueError("AuxHeads was built without relation_probe=True")
    return probe(feats, cover, batch.object_relations)


def target_loss(
    head: torch.nn.Module, image_hidden: torch.Tensor, batch: TrainBatch, *, marks: str = "half"
) -> torch.Tensor:
    """BCE of the target head saying, for every image token of every query, whether the
    token lies on one of the query's targets (all tokens are negatives for a no-target
    query). Unlike the pointer's softmax, which only ranks tokens, this asks for an absolute
    "this matches the instruction", which the answer's first token needs to say there is none.

    image_hidden: Q x N x H last-layer hidden states of the image tokens. `marks`: which
    tokens are positives: "half", those the targets cover by half or more; "every", also each
    target's most-covered token, so a target too small to cover any token by half is marked
    too (the predictor adds the objects the head marks to a multi-target answer, and with
    "half" it never marked those), and the other tokens a target partly covers are left out.
    """
    cover = image_hidden.new_zeros(image_hidden.shape[:2])
    if len(batch.seg_query):
        cover = cover.index_add(0, batch.seg_query, batch.seg_cover.to(cover.dtype))
    if marks == "half":
        return target_bce(head, image_hidden, cover)
    if marks != "every":
        raise ValueError(f"unknown target marks {marks!r}; expected 'half' or 'every'")
    positive = cover >= 0.5
    if len(batch.seg_query):
        best = batch.seg_cover.argmax(-1)
        covered = batch.seg_cover.amax(-1) > 0
        positive[batch.seg_query[covered], best[covered]] = True
    weight = (positive | (cover <= 0)).to(cover.dtype)
    logits = head(image_hidden)[..., 0]
    loss = F.binary_cross_entropy_with_logits(logits, positive.to(logits.dtype), reduction="none")
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def target_bce(
    head: torch.nn.Module, image_hidden: torch.Tensor, cover: torch.Tensor
) -> torch.Tensor:
    """The target head's BCE: image tokens (... x H) whose target cover (...) is half or more
    are positives (`target_loss` for image batches, `video_losses` for clips)."""
    logits = head(image_hidden)[..., 0]
    return F.binary_cross_entropy_with_logits(logits, (cover >= 0.5).to(logits.dtype))


# the five orderings of R, G, B other than the identity
_SWAPS = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def swapped_probe_loss(
    model: SegLLM,
    aux: AuxHeads,
    batch: TrainBatch,
    tcfg: TrainConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The object probe on copies of the first scenes with their colour channels reordered
    (red paints as green or blue...), shape / size / texture labels kept, colour unlabelled.

    Why: the test split holds out colour-shape pairs (no green triangle in training). Trained
    on the scenes as they are, the probe read shape 71% right on training scenes and 51% on
    held-out ones: the tower learnt shape per colour. Reordered channels make shape the same
    feature under any colour (held-out shape accuracy 0.51 -> 0.57 with the conv stem, in a
    vision-only run of 150 s).
    """
    scenes = batch.vision_pixels.shape[0]
    n = min(scenes, max(1, round(tcfg.probe_swap * scenes)))
    picks = torch.randint(len(_SWAPS), (n,), generator=generator).tolist()
    pixels = torch.stack([batch.vision_pixels[i, list(_SWAPS[p])] for i, p in enumerate(picks)])
    attrs = batch.object_attrs[:n].clone()
    attrs[..., 0] = -100  # the colour names no longer hold
    feats = model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
    return aux.probe(feats, batch.object_cover[:n], attrs)


def pointer_choice(
    scores: torch.Tensor, cover: torch.Tensor, teacher: float, generator: torch.Generator | None
) -> torch.Tensor:
    """M token positions whose patch centre becomes each [SEG]'s point prompt in training.

    With probability `teacher` the best-scored token on the target (the point the model will
    use when it points right), else the argmax (SAM also learns from where the model actually
    points, right or wrong, so it does not trust the point blindly).
    """
    scores = scores.detach()
    best_on = scores.masked_fill(~SegPointer.on_target(cover), float("-inf")).argmax(-1)
    forced = torch.rand(scores.shape[0], generator=generator) < teacher
    return torch.where(forced.to(scores.device), best_on, scores.argmax(-1))


def forward_losses(
    model: SegLLM,
    aux: AuxHeads,
    batch: TrainBatch,
    tcfg: TrainConfig,
    cfg: ModelConfig,
    *,
    joint: bool,
    point_prompt: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms for one batch; 'total' is the weighted sum that is optimised.

    point_prompt: a model with a [SEG] pointer gets its point token in the SAM prompt (False
    trains the [SEG]-only prompt, which video uses)."""
    w = tcfg
    emb = model.encode_sam(batch.sam_pixels)
    logits, ious = decode_per_image(
        model, emb, model.point_token(batch.point_xy), batch.point_image
    )
    point = mask_terms(logits, ious, batch.point_masks, tcfg)
    sam_total = (
        w.bce_weight * point["bce"] + w.dice_weight * point["dice"] + w.iou_weight * point["iou"]
    )
    feats = model.vision_tower(pixel_values=batch.vision_pixels).last_hidden_state[:, 1:]
    probe_loss = aux.probe(feats, batch.object_cover, batch.object_attrs)
    if w.probe_swap:
        probe_loss = 0.5 * (probe_loss + swapped_probe_loss(model, aux, batch, w, generator))
    terms = {"point_dice": point["dice"], "probe": probe_loss}
    extra = feats.new_zeros(())
    if w.dense_probe:
        terms["dense_probe"] = aux.probe.dense_loss(feats, batch.object_cover, batch.object_attrs)
        extra = w.dense_probe * terms["dense_probe"]
    if w.relation_probe:
        terms["relation"] = relation_loss(aux.relation, feats, batch.object_cover, batch)
        extra = extra + w.relation_probe * terms["relation"]
    if not joint:
        terms["total"] = sam_total + probe_loss + extra
        return terms
    projected = model.project(feats, cfg.vision_image_size)
    token_cover = merged_cover(batch.object_cover, cfg.vision_merge)
    if w.relation_probe:
        terms["token_relation"] = relation_loss(aux.token_relation, projected, token_cover, batch)
        extra = extra + w.relation_probe * terms["token_relation"]
    if w.token_probe:
        terms["token_probe"] = token_probe_loss(aux, projected, token_cover, batch)
    if w.dense_probe:
        terms["dense_token_probe"] = token_probe_loss(
            aux, projected, token_cover, batch, dense=True
        )
        extra = extra + w.dense_probe * terms["dense_token_probe"]
    tokens = projected[batch.query_image]
    embeds = model.embed_inputs(batch.input_ids, tokens)
    mask = model.lm_attention_mask(
        SegLLM.prompt_lengths(batch.labels), embeds.shape[1], batch.attention_mask, embeds.dtype
    )
    ce, last = lm_loss(model.llm, batch.labels, inputs_embeds=embeds, attention_mask=mask)
    src = SegLLM.seg_source_mask(batch.input_ids, model.seg_token_id)
    hidden = last[src]
    if hidden.shape[0] != batch.seg_masks.shape[0]:
        raise RuntimeError(f"{hidden.shape[0]} [SEG] tokens but {batch.seg_masks.shape[0]} masks")
    terms["ce"] = ce
    total = 0.5 * sam_total + w.probe_weight * probe_loss + w.ce_weight * ce + extra
    if w.token_probe:
        total = total + w.token_probe * terms["token_probe"]
    slots = batch.input_ids == model.image_token_id
    all_image_hidden = last[slots].reshape(last.shape[0], -1, last.shape[-1])
    if w.target_weight:
        terms["target"] = target_loss(aux.target, all_image_hidden, batch, marks=w.target_marks)
        total = total + w.target_weight * terms["target"]
    if hidden.shape[0]:
        image_hidden = all_image_hidden[batch.seg_query]
        own = model.seg_pointer
        scores = (own or aux.pointer).scores(hidden, image_hidden)
        pointer = SegPointer.loss(scores, batch.seg_cover)
        if own is not None and point_prompt:
            choice = pointer_choice(scores, batch.seg_cover, w.pointer_teacher, generator)
            prompts = model.seg_prompts(hidden, image_hidden, choice=choice)
        else:
            prompts = model.seg_prompts(hidden)
        group = batch.seg_group
        if group is not None and bool(group.any()):
            prompts = model.without_point(prompts, group.to(prompts.device))
        seg_logits, seg_ious = decode_per_image(
            model, emb, prompts, batch.query_image[batch.seg_query]
        )
        seg = mask_terms(seg_logits, seg_ious, batch.seg_masks, tcfg)
        single = slice(None) if group is None else ~group.to(prompts.device)
        anchor = F.mse_loss(  # a group [SEG] has no one point to be pulled to
            prompts[single, 0], model.point_token(batch.seg_points[single])[:, 0].detach()
        )
        total = total + w.bce_weight * seg["bce"] + w.dice_weight * seg["dice"]
        total = total + w.iou_weight * seg["iou"] + w.point_weight * anchor
        total = total + w.pointer_weight * pointer
        terms.update(dice=seg["dice"], anchor=anchor, pointer=pointer)
    terms["total"] = total
    return terms
