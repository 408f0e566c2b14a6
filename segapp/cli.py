"""`segapp` command line. Each command is a small function over the library API.

Errors: one line `error: <what> (<where>)` on stderr; exit 2 for bad input, 1 for an internal
failure; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from segapp.batch.command import add_batch_bench, add_batch_command
from segapp.errors import InputError, SegappError
from segapp.personalize.command import (
    add_bench_personalize,
    add_eval_personal,
    add_personalize_command,
)
from segapp.serve_command import add_serve_bench, add_serve_commands
from segapp.train_command import add_train_command, add_train_video_command
from segapp.video.command import add_video_bench, add_video_command, add_video_eval

if TYPE_CHECKING:
    from segapp.build import LoadOptions


def pick_device(name: str) -> str:
    """--device as a torch device name (precision.resolve_device; torch imported on use)."""
    from segapp.precision import resolve_device

    return resolve_device(name)


def load_options(args: argparse.Namespace) -> LoadOptions:
    """--precision / --load-in-8bit / --load-in-4bit / --vision-tower / --sam as LoadOptions."""
    from segapp.build import LoadOptions

    if args.load_in_8bit and args.load_in_4bit:
        raise InputError("choose one of --load-in-8bit and --load-in-4bit", "--load-in-*")
    quantize = "8bit" if args.load_in_8bit else "4bit" if args.load_in_4bit else None
    return LoadOptions(
        precision=args.precision,
        quantize=quantize,
        vision_tower=Path(args.vision_tower) if args.vision_tower else None,
        sam_checkpoint=Path(args.sam) if args.sam else None,
    )


# ---- commands ------------------------------------------------------------------------------
def cmd_segment(args: argparse.Namespace) -> int:
    from segapp.export import overlay, save_png
    from segapp.images import check_instruction, load_image

    instruction = check_instruction(args.instruction)
    if args.token_keep < 1.0 and getattr(args, "user", None):
        raise InputError("--token-keep does not apply with --user concepts yet", "--token-keep")
    image = load_image(args.image, max_pixels=args.max_pixels)
    from segapp.build import load_model
    from segapp.service import Service, ServiceConfig

    bundle = load_model(args.model, device=pick_device(args.device), options=load_options(args))
    # the Service's code path, so the CLI, REST server and UI give identical masks
    store = Path(args.store) if getattr(args, "store", None) else None  # concept store
    config = ServiceConfig(model=args.model, max_pixels=args.max_pixels, concepts_root=store)
    service = Service(config, bundle=bundle)
    try:
        if args.token_keep < 1.0:  # FastV / DivPrune image-token reduction
            from segapp.predictor import Segmenter
            from segapp.token_reduction import predict_reduced

            segmenter = Segmenter(bundle)
            segmenter.set_image(image)
            result = predict_reduced(
                segmenter, instruction, method=args.token_method, keep=args.token_keep
            )
        else:
            result = service.segment(image, instruction, user=getattr(args, "user", None))
    finally:
        service.close()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    for i, m in enumerate(result.masks):
        save_png(out / f"{stem}_mask_{i}.png", m.mask)
    labels = [f"{m.label} {m.score:.2f}" for m in result.masks]
    save_png(out / f"{stem}_overlay.png", overlay(image, [m.mask for m in result.masks], labels))
    record = result.to_dict(image=str(args.image))
    if args.json:
        print(json.dumps(record))
    else:
        print(f"answer: {result.answer}")
        for i, m in enumerate(record["masks"]):
            print(
                f"  mask {i}: {m['label']!r} score={m['score']:.2f} bbox={m['bbox']} area={m['area']}"
            )
        print(f"wrote {len(result.masks)} mask(s) and an overlay to {out}/")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from segapp.build import LoadOptions, load_model
    from segapp.config import valid_threshold
    from segapp.evaluate import evaluate_reason

    device, options = pick_device(args.device), load_options(args)
    bundle = (
        None if options == LoadOptions() else load_model(args.model, device=device, options=options)
    )
    if args.no_target_threshold is not None:  # e.g. to choose it on --split val
        threshold = args.no_target_threshold
        if not valid_threshold(threshold):
            raise InputError(f"--no-target-threshold must be in (0, 1], got {threshold}", "eval")
        bundle = bundle or load_model(args.model, device=device)
        if not bundle.model.no_target_ids:
            raise InputError(
                f"model {args.model!r} names no no_target_openings in its config.json, so "
                "--no-target-threshold has nothing to act on",
                "--no-target-threshold",
            )
        bundle.model.no_target_threshold = threshold
    if args.target_threshold is not None:  # e.g. to choose it on --split val
        if not valid_threshold(args.target_threshold):
            raise InputError(
                f"--target-threshold must be in (0, 1], got {args.target_threshold}", "eval"
            )
        bundle = bundle or load_model(args.model, device=device)
        if bundle.model.target_head is None:
            raise InputError(
                f"model {args.model!r} has no target head, so --target-threshold has nothing "
                "to act on",
                "--target-threshold",
            )
        bundle.model.target_threshold = args.target_threshold
    if args.token_keep < 1.0:
        from segapp.token_reduction import evaluate_reduced

        summary = evaluate_reduced(
            bundle or load_model(args.model, device=device),
            split=args.split,
            limit=args.limit,
            method=args.token_method,
            keep=args.token_keep,
            progress=not args.quiet,
        )
        print(json.dumps(summary, indent=None if args.compact else 2))
        return 0
    summary = evaluate_reason(
        args.model,
        split=args.split,
        data=Path(args.data) if args.data else None,
        limit=args.limit,
        device=device,
        progress=not args.quiet,
        bundle=bundle,
    )
    print(json.dumps(summary, indent=None if args.compact else 2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from segapp.benchmarks import bench_image

    result = bench_image(args.model, sam=args.sam, repeats=args.repeats)
    if args.token_keep:  # same-run FastV / DivPrune figures (segapp.token_reduction)
        from segapp.token_reduction import bench_reduction

        result["token_reduction"] = bench_reduction(
            args.model, keeps=tuple(args.token_keep), repeats=max(args.repeats, 5)
        )
    print(json.dumps(result, indent=2))
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    from segapp.data.reasonseg import write_split

    n = write_split(Path(args.out), args.split, args.n)
    print(f"wrote {n} samples of split {args.split!r} to {args.out}")
    return 0


def cmd_weights_list(args: argparse.Namespace) -> int:
    from segapp.build import weights_root
    from segapp.weights import human_size, list_installed

    root = weights_root()
    entries = list_installed(root, checksums=not args.no_checksums)
    if args.json:
        print(json.dumps({"root": str(root), "weights": [e.to_dict() for e in entries]}))
        return 0
    print(f"{root}/")
    for entry in entries:
        print(f"  {entry.name}  [{entry.kind}]  {human_size(entry.size)}")
        for f in entry.files:
            digest = f"  sha256:{f.sha256}" if f.sha256 else ""
            print(f"    {f.path}  {human_size(f.size)}{digest}")
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from segapp.build import weights_root
    from segapp.weights import fetch

    target = fetch(args.name, weights_root())
    print(f"fetched {args.name} into {target}/")
    return 0


def _fetchable_names() -> list[str]:
    from segapp.config import AUXILIARY_WEIGHTS, CHECKPOINT_PRESETS

    presets = [f"{name} [{p.description}]" for name, p in CHECKPOINT_PRESETS.items()]
    return [*presets, *AUXILIARY_WEIGHTS]


# ---- parser --------------------------------------------------------------------------------
def token_reduction_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--token-keep",
        type=float,
        default=1.0,
        metavar="R",
        help="keep this share of image tokens in the LLM (1 = all, the default path)",
    )
    sp.add_argument(
        "--token-method",
        choices=["divprune", "fastv"],
        default="divprune",
        help="divprune (default): a diverse subset enters the LLM; fastv: drop by attention "
        "after layer 2",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segapp", description="Reason, then segment.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="tiny", help="preset name or weights directory")
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        sp.add_argument(
            "--precision",
            choices=["fp32", "bf16", "fp16"],
            help="weights dtype (default: fp32; bf16 for LISA on CUDA; fp16 when quantized)",
        )
        sp.add_argument(
            "--load-in-8bit", action="store_true", help="8-bit LLM (bitsandbytes, CUDA)"
        )
        sp.add_argument(
            "--load-in-4bit", action="store_true", help="4-bit nf4 LLM (bitsandbytes, CUDA)"
        )
        sp.add_argument("--vision-tower", help="CLIP folder for a LISA checkpoint")
        sp.add_argument("--sam", help="segment-anything .pth replacing the model's SAM")

    s = sub.add_parser("segment", help="segment one image from an instruction")
    s.add_argument("image")
    s.add_argument("instruction")
    model_args(s)
    s.add_argument("--out-dir", default="out", help="where masks and the overlay go (default out/)")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images")
    s.add_argument("--user", help="user whose concepts (<name> in the instruction) apply")
    s.add_argument("--store", help="concept store folder (default weights/adapters)")
    token_reduction_args(s)
    s.set_defaults(func=cmd_segment)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="suite", required=True)
    r = esub.add_parser("reason", help="gIoU / cIoU on a ReasonSeg-format split")
    model_args(r)
    r.add_argument("--split", default="test", choices=["train", "val", "test"])
    r.add_argument("--data", help="a ReasonSeg-format directory instead of the synthetic split")
    r.add_argument("--limit", type=int, default=700, help="samples of the synthetic split")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--compact", action="store_true", help="one-line JSON")
    r.add_argument(
        "--no-target-threshold",
        type=float,
        help="probability the first tokens of a no-target answer need to open it (default: "
        "the model's config.json; 0.5 is about greedy decoding)",
    )
    r.add_argument(
        "--target-threshold",
        type=float,
        help="target-head probability at which a multi-target answer adds the object on an "
        "image token (default: the model's config.json)",
    )
    token_reduction_args(r)
    r.set_defaults(func=cmd_eval)
    add_video_eval(esub)  # `segapp eval video`
    add_eval_personal(esub)  # `segapp eval personal`

    add_batch_command(sub)  # `segapp batch`
    add_personalize_command(sub)  # `segapp personalize`
    add_video_command(sub)  # `segapp video`
    add_serve_commands(sub)  # `segapp serve`, `segapp demo`

    b = sub.add_parser("bench", help="speed benchmarks (JSON with same-run ratios)")
    bsub = b.add_subparsers(dest="suite", required=True)
    bi = bsub.add_parser("image", help="cold (set_image + predict) vs warm (predict) call")
    bi.add_argument("--model", default="tiny")
    bi.add_argument(
        "--sam",
        default=None,
        choices=["vit_b", "vit_l", "vit_h"],
        help="swap in segment_anything's real encoder size (random weights) for timing",
    )
    bi.add_argument("--repeats", type=int, default=3)
    bi.add_argument(
        "--token-keep",
        type=float,
        action="append",
        help="also time FastV / DivPrune keeping this share of image tokens (repeatable)",
    )
    bi.set_defaults(func=cmd_bench)
    add_batch_bench(bsub)  # `segapp bench batch`
    add_bench_personalize(bsub)  # `segapp bench personalize`
    add_video_bench(bsub)  # `segapp bench video`
    add_serve_bench(bsub)  # `segapp bench serve`

    add_train_command(sub)  # `segapp train`
    add_train_video_command(sub)  # `segapp train-video`

    d = sub.add_parser("data", help="synthetic datasets")
    dsub = d.add_subparsers(dest="action", required=True)
    g = dsub.add_parser("generate", help="write a split in ReasonSeg format")
    g.add_argument("--split", default="test", choices=["train", "val", "test"])
    g.add_argument("--n", type=int, default=200)
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_data_generate)

    w = sub.add_parser("weights", help="installed weights and fetching published ones")
    wsub = w.add_subparsers(dest="action", required=True)
    wl = wsub.add_parser("list", help="what is under weights/ (sizes, sha256)")
    wl.add_argument("--json", action="store_true", help="one JSON object")
    wl.add_argument("--no-checksums", action="store_true", help="skip sha256 (fast)")
    wl.set_defaults(func=cmd_weights_list)
    wf = wsub.add_parser(
        "fetch", help="download NAME into weights/NAME (needs a network and HF_HUB_OFFLINE=0)"
    )
    wf.add_argument("name", help=f"one of: {', '.join(_fetchable_names())}")
    wf.set_defaults(func=cmd_weights_fetch)
    return p


def run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.func(args))
    except SegappError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        print("error: out of memory (try a smaller image)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI turns anything else into one line
        if args.debug:
            raise
        print(
            f"error: internal failure: {type(exc).__name__}: {exc} (rerun with --debug)",
            file=sys.stderr,
        )
        return 1


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
