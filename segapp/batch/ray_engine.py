"""Ray engine: the same job as a Ray Data pipeline, for a cluster (`pip install segapp[ray]`).

    read (units) -> preprocess (decode, tasks) -> model (actors, a GPU each when the cluster
    has GPUs) -> write (mask files, tasks) -> driver (results.jsonl, errors.jsonl, progress)

The model step is the local engine's `infer_units`, and results do not depend on batch
grouping, so both engines write identical bytes. Order is preserved, so the driver appends
rows in input order. On several machines the input and output folders must be on a shared
file system (workers read images and write mask files; the driver writes the journals).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from segapp.batch.infer import Loaded, UnitOutput, infer_units, load_unit
from segapp.batch.job import BatchJob, Problem, Unit
from segapp.batch.local import OnUnit
from segapp.batch.outputs import OutputStore, make_rows, write_unit_files
from segapp.errors import InputError
from segapp.export import mask_to_rle, rle_to_mask
from segapp.predictor import MaskResult, Result


def _unit(row: dict[str, Any]) -> Unit:
    return Unit(int(row["index"]), str(row["rel"]), str(row["path"]), tuple(json.loads(row["ask"])))


def _preprocess(row: dict[str, Any], *, max_pixels: int) -> dict[str, Any]:
    """Read and decode one image (a bad file becomes an `error`, never an exception)."""
    loaded = load_unit(_unit(row), max_pixels=max_pixels)
    image = loaded.image
    return {
        **row,
        "error": loaded.error or "",
        "rgb": b"" if image is None else image.tobytes(),
        "height": 0 if image is None else image.shape[0],
        "width": 0 if image is None else image.shape[1],
    }


def _image(row: dict[str, Any]) -> np.ndarray | None:
    if row["error"] or not row["height"]:
        return None
    shape = (int(row["height"]), int(row["width"]), 3)
    return np.frombuffer(row["rgb"], dtype=np.uint8).reshape(shape).copy()


class ModelStage:
    """A Ray Data actor holding one Segmenter; segments a batch of preprocessed units."""

    def __init__(self, model: str, device: str, threads: int, max_new_tokens: int) -> None:
        import torch

        from segapp.predictor import Segmenter

        torch.set_num_threads(max(1, threads))
        self.segmenter = Segmenter.from_pretrained(model, device=device)
        self.segmenter.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["index"]))]
        loaded = [Loaded(_unit(r), _image(r), str(r["error"]) or None) for r in rows]
        outputs = infer_units(self.segmenter, loaded)
        results = [
            json.dumps(
                [
                    {
                        "instruction": res.instruction,
                        "answer": res.answer,
                        "masks": [
                            {"label": m.label, "score": m.score, "rle": mask_to_rle(m.mask)}
                            for m in res.masks
                        ],
                    }
                    for res in out.results
                ]
            )
            for out in outputs
        ]
        problems = [json.dumps([p.to_dict() for p in out.problems]) for out in outputs]
        return {**batch, "results": np.array(results, dtype=object), "problems": np.array(problems)}


def _write(row: dict[str, Any], *, out_dir: str, formats: Sequence[str]) -> dict[str, Any]:
    """Write one unit's mask files; hand its results.jsonl rows back to the driver."""
    results = [
        Result(
            r["instruction"],
            r["answer"],
            [MaskResult(m["label"], m["score"], rle_to_mask(m["rle"])) for m in r["masks"]],
        )
        for r in json.loads(row["results"])
    ]
    image = _image(row) if "overlay" in formats else None
    out = UnitOutput(_unit(row), image, (int(row["height"]), int(row["width"])), results)
    write_unit_files(Path(out_dir), out, tuple(formats))
    return {
        "index": row["index"],
        "rows": json.dumps(make_rows(out)),
        "problems": row["problems"],
        "read": not row["error"],
    }


def _start_ray(job: BatchJob) -> bool:
    """Connect to `job.ray_address`, or start a local Ray; False if Ray was already running."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from here
    if job.ray_address:
        ray.init(address=job.ray_address, logging_level=logging.WARNING)
    else:
        ray.init(
            include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1"
        )
    return True


def run_ray(job: BatchJob, units: Sequence[Unit], store: OutputStore, on_unit: OnUnit) -> None:
    """Run `units` through the Ray Data pipeline; the driver appends rows in input order."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise InputError(
            "the Ray engine needs Ray Data: pip install 'segapp[ray]'", "--engine ray"
        ) from None
    started = _start_ray(job)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our progress bar says enough
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    try:
        context.execution_options.preserve_order = True  # rows reach the driver in input order
        context.enable_progress_bars = False
        gpus = ray.cluster_resources().get("GPU", 0) if job.device != "cpu" else 0
        use_gpu = gpus >= 1
        items = [
            {"index": u.index, "rel": u.rel, "path": u.path, "ask": json.dumps(u.instructions)}
            for u in units
        ]
        ds: ray.data.Dataset = ray.data.from_items(
            items, override_num_blocks=max(1, min(len(items), 64))
        )
        # a fractional CPU keeps decoding in its own tasks (not fused into the model actors)
        ds = ds.map(partial(_preprocess, max_pixels=job.max_pixels), num_cpus=0.5)
        ds = ds.map_batches(
            ModelStage,
            batch_size=job.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=job.ray_actors),
            num_cpus=1,
            num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs={
                "model": job.model,
                "device": "cuda" if use_gpu else "cpu",
                "threads": job.threads or 1,
                "max_new_tokens": job.max_new_tokens,
            },
        )
        ds = ds.map(
            partial(_write, out_dir=str(job.out_dir), formats=list(job.formats)), num_cpus=0.5
        )
        for row in ds.iter_rows():
            rows = json.loads(row["rows"])
            problems = json.loads(row["problems"])
            store.append_rows(rows)
            for problem in problems:
                store.append_problem(
                    Problem(problem["image"], problem["error"], problem.get("instruction"))
                )
            on_unit(len(rows), len(problems), bool(row["read"]))
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if started:
            ray.shutdown()
