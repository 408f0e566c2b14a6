"""Concept verifier: which candidate mask, if any, is the user's object.

A LoRA concept's own ``[SEG]`` mask finds a novel object poorly on a small model (measured on
the tiny one: it answers "Sure [SEG]" on every concept-free scene and often lands on a
look-alike). So a LoRA fit also fits a verifier, and predict lets it choose:

- **candidates**: SAM's masks from a grid of positive point prompts over the image (one
  batched mask-decoder call on the cached embedding), de-duplicated, plus the adapter's own
  ``[SEG]`` masks;
- **features** of each candidate, pooled under its mask in the SAM frame at a fixed
  ``FEATURE_SIZE``: *appearance* (a coarse colour histogram, Lab mean and spread, the SAM image
  embedding averaged under the mask, mean-centred per image; with a reference, the best
  histogram intersection with a shot's and the share of pixels in the shots' colours) and
  *form* (rotation- and scale-invariant shape descriptors, relative area, and how much of
  the object's colours continue in a thin ring just outside the mask, which tells a whole
  object from a piece of a larger one);
- **the shots as reference** (``Reference``, from the shots' own masks): for each form feature
  its distance to the nearest shot's value, and the best IoU of the candidate's silhouette with
  a shot's, both brought to a common centre and size and the shot turned through 24 angles and
  mirrored; the candidate's outline is first snapped to the nearby pixels in the shots' colours
  (``Reference.snap``), since SAM's candidates are coarse. A logistic head is monotone in
  each feature, and a concept's form usually sits mid-range (a trapezoid is neither as compact
  as a disc nor as ragged as a star), so "how far from the shots" is what tells its form from
  another;
- **three logistic heads**, one per feature group and one on the silhouette match alone,
  fitted on the candidates of the augmented fitting scenes (positive: IoU >= 0.75 with the
  pasted object; negative: IoU <= 0.2; the scenes hold recoloured copies, other objects or
  random forms wearing the object's pixels, and the object's own pixels stretched to another
  aspect as hard negatives). A candidate's score is the lowest of the heads: a look-alike
  must pass on colour, on form and on outline. The form head alone gave the match little
  weight and let a same-coloured object of another outline through; with the third gate (and
  shot colours that allow for the fit's jitter, ``shot_colours``) 5-shot false positives
  went from 0.08 to 0.02-0.04 (README). The stretched copies came with the relation-probe
  base model, on which a green arrow's look-alikes (a bolt in the same two colours)
  matched its silhouette at 0.70 against 0.78-0.91 for the arrow itself;
- **the appearance head leaves out the negatives in the shots' colours** (``SAME_COLOURS``):
  taught those, it learnt the one shot's outline through the SAM embedding and rejected the
  object itself in new scenes (a green arrow's 1-shot matches scored 0.27-0.66 on appearance,
  0.83-0.98 on form and silhouette); with the colour likeness added, 1-shot mIoU on seed 0
  went from 0.77 to 0.94 (captured fits; README);
- **a fixed threshold** (``THRESHOLD``): the lowest of 0.5-0.7 in steps of 0.05 with no
  false positive on ``--seed 1`` for the bundled base (README). Calibrating it per
  concept on held-out fitting scenes (the 90th percentile of their best candidate's score)
  was measured to cost recall for no fewer false positives: a dozen held-out scenes make a
  noisy percentile.

The best-scoring candidate is kept if it clears the threshold; otherwise the concept is not in
the image. Its outline is then refined at the image's own resolution (``Reference.refine``).
Everything is stored next to the adapter as ``verifier.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from segapp.modeling.segllm import SegLLM
from segapp.personalize.reference import Reference, colour_bins
from segapp.preprocess import THUMBNAIL_SIZE as FEATURE_SIZE

FILE = "verifier.safetensors"
GRID = 8  # point prompts per side
POSITIVE_IOU, NEGATIVE_IOU = 0.75, 0.2  # 0.6 let ragged pieces teach the form head
THRESHOLD = 0.65  # chosen on `segapp eval personal --seed 1`; seed 0 is reported
MIN_AREA = 12  # candidate pixels at FEATURE_SIZE
DUPLICATE_IOU = 0.8
SAME_COLOURS = 0.8  # share of a negative's pixels in the shots' colours: left out of appearance


@torch.no_grad()
def grid_candidates(
    model: SegLLM, embedding: torch.Tensor, input_size: tuple[int, int], grid: int = GRID
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's masks from ``grid`` x ``grid`` positive points over the image region of the SAM
    frame: (low-res logits C x 1 x h x w, predicted IoU C)."""
    ys = (torch.arange(grid, dtype=torch.float32) + 0.5) * input_size[0] / grid
    xs = (torch.arange(grid, dtype=torch.float32) + 0.5) * input_size[1] / grid
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    low, iou = model.decode_masks(embedding, model.point_token(points.to(model.device)))
    return low.float(), iou[:, 0].float()


