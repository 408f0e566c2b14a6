"""PerSAM-style training-free personalization on the model's own SAM.

Fit: the target feature is the mean of the shots' SAM image features under their masks
(L2-normalised, averaged over shots). Predict: a location prior (cosine similarity of every
image-embedding cell to the target), the most similar cell as a positive point and the least
similar as a negative point, then cascaded refinement (the mask's logits fed back as a dense
prompt, then its box). A concept-free image is recognised by a similarity below the threshold
learnt from the shots (midway between the best match on the object and off it).

Deviations from PerSAM, both measured on the bundled tiny model: features are mean-centred per
image (the tiny SAM's cells share a large common component), and the cascade (``refine``) runs
only for published SAM sizes, because the tiny SAM never trained its mask-input, box and
negative-point prompts (the first, positive-point mask is what it is good at).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from segapp.build import Bundle
from segapp.modeling.segllm import SegLLM
from segapp.preprocess import mask_tensor, sam_tensor

FILE = "persam.safetensors"


def _cells(model: SegLLM, mask: np.ndarray, grid: int) -> torch.Tensor:
    """H x W bool -> grid x grid share of each embedding cell the mask covers (SAM frame)."""
    size = model.sam.image_encoder.img_size
    m = mask_tensor(mask[None], size)[None]
    return F.adaptive_avg_pool2d(m, grid)[0, 0].to(model.device)


def _valid(sam_input_size: tuple[int, int], grid: int, size: int) -> torch.Tensor:
    """grid x grid bool: cells inside the image (not the bottom/right padding)."""
    h = int(np.ceil(sam_input_size[0] / size * grid))
    w = int(np.ceil(sam_input_size[1] / size * grid))
    valid = torch.zeros(grid, grid, dtype=torch.bool)
    valid[:h, :w] = True
    return valid


def _features(emb: torch.Tensor) -> torch.Tensor:
    """D x h x w embedding -> per-cell unit vectors after removing the image's mean feature.

    The tiny SAM's features share a large common component (raw cosine similarity is ~0.97
    between any two cells), which drowns the object's own signature.
    """
    emb = emb.float()
    return F.normalize(emb - emb.mean((1, 2), keepdim=True), dim=0)


@torch.no_grad()
def fit_persam(bundle: Bundle, shots: list[tuple[np.ndarray, np.ndarray]], out: Path) -> dict:
    """Target feature and decision threshold from the shots, saved as persam.safetensors."""
    model, cfg = bundle.model, bundle.config
    feats, sims_in, sims_out, embs = [], [], [], []
    for img, m in shots:
        px, _ = sam_tensor(img, cfg.sam_image_size)
        emb = _features(model.encode_sam(px[None].to(model.device))[0])  # D x h x w
        cover = _cells(model, m, emb.shape[-1])
        weight = (cover >= 0.5).float() if (cover >= 0.5).any() else cover
        feats.append(F.normalize((emb * weight).sum((1, 2)) / weight.sum(), dim=0))
        embs.append((emb, cover, img.shape[:2]))
    target = F.normalize(torch.stack(feats).mean(0), dim=0)
    for emb, cover, (h, w) in embs:
        sim = torch.einsum("d,dhw->hw", target, emb)
        scale = cfg.sam_image_size / max(h, w)
        valid = _valid(
            (int(h * scale + 0.5), int(w * scale + 0.5)), emb.shape[-1], cfg.sam_image_size
        )
        sims_in.append(float(sim[cover >= 0.5].max() if (cover >= 0.5).any() else sim.max()))
        off = valid.to(sim.device) & (cover == 0)
        sims_out.append(float(sim[off].max()) if off.any() else 0.0)
    threshold = 0.5 * (min(sims_in) + max(sims_out))
    save_file(
        {"target": target.cpu().contiguous(), "threshold": torch.tensor([threshold])},
        str(out / FILE),
    )
    return {"sim_on_object": round(min(sims_in), 4), "sim_off_object": round(max(sims_out), 4)}


def load_persam(directory: Path) -> tuple[torch.Tensor, float]:
    data = load_file(str(Path(directory) / FILE))
    return data["target"], float(data["threshold"][0])


@torch.no_grad()
def persam_logits(
    model: SegLLM,
    sam_embedding: torch.Tensor,
    sam_input_size: tuple[int, int],
    target: torch.Tensor,
    threshold: float,
    *,
    refine: bool = True,
) -> tuple[torch.Tensor, float] | None:
    """Low-res mask logits 1 x 1 x 4h x 4w and score for the target, or None if it is absent.

    sam_embedding: 1 x D x h x w of the image; target: D (normalised).
    """
    emb = _features(sam_embedding[0])
    grid, size = emb.shape[-1], model.sam.image_encoder.img_size
    sim = torch.einsum("d,dhw->hw", target.to(emb), emb)
    valid = _valid(sam_input_size, grid, size).to(sim.device)
    sim = sim.masked_fill(~valid, -2.0)
    if float(sim.max()) < threshold:
        return None
    step = size / grid
    best = int(sim.argmax())
    worst = int(sim.masked_fill(~valid, 2.0).argmin())
    pos = torch.tensor([[(best % grid + 0.5) * step, (best // grid + 0.5) * step]])
    neg = torch.tensor([[(worst % grid + 0.5) * step, (worst // grid + 0.5) * step]])
    dev, dtype = sam_embedding.device, sam_embedding.dtype
    # first pass: the positive point alone, exactly as the model's point prompts were trained
    low, iou = model.decode_masks(sam_embedding, model.point_token(pos.to(dev)))
    if not refine:
        return low, float(iou[0, 0])
    pe, dec = model.sam.prompt_encoder, model.sam.mask_decoder
    coords = torch.cat([pos, neg])[None].to(dev)
    labels = torch.tensor([[1, 0]], device=dev)
    for use_box in (False, True):  # cascaded refinement: mask logits, then mask logits + box
        box = None
        if use_box:
            m = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)[0, 0] > 0
            if not m.any():
                break
            ys, xs = torch.nonzero(m, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]], device=dev).float()
        sparse, dense = pe(points=(coords.float(), labels), boxes=box, masks=low.float())
        cand, cand_iou = dec(
            image_embeddings=sam_embedding,
            image_pe=pe.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=True,
        )
        k = int(cand_iou[0].argmax())
        low, iou = cand[:, k : k + 1], cand_iou[:, k : k + 1]
    return low, float(iou[0, 0])
