"""`segapp video`, `segapp eval video` and `segapp bench video`: argument parsing only.

Registered by segapp.cli with `add_video_command(sub)`, `add_video_eval(eval_sub)` and
`add_video_bench(bench_sub)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from segapp.argtypes import at_least


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


_COMPILE_HELP = (
    "run the LLM prefill under torch.compile (about 10 s once, then faster; needs a C++ "
    "compiler on CPU, else it warns and runs eagerly)"
)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=at_least(1), default=4, help="frames the LLM sees in full (4)")
    p.add_argument(
        "--sparse-frames", type=at_least(0), default=0, help="extra frames pooled to 1 token"
    )
    p.add_argument("--sampling", default="uniform", choices=["uniform", "sparse-dense"])
    p.add_argument("--compile", action="store_true", help=_COMPILE_HELP)
    p.add_argument(
        "--point-track",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the [SEG] pointer's point track to the [SEG] prompt (models with a pointer; "
        "default: on for a model with its own video pointer, as the bundled tiny model has, "
        "off for one whose only pointer is the image pointer, which finds video targets too "
        "rarely)",
    )
    p.add_argument(
        "--presence",
        type=_ratio,
        help="with a point track: no mask on a frame whose presence is below this (the target "
        "is not there; 0 = off). Presence is the video pointer's probability on the frame's best "
        "token for a model trained by `segapp train-video` (default: its own threshold), else "
        "the frame's share of the pointer's attention over its best frame's (default off)",
    )


def add_video_command(sub: Any) -> None:
    v = sub.add_parser(
        "video",
        help="segment an instruction's targets in every frame of a video",
        description="Reason once over DyCoke-merged frame tokens, then segment every frame with "
        "the [SEG] prompts (One-Token-Seg-All). VIDEO: a video file or a folder of frames.",
    )
    v.add_argument("video")
    v.add_argument("instruction")
    v.add_argument("--out-dir", default="out", help="masks/, overlay.mp4, results.jsonl")
    v.add_argument("--merge", type=_ratio, default=0.7, help="DyCoke TTM ratio K (0.7)")
    v.add_argument("--no-merge", action="store_true", help="feed every frame token to the LLM")
    v.add_argument("--prune", type=_ratio, help="DyCoke KV-pruning ratio P while decoding")
    v.add_argument("--model", default="tiny", help="preset name or weights directory")
    v.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    _sampling_args(v)
    v.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_video)


def _options(args: argparse.Namespace) -> Any:
    from segapp.video.pipeline import VideoOptions

    return VideoOptions(
        dense_frames=args.frames,
        sparse_frames=args.sparse_frames,
        sampling=args.sampling,
        point_tracks=args.point_track,
        presence=args.presence,
        compile_llm=args.compile,
    )


def cmd_video(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from segapp.build import load_model
    from segapp.cli import pick_device
    from segapp.images import check_instruction
    from segapp.video.pipeline import VideoSegmenter

    check_instruction(args.instruction)
    bundle = load_model(args.model, device=pick_device(args.device))
    bar = tqdm(total=100, disable=args.quiet, unit="%", file=sys.stderr)

    def progress(fraction: float, stage: str) -> None:
        bar.set_description(stage[:40])
        bar.update(round(100 * fraction) - bar.n)

    try:
        result = VideoSegmenter(bundle, _options(args)).run(
            args.video,
            args.instruction,
            args.out_dir,
            merge=None if args.no_merge else args.merge,
            prune=args.prune,
            progress=progress,
        )
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        st = result.stats
        print(f"answer: {result.answer}")
        print(
            f"  {result.frames} frames, visual tokens {st['visual_tokens_kept']}/"
            f"{st['visual_tokens_total']}, prefill {st['prefill_s']:.3f}s, "
            f"total {st['total_s']:.2f}s"
        )
        print(f"wrote {result.results_path}, {result.overlay_path} and {result.mask_dir}/")
    return 0


def add_video_eval(eval_sub: Any) -> None:
    e = eval_sub.add_parser("video", help="J, F, J&F on the synthetic video split")
    e.add_argument("--model", default="tiny")
    e.add_argument("--device", default="auto")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--limit", type=at_least(1), default=50, help="clips (50)")
    e.add_argument("--merge", type=_ratio, action="append", help="K to compare (default 0.7)")
    e.add_argument("--prune", type=_ratio, help="DyCoke KV-pruning ratio P for every setting")
    _sampling_args(e)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval_video)


def cmd_eval_video(args: argparse.Namespace) -> int:
    from segapp.build import load_model
    from segapp.cli import pick_device
    from segapp.video.evaluate import evaluate_video

    bundle = load_model(args.model, device=pick_device(args.device))
    summary = evaluate_video(
        bundle,
        split=args.split,
        limit=args.limit,
        merges=(None, *(args.merge or [0.7])),
        prune=args.prune,
        options=_options(args),
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2))
    return 0


def add_video_bench(bench_sub: Any) -> None:
    b = bench_sub.add_parser("video", help="DyCoke merged vs unmerged: tokens, times, memory")
    b.add_argument("--model", default="tiny")
    b.add_argument("--device", default="auto")
    b.add_argument("--merge", type=_ratio, action="append", help="K values (default 0.5, 0.7)")
    b.add_argument("--prune", type=_ratio, help="DyCoke KV-pruning ratio P in every setting")
    b.add_argument("--clip-frames", type=at_least(1), default=16, help="frames of the test clip")
    b.add_argument("--frames", type=at_least(1), default=4, help="frames the LLM sees")
    b.add_argument("--repeats", type=at_least(1), default=3)
    b.add_argument(
        "--llm-repeats", type=at_least(0), default=5, help="extra LLM-only calls per repeat"
    )
    b.add_argument("--max-new-tokens", type=at_least(0), default=48)
    b.add_argument(
        "--llm-hidden", type=at_least(8), help="swap in a random LLM of this width (timing only)"
    )
    b.add_argument(
        "--llm-layers", type=at_least(1), default=8, help="depth of the --llm-hidden LLM"
    )
    b.add_argument("--compile", action="store_true", help=_COMPILE_HELP)
    b.set_defaults(func=cmd_bench_video)


def cmd_bench_video(args: argparse.Namespace) -> int:
    from segapp.cli import pick_device
    from segapp.errors import InputError
    from segapp.video.bench import bench_video
    from segapp.video.types import VideoOptions

    layer = VideoOptions().prune_layer
    if args.prune is not None and args.llm_hidden and args.llm_layers <= layer:
        raise InputError(f"--prune works from LLM layer {layer}: give --llm-layers above {layer}")
    result = bench_video(
        args.model,
        merges=tuple(args.merge or (0.5, 0.7)),
        prune=args.prune,
        frames=args.clip_frames,
        dense_frames=args.frames,
        repeats=args.repeats,
        llm_repeats=args.llm_repeats,
        llm_hidden=args.llm_hidden,
        llm_layers=args.llm_layers,
        max_new_tokens=args.max_new_tokens,
        compile_llm=args.compile,
        device=pick_device(args.device),
    )
    print(json.dumps(result, indent=2))
    return 0
