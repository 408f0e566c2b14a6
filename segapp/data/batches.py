"""Training batches from the synthetic world: several instructions per scene, tensors ready.

A batch holds B scenes and Q = B * queries_per_image conversations. `[SEG]` targets are listed
in the order their `[SEG]` tokens occur (row-major over the Q x L ids).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from segapp.config import ModelConfig
from segapp.data.answers import in_order, is_group_answer
from segapp.data.instructions import make_queries
from segapp.data.queries import SUPERLATIVE_GROUPS, extreme, linear_sizes, matching
from segapp.data.world import COLORS, SHAPES, SIZES, TEXTURES, Scene, generate_scene
from segapp.preprocess import mask_tensor, sam_tensor, vision_tensor
from segapp.tokenizer import ChatFormat


@dataclass
class TrainBatch:
    sam_pixels: torch.Tensor  # B x 3 x S x S
    vision_pixels: torch.Tensor  # B x 3 x V x V
    input_ids: torch.Tensor  # Q x L
    attention_mask: torch.Tensor  # Q x L
    labels: torch.Tensor  # Q x L, -100 outside the answer
    query_image: torch.Tensor  # Q, index of each query's scene
    seg_masks: torch.Tensor  # M x S x S targets in the SAM frame
    seg_query: torch.Tensor  # M, query index of each [SEG]
    point_xy: torch.Tensor  # P x 2 interior points (SAM frame) for point-prompt supervision
    point_image: torch.Tensor  # P
    point_masks: torch.Tensor  # P x S x S
    seg_points: torch.Tensor  # M x 2 most interior point of each [SEG] target (SAM frame)
    object_cover: torch.Tensor  # B x K x N share of each vision patch each object covers (0 pad)
    object_attrs: torch.Tensor  # B x K x 4 colour/shape/size/texture ids (-100 = no object)
    object_relations: torch.Tensor  # B x K x len(RELATIONS) class ids (-100 = no object)
    seg_cover: torch.Tensor  # M x N' share of each LLM image token each [SEG] target covers
    kinds: list[str]
    # M, True for a group_first answer's group [SEG] (its target: the union of the query's)
    seg_group: torch.Tensor | None = None


def interior_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random (x, y) well inside a bool mask (distance to the edge >= 40% of the maximum)."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    ys, xs = np.nonzero(dist >= 0.4 * dist.max())
    i = int(rng.integers(len(xs)))
    return float(xs[i]) + 0.5, float(ys[i]) + 0.5


def deepest_point(mask: np.ndarray) -> tuple[float, float]:
    """The (x, y) pixel farthest from the mask's edge (a stable point-prompt target)."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return float(x) + 0.5, float(y) + 0.5


ATTRIBUTES = (tuple(COLORS), SHAPES, SIZES, TEXTURES)
MAX_OBJECTS = 12  # padding bound of the per-scene object tensors
# what the relation probe asks of each object, beside its own attributes: how many objects of
# the scene share its colour / shape / size / texture / colour and shape (1, 2, 3, 4 or more:
# what counting and multi-target instructions turn on), then whether it is the largest or
# smallest of all, of its colour, of its shape, of its texture (superlative instructions)
COUNT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("color",),
    ("shape",),
    ("size",),
    ("texture",),
    ("color", "shape"),
)
RELATIONS = (4,) * len(COUNT_GROUPS) + (3,) * len(SUPERLATIVE_GROUPS)  # classes per relation


def patch_cover(masks: np.ndarray, grid: int) -> torch.Tensor:
    """K x H x W bool masks -> K x grid^2: the share of each encoder patch each mask covers.

    Images are padded bottom/right to a square before the encoders, and so are the masks here.
    """
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros(0, grid * grid)
    side = max(h, w)
    padded = np.zeros((side, side, k), np.float32)
    padded[:h, :w] = masks.transpose(1, 2, 0)
    cover = cv2.resize(padded, (grid, grid), interpolation=cv2.INTER_AREA).reshape(grid, grid, k)
    return torch.from_numpy(np.ascontiguousarray(cover.transpose(2, 0, 1).reshape(k, -1)))


def object_attributes(scene: Scene) -> torch.Tensor:
    """K x 4 attribute ids (colour, shape, size, texture) of the scene's objects."""
    rows = []
    for o in scene.objects:
        values = (o.color, o.shape, o.size, o.texture)
        rows.append([names.index(v) for names, v in zip(ATTRIBUTES, values, strict=True)])
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 4)


def object_relations(scene: Scene) -> torch.Tensor:
    """K x len(RELATIONS) class ids: per COUNT_GROUPS entry min(sharing objects, 4) - 1 (the
    object itself included), then per SUPERLATIVE_GROUPS entry 0 / LARGEST / SMALLEST."""
    objs = scene.objects
    side = linear_sizes(objs)
    rows = []
    for k, o in enumerate(objs):
        counts = [min(len(matching(objs, o, attrs)), 4) - 1 for attrs in COUNT_GROUPS]
        ranks = [extreme(side, matching(objs, o, attrs), k) for attrs in SUPERLATIVE_GROUPS]
        rows.append(counts + ranks)
    return torch.tensor(rows, dtype=torch.long).reshape(-1, len(RELATIONS))