def frame_masks(low: torch.Tensor) -> torch.Tensor:
    """C x 1 x h x w low-res logits -> C x F x F bool masks in the SAM frame."""
    up = F.interpolate(low.float().cpu(), (FEATURE_SIZE, FEATURE_SIZE), mode="bilinear")
    return up[:, 0] > 0


def distinct(masks: torch.Tensor, quality: torch.Tensor) -> list[int]:
    """Indices of candidates worth scoring: not tiny, not most of the frame, and not a
    near-duplicate (IoU > DUPLICATE_IOU) of a better one."""
    flat = masks.flatten(1).float()
    area = flat.sum(1)
    inter = flat @ flat.T
    union = area[:, None] + area[None, :] - inter
    iou = inter / union.clamp(min=1)
    keep: list[int] = []
    for i in torch.argsort(quality, descending=True).tolist():
        if not MIN_AREA <= area[i] <= 0.5 * FEATURE_SIZE**2:
            continue
        if keep and float(iou[i, keep].max()) > DUPLICATE_IOU:
            continue
        keep.append(i)
    return keep


def _form(mask: np.ndarray) -> list[float]:
    """Solidity, rectangularity, aspect, circularity and two Hu invariants of the largest
    outline (all unchanged by rotation and scale)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return [0.0] * 6
    outline = max(contours, key=cv2.contourArea)
    area = max(cv2.contourArea(outline), 1.0)
    hull = max(cv2.contourArea(cv2.convexHull(outline)), 1.0)
    perimeter = max(cv2.arcLength(outline, True), 1.0)
    w, h = (max(v, 1.0) for v in cv2.minAreaRect(outline)[1])
    hu = cv2.HuMoments(cv2.moments(mask, True))[:2, 0]
    logs = (-np.sign(hu) * np.log10(np.abs(hu) + 1e-12) / 10).tolist()
    return [
        area / hull,
        area / (w * h),
        min(w, h) / max(w, h),
        4 * np.pi * area / perimeter**2,
        *logs,
    ]


def mask_features(
    thumb: torch.Tensor,
    embedding: torch.Tensor,
    masks: torch.Tensor,
    reference: Reference | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(appearance C x A, form C x B) features of C x F x F bool masks over one image; with a
    ``reference``, appearance ends with the colour likeness to the shots
    (``Reference.likeness``: best histogram intersection, share in the shots' colours) and
    form also holds each form feature's distance to the shots and the silhouette match
    (``Reference.compare``).

    thumb: 3 x F x F RGB (preprocess.sam_thumbnail); embedding: 1 x D x h x w SAM image embedding.
    """
    flat = masks.float().flatten(1)
    area = flat.sum(1).clamp(min=1)
    bins = colour_bins(thumb)
    hist = flat @ bins / area[:, None]
    rgb = thumb.permute(1, 2, 0).numpy().astype(np.uint8)
    lab = torch.from_numpy(cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3)).float() / 255
    lab_mean = flat @ lab / area[:, None]
    lab_std = (flat @ lab**2 / area[:, None] - lab_mean**2).clamp(min=0).sqrt()
    emb = embedding[0].float().cpu()
    cells = emb.flatten(1).T
    cells = cells - cells.mean(0, keepdim=True)  # the image's common component drowns objects
    share = F.adaptive_avg_pool2d(masks.float()[:, None], (emb.shape[-2], emb.shape[-1]))
    share = share.flatten(1)
    pooled = F.normalize(share @ cells / share.sum(1, keepdim=True).clamp(min=1e-6), dim=1)
    appearance = torch.cat([hist, lab_mean, lab_std, pooled], 1)
    likeness = reference.likeness(hist) if reference is not None else None
    if likeness is not None:
        appearance = torch.cat([appearance, likeness], 1)
    grown = F.max_pool2d(masks.float()[:, None], (1, 7), 1, (0, 3))  # a 7 x 7 dilation,
    grown = F.max_pool2d(grown, (7, 1), 1, (3, 0))  # one axis at a time
    ring = (grown[:, 0].flatten(1) - flat).clamp(min=0)
    ring_hist = ring @ bins / ring.sum(1, keepdim=True).clamp(min=1)
    continues = torch.minimum(hist, ring_hist).sum(1, keepdim=True)
    shapes = torch.tensor(
        [_form(m) for m in masks.numpy().astype(np.uint8)], dtype=torch.float32
    ).reshape(-1, 6)
    rel_area = torch.log(area / FEATURE_SIZE**2)[:, None] / 5
    form = torch.cat([shapes, rel_area, continues], 1)
    if reference is not None:
        form = torch.cat([form, reference.compare(form, masks, thumb)], 1)
    return appearance, form


