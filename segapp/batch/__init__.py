"""Batch-segment a folder (or a JSONL manifest) into masks, COCO, GeoJSON and YOLO files.

`run_batch(BatchJob(...), engine="local" | "ray")` is the entry point; `segapp batch` wraps it.
Modules: job (settings, inputs, output paths), infer (the batched model step), outputs
(per-unit files and the resumable journals), exports (whole-run formats), local and
ray_engine (the two engines), bench (`segapp bench batch`), command (the CLI).
Importing this package is cheap: torch loads with `run_batch`.
"""

from __future__ import annotations

from typing import Any

from segapp.batch.job import DEFAULT_FORMATS, FORMATS, BatchJob

__all__ = ["DEFAULT_FORMATS", "FORMATS", "BatchJob", "Summary", "run_batch"]


def __getattr__(name: str) -> Any:
    if name in ("Summary", "run_batch"):
        from segapp.batch import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