def make_batch(
    rng: np.random.Generator,
    chat: ChatFormat,
    cfg: ModelConfig,
    *,
    images: int,
    queries_per_image: int,
    split: str = "train",
    points_per_image: int = 3,
    answer_order: str = "seg_first",
    multi_order: str = "count_first",
) -> TrainBatch:
    sam_px, vis_px, rows, masks, seg_query, kinds = [], [], [], [], [], []
    seg_group: list[bool] = []
    query_image, pts, pt_img, pt_masks, seg_pts, seg_cover = [], [], [], [], [], []
    grid = cfg.vision_image_size // cfg.vision_patch
    token_grid = grid // cfg.vision_merge
    obj_cover = torch.zeros(images, MAX_OBJECTS, grid * grid)
    obj_attrs = torch.full((images, MAX_OBJECTS, 4), -100, dtype=torch.long)
    obj_rel = torch.full((images, MAX_OBJECTS, len(RELATIONS)), -100, dtype=torch.long)
    for b in range(images):
        scene = generate_scene(rng, split)
        sam_px.append(sam_tensor(scene.image, cfg.sam_image_size)[0])
        vis_px.append(vision_tensor(scene.image, cfg.vision_image_size)[0])
        n_obj = min(len(scene.objects), MAX_OBJECTS)
        obj_cover[b, :n_obj] = patch_cover(scene.masks[:n_obj], grid)
        obj_attrs[b, :n_obj] = object_attributes(scene)[:n_obj]
        obj_rel[b, :n_obj] = object_relations(scene)[:n_obj]
        scale = cfg.sam_image_size / max(scene.image.shape[:2])
        order = rng.permutation(len(scene.objects))[:points_per_image]
        for k in order:
            x, y = interior_point(scene.masks[k], rng)
            pts.append((x * scale, y * scale))
            pt_img.append(b)
        pt_masks.append(mask_tensor(scene.masks[order], cfg.sam_image_size))
        for q in make_queries(scene, rng, queries_per_image, split):
            text = in_order(q.answer, answer_order, q.phrase, multi_order)
            prompt, answer = chat.prompt_ids(q.instruction), chat.answer_ids(text)
            rows.append((prompt, answer))
            query_image.append(b)
            kinds.append(q.kind)
            if q.targets:
                targets = scene.masks[list(q.targets)]
                if is_group_answer(text):  # the group [SEG] comes first: the targets' union
                    targets = np.concatenate([targets.any(0, keepdims=True), targets])
                    x, y = deepest_point(targets[0])
                    seg_pts.append((x * scale, y * scale))  # unused: no anchor for a group
                seg_group.extend(
                    [True] + [False] * len(q.targets)
                    if is_group_answer(text)
                    else [False] * len(q.targets)
                )
                masks.append(mask_tensor(targets, cfg.sam_image_size))
                seg_cover.append(patch_cover(targets, token_grid))
                seg_query.extend([len(rows) - 1] * len(targets))
                for k in q.targets:
                    x, y = deepest_point(scene.masks[k])
                    seg_pts.append((x * scale, y * scale))
    ids, attn, labels = pad_rows(chat, rows)
    size = cfg.sam_image_size
    return TrainBatch(
        sam_pixels=torch.stack(sam_px),
        vision_pixels=torch.stack(vis_px),
        input_ids=ids,
        attention_mask=attn,
        labels=labels,
        query_image=torch.tensor(query_image),
        seg_masks=torch.cat(masks) if masks else torch.zeros(0, size, size),
        seg_query=torch.tensor(seg_query, dtype=torch.long),
        point_xy=torch.tensor(pts, dtype=torch.float32).reshape(-1, 2),
        point_image=torch.tensor(pt_img, dtype=torch.long),
        point_masks=torch.cat(pt_masks),
        seg_points=torch.tensor(seg_pts, dtype=torch.float32).reshape(-1, 2),
        object_cover=obj_cover,
        object_attrs=obj_attrs,
        object_relations=obj_rel,
        seg_cover=torch.cat(seg_cover) if seg_cover else torch.zeros(0, token_grid**2),
        kinds=kinds,
        seg_group=torch.tensor(seg_group, dtype=torch.bool),
    )


def pad_rows(
    chat: ChatFormat, rows: list[tuple[list[int], list[int]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, answer) id rows -> right-padded input ids, attention mask and labels (the
    answer's ids; -100 on the prompt and the padding)."""
    length = max(len(p) + len(a) for p, a in rows)
    pad = chat.tokenizer.pad_token_id
    if not isinstance(pad, int) or pad == chat.image_id:  # LLaVA pads with <unk>, its image slot
        pad = chat.eos_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    attn = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        attn[i, :n] = 1
    return ids, attn, labels


class BatchStream(IterableDataset):
    """Endless stream of TrainBatch; each worker draws from its own seeded generator."""

    def __init__(
        self, chat: ChatFormat, cfg: ModelConfig, *, seed: int, start: int, **kwargs
    ) -> None:
        self.chat, self.cfg, self.seed, self.start, self.kwargs = chat, cfg, seed, start, kwargs

    def __iter__(self) -> Iterator[TrainBatch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + wid
        while True:
            rng = np.random.default_rng([self.seed, step])
            yield make_batch(rng, self.chat, self.cfg, **self.kwargs)
            step += nw