@dataclass
class Head:
    """Logistic regression over standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(((x - self.mean) / self.std) @ self.weight + self.bias)


def fit_head(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, iterations: int = 300) -> Head:
    """Class-balanced, L2-regularised logistic regression (L-BFGS)."""
    mean, std = x.mean(0), x.std(0) + 1e-3
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    balance = (y == 0).sum() / (y == 1).sum().clamp(min=1)
    opt = torch.optim.LBFGS([weight, bias], max_iter=iterations)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = z @ weight + bias
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=balance)
        loss = loss + l2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Head(mean, std, weight.detach(), bias.detach())


@dataclass
class Verifier:
    appearance: Head
    form: Head
    threshold: float
    reference: Reference | None = None  # None: a concept fitted before references existed
    silhouette: Head | None = None  # on the silhouette match alone (with a reference)

    def scores(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """C scores in 0..1: the lowest of the heads' probabilities."""
        score = torch.minimum(self.appearance.prob(features[0]), self.form.prob(features[1]))
        if self.silhouette is not None:
            score = torch.minimum(score, self.silhouette.prob(features[1][:, -1:]))
        return score

    def _heads(self) -> dict[str, Head]:
        named = {"appearance": self.appearance, "form": self.form, "silhouette": self.silhouette}
        return {name: head for name, head in named.items() if head is not None}

    def save(self, directory: Path) -> None:
        tensors = {
            f"{name}.{part}": getattr(head, part).contiguous()
            for name, head in self._heads().items()
            for part in ("mean", "std", "weight", "bias")
        }
        tensors["threshold"] = torch.tensor([self.threshold])
        if self.reference is not None:
            tensors["reference.masks"] = self.reference.masks.to(torch.uint8).contiguous()
            tensors["reference.forms"] = self.reference.forms.contiguous()
            if self.reference.colours is not None:
                tensors["reference.colours"] = self.reference.colours.to(torch.uint8)
            if self.reference.hists is not None:
                tensors["reference.hists"] = self.reference.hists.contiguous()
        save_file(tensors, str(directory / FILE))

    @classmethod
    def load(cls, directory: Path) -> Verifier | None:
        """The concept's verifier, or None for a concept fitted without one."""
        path = directory / FILE
        if not path.is_file():
            return None
        t = load_file(str(path))
        heads = {
            name: Head(*(t[f"{name}.{part}"] for part in ("mean", "std", "weight", "bias")))
            for name in ("appearance", "form", "silhouette")
            if f"{name}.mean" in t
        }
        reference = None
        if "reference.masks" in t:
            colours = t["reference.colours"].bool() if "reference.colours" in t else None
            hists = t.get("reference.hists")
            reference = Reference(t["reference.masks"].bool(), t["reference.forms"], colours, hists)
        return cls(
            heads["appearance"],
            heads["form"],
            float(t["threshold"][0]),
            reference,
            heads.get("silhouette"),
        )


