"""Synthetic data: seeded scenes, queries with [SEG] answers, ReasonSeg-format files."""

from segapp.data.instructions import (
    KINDS,
    Query,
    Sample,
    generate_sample,
    iter_corpus,
    make_queries,
    make_query,
)
from segapp.data.reasonseg import ReasonSegItem, read_dir, read_item, write_sample, write_split
from segapp.data.world import (
    COLORS,
    HELD_OUT,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    SPLITS,
    TEXTURES,
    Obj,
    Scene,
    generate_scene,
)

__all__ = [
    "COLORS",
    "HELD_OUT",
    "IMAGE_SIZE",
    "KINDS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEXTURES",
    "Obj",
    "Query",
    "ReasonSegItem",
    "Sample",
    "Scene",
    "generate_sample",
    "generate_scene",
    "iter_corpus",
    "make_queries",
    "make_query",
    "read_dir",
    "read_item",
    "write_sample",
    "write_split",
]
