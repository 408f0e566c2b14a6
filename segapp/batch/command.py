"""`segapp batch` and `segapp bench batch`: argument parsing over `run_batch` / `bench_batch`.

Registered by segapp.cli with `add_batch_command(sub)` and `add_batch_bench(bench_sub)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from segapp.argtypes import at_least
from segapp.batch.job import DEFAULT_FORMATS, FORMATS


def _formats(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown format {unknown[0] if unknown else '(none)'}: use a comma list of "
            + ",".join(FORMATS)
        )
    return names


def add_batch_command(sub: Any) -> None:
    """Add `segapp batch` to the CLI's subparsers."""
    b = sub.add_parser(
        "batch",
        help="segment every image in a folder (resumable; PNG, COCO, GeoJSON, YOLO outputs)",
        description="Segment every image under DIR (jpg/png/webp/bmp/tif, recursively) with one "
        "instruction, or the (image, instruction) rows of a JSONL manifest.",
    )
    b.add_argument("dir", help="input folder (manifest image paths are relative to it)")
    ask = b.add_mutually_exclusive_group(required=True)
    ask.add_argument("--prompt", help="one instruction for every image")
    ask.add_argument(
        "--prompts", help='JSONL manifest: {"image": "a/b.jpg", "instruction": "..."} per line'
    )
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--model", default="tiny", help="preset name or weights directory")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    b.add_argument("--resume", action="store_true", help="continue a run in --out, skip done")
    b.add_argument("--engine", default="local", choices=["local", "ray"])
    b.add_argument("--address", help="Ray cluster address for --engine ray (e.g. ray://head:10001)")
    b.add_argument("--actors", type=at_least(1), default=1, help="Ray model actors (default 1)")
    b.add_argument("--batch-size", type=at_least(1), default=8, help="images per model call")
    b.add_argument(
        "--formats",
        type=_formats,
        default=DEFAULT_FORMATS,
        help=f"comma list of {','.join(FORMATS)} (default {','.join(DEFAULT_FORMATS)})",
    )
    b.add_argument("--workers", type=at_least(1), default=2, help="image loader threads")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: cores - 1 on CPU)")
    b.add_argument("--max-new-tokens", type=at_least(1), default=48, help="answer length limit")
    b.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    b.add_argument("--user", help="user whose concepts (<name> in instructions) apply (local)")
    b.add_argument("--store", help="concept store folder (default weights/adapters)")
    b.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from segapp.batch.job import BatchJob
    from segapp.batch.runner import run_batch
    from segapp.cli import pick_device

    job = BatchJob(
        input_dir=Path(args.dir),
        out_dir=Path(args.out),
        prompt=args.prompt,
        prompts_file=Path(args.prompts) if args.prompts else None,
        model=args.model,
        # Ray actors pick their own device (the driver may have no GPU)
        device=args.device if args.engine == "ray" else pick_device(args.device),
        formats=args.formats,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        max_new_tokens=args.max_new_tokens,
        max_pixels=args.max_pixels,
        resume=args.resume,
        progress=not args.quiet,
        ray_address=args.address,
        ray_actors=args.actors,
    )
    segmenter = None
    if args.user is not None:  # the user's concepts: a PersonalSegmenter, local engine only
        from segapp.build import load_model
        from segapp.errors import InputError
        from segapp.personalize.command import personal_segmenter

        if args.engine != "local":
            raise InputError("--user works with the local engine", "--engine")
        from segapp.personalize import validate_slug

        validate_slug(args.user, "user")
        segmenter = personal_segmenter(args, load_model(job.model, device=job.device))
        segmenter.max_new_tokens = job.max_new_tokens
    summary = run_batch(job, engine=args.engine, segmenter=segmenter)
    print(json.dumps(summary.to_dict()) if args.json else summary.line())
    return 0


def add_batch_bench(bench_sub: Any) -> None:
    """Add `segapp bench batch` to the `segapp bench` subparsers."""
    bb = bench_sub.add_parser(
        "batch", help="images/s of a naive loop, the local engine and the Ray engine"
    )
    bb.add_argument("--model", default="tiny")
    bb.add_argument("--images", type=at_least(1), default=200, help="generated images (200)")
    bb.add_argument("--batch-size", type=at_least(1), default=8)
    bb.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    bb.add_argument("--keep", help="keep the images and outputs in this folder")
    bb.set_defaults(func=cmd_bench_batch)


def cmd_bench_batch(args: argparse.Namespace) -> int:
    from segapp.batch.bench import bench_batch

    result = bench_batch(
        args.model,
        images=args.images,
        batch_size=args.batch_size,
        ray=not args.no_ray,
        keep=Path(args.keep) if args.keep else None,
    )
    print(json.dumps(result, indent=2))
    return 0