@dataclass
class Scene:
    """One fitting scene's candidates: features and IoU with the object (0 if absent)."""

    features: tuple[torch.Tensor, torch.Tensor]
    iou: torch.Tensor
    present: bool


@torch.no_grad()
def scene_candidates(
    model: SegLLM,
    thumb: torch.Tensor,
    embedding: torch.Tensor,
    input_size: tuple[int, int],
    target: torch.Tensor | None,
    reference: Reference | None = None,
) -> Scene:
    """Grid candidates of one fitting scene (+ the true mask itself when present).

    target: F x F bool object mask in the SAM frame, or None when the object is absent.
    """
    low, quality = grid_candidates(model, embedding, input_size)
    masks = frame_masks(low)
    masks = masks[distinct(masks, quality)]
    if target is not None and target.any():
        masks = torch.cat([masks, target[None]])
        flat, goal = masks.flatten(1), target.flatten()[None]
        iou = (flat & goal).sum(1) / (flat | goal).sum(1).clamp(min=1)
    else:
        iou = torch.zeros(len(masks))
    features = mask_features(thumb, embedding, masks, reference)
    return Scene(features, iou.float(), target is not None)


def _labelled(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keep = [(s.iou >= POSITIVE_IOU) | (s.iou <= NEGATIVE_IOU) for s in scenes]
    a = torch.cat([s.features[0][k] for s, k in zip(scenes, keep, strict=True)])
    b = torch.cat([s.features[1][k] for s, k in zip(scenes, keep, strict=True)])
    y = torch.cat([(s.iou[k] >= POSITIVE_IOU).float() for s, k in zip(scenes, keep, strict=True)])
    return a, b, y


def fit_verifier(scenes: list[Scene], reference: Reference | None = None) -> Verifier:
    """The heads on every scene's labelled candidates, the fixed ``THRESHOLD``.

    reference: the one the scenes' features were computed with (kept for predict); with it a
    third head gates on the silhouette match alone, and when it holds the shots' histograms
    the appearance head leaves out the negatives wearing the shots' colours (share >=
    ``SAME_COLOURS``): telling those apart is the form and silhouette heads' work, and taught
    to the appearance head they made it reject the object itself in new scenes."""
    a, b, y = _labelled(scenes)
    silhouette = fit_head(b[:, -1:], y) if reference is not None else None
    keep = torch.ones_like(y, dtype=torch.bool)
    if reference is not None and reference.hists is not None and reference.colours is not None:
        keep = (y == 1) | (a[:, -1] < SAME_COLOURS)
    return Verifier(fit_head(a[keep], y[keep]), fit_head(b, y), THRESHOLD, reference, silhouette)


@torch.no_grad()
def choose(
    verifier: Verifier,
    model: SegLLM,
    thumb: torch.Tensor,
    embedding: torch.Tensor,
    input_size: tuple[int, int],
    own: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float] | None:
    """The verified object's low-res logits (1 x 1 x h x w) and score, or None.

    own: the adapter's ``[SEG]`` low-res logits (M x 1 x h x w), scored with the grid's.
    """
    low, quality = grid_candidates(model, embedding, input_size)
    if own is not None and len(own):
        low = torch.cat([own.float(), low])
        quality = torch.cat([torch.full((len(own),), 2.0), quality])  # kept when duplicated
    masks = frame_masks(low)
    keep = distinct(masks, quality)
    if not keep:
        return None
    scores = verifier.scores(mask_features(thumb, embedding, masks[keep], verifier.reference))
    best = int(scores.argmax())
    if float(scores[best]) < verifier.threshold:
        return None
    return low[keep[best] : keep[best] + 1], float(scores[best])
