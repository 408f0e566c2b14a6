"""`segapp train`: from scratch (a preset) or from loaded weights (`--init-from`); and
`segapp train-video`: a trained model's video adapter (segapp/video/adapter.py).

Registered by segapp.cli with `add_train_command(sub)` and `add_train_video_command(sub)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segapp.argtypes import at_least
from segapp.config import SEGAPP_FORMATS
from segapp.data.answers import ANSWER_ORDERS, MULTI_ORDERS
from segapp.data.videos import FRAMES as CLIP_FRAMES
from segapp.errors import InputError

if TYPE_CHECKING:
    from segapp.build import Bundle

# what trains by default when starting from a published LLaVA / LISA checkpoint (LISA's recipe:
# the [SEG] head, SAM's mask decoder, the token embeddings and LM head, LoRA on the LLM)
CHECKPOINT_TRAINABLE = "text_hidden_fcs,sam.mask_decoder,llm.model.embed_tokens,llm.lm_head"


def _with_video_pointer(bundle: Bundle, width: int) -> Bundle:
    """`bundle` with a freshly initialised video `[SEG]` pointer of `width` (a model that
    already has one keeps it: its width must match)."""
    from segapp.modeling.builders import init_weights_
    from segapp.modeling.pointer import SegPointer

    model, cfg = bundle.model, bundle.config
    if cfg.video_seg_pointer:
        if cfg.video_seg_pointer != width:
            raise InputError(
                f"the model's video pointer has width {cfg.video_seg_pointer}, not {width}",
                "--video-seg-pointer",
            )
        return bundle
    if model.seg_pointer is None:
        raise InputError("--video-seg-pointer needs a model with a [SEG] pointer", "--init-from")
    head = SegPointer(cfg.llm_hidden, width)
    init_weights_(head)
    model.video_seg_pointer = head.to(model.device)
    return dataclasses.replace(bundle, config=cfg.replace(video_seg_pointer=width))


def cmd_train(args: argparse.Namespace) -> int:
    from segapp.cli import load_options, pick_device
    from segapp.config import MODEL_PRESETS, TrainConfig
    from segapp.train import train

    tcfg = TrainConfig()
    changes = {
        k: getattr(args, k)
        for k in (
            "steps",
            "sam_warmup_steps",
            "images_per_batch",
            "queries_per_image",
            "lr",
            "threads",
            "workers",
            "seed",
            "video_fraction",
            "target_weight",
            "target_marks",
            "token_probe",
            "dense_probe",
            "relation_probe",
            "answer_order",
            "multi_order",
            "probe_swap",
            "video_pointer",
            "video_token_losses",
            "video_clips",
            "video_sam_frames",
        )
    }
    if args.video_clips is not None and args.video_clips < 1:
        raise InputError(
            f"--video-clips must be at least 1, got {args.video_clips}", "--video-clips"
        )
    if args.video_sam_frames is not None and not 1 <= args.video_sam_frames <= CLIP_FRAMES:
        raise InputError(
            f"--video-sam-frames must be from 1 to {CLIP_FRAMES} (a training clip's frames), "
            f"got {args.video_sam_frames}",
            "--video-sam-frames",
        )
    if args.init_from and args.sam_warmup_steps is None:
        changes["sam_warmup_steps"] = 0  # a loaded SAM is already trained
    tcfg = tcfg.replace(**{k: v for k, v in changes.items() if v is not None})
    bundle, trainable, lora_r = None, None, args.lora_r or 0
    device = pick_device(args.device)
    if args.init_from:
        if args.preset is not None:
            raise InputError(
                "--preset builds a model from scratch; with --init-from the model's shape comes "
                "from the loaded weights",
                "--preset",
            )
        from dataclasses import replace

        from segapp.build import load_model

        options = replace(load_options(args), new_head=True)
        bundle = load_model(args.init_from, device=device, options=options)
        published = bundle.config.chat_format not in SEGAPP_FORMATS
        train_text = args.train or (CHECKPOINT_TRAINABLE if published else "")
        trainable = [t.strip() for t in train_text.split(",") if t.strip()] or None
        if args.lora_r is None and published:
            lora_r = 8
    elif args.train or args.lora_r:
        raise InputError("--train and --lora-r apply to --init-from", "--train")
    model_cfg = MODEL_PRESETS[args.preset or "tiny"]
    # architecture flags: a loaded model keeps the shape (and chat format) it was trained with
    shape = {
        "vision_stem": args.vision_stem,
        "projector_norm": args.projector_norm or None,
        "prefix_attention": args.prefix_attention or None,
        "chat_format": args.chat_format,
        "llm_layers": args.llm_layers,
    }
    if args.llm_layers is not None and args.llm_layers < 1:
        raise InputError(f"--llm-layers must be at least 1, got {args.llm_layers}", "--llm-layers")
    if args.video_seg_pointer is not None:
        if args.video_seg_pointer < 1:
            raise InputError(
                f"--video-seg-pointer must be at least 1, got {args.video_seg_pointer}",
                "--video-seg-pointer",
            )
        if bundle is None:
            shape["video_seg_pointer"] = args.video_seg_pointer
        else:  # a fresh video pointer on a loaded model (the rest of its shape is kept)
            bundle = _with_video_pointer(bundle, args.video_seg_pointer)
    for field, value in shape.items():
        if value is None:
            continue
        if args.init_from:
            flag = "--" + field.replace("_", "-")
            raise InputError(f"{flag} applies to a model built from scratch, not --init-from", flag)
        model_cfg = model_cfg.replace(**{field: value})
    last = train(
        Path(args.out),
        model_cfg=model_cfg,
        train_cfg=tcfg,
        resume=not args.no_resume,
        device=device,
        init_from=bundle,
        trainable=trainable,
        lora_r=lora_r,
    )
    print(json.dumps({"out": args.out, **last}))
    return 0


def add_train_command(sub: Any) -> None:
    """Add `segapp train` to the CLI's subparsers."""
    t = sub.add_parser(
        "train",
        help="train a preset from scratch, or a loaded model further, on the synthetic world",
        description="From scratch (--preset, default tiny), or from loaded weights "
        "(--init-from: segapp weights, a LISA checkpoint, or a plain LLaVA-v1 folder plus --sam, "
        "whose [SEG] head is trained here). The result is a segapp weights directory (--out).",
    )
    t.add_argument("--preset", choices=["tiny"], help="model to build from scratch (tiny)")
    t.add_argument(
        "--chat-format",
        choices=list(SEGAPP_FORMATS),
        help="prompt template of a model built from scratch (default: the preset's); "
        "segapp_text_first puts the instruction before the image tokens",
    )
    t.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start from this preset name or weights / checkpoint directory",
    )
    t.add_argument(
        "--train",
        metavar="PREFIXES",
        help="comma list of parameter-name prefixes that train with --init-from (default: all "
        f"for segapp weights; {CHECKPOINT_TRAINABLE} for LLaVA / LISA checkpoints)",
    )
    t.add_argument(
        "--lora-r",
        type=int,
        help="LoRA rank on the LLM's q/v projections with --init-from (default 8 for LLaVA / "
        "LISA checkpoints, 0 = none for segapp weights); merged into the saved weights",
    )
    t.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="weights dtype while training (default fp32)",
    )
    t.add_argument("--vision-tower", help="CLIP folder for a LLaVA / LISA checkpoint")
    t.add_argument("--sam", help="segment-anything .pth (required for a plain LLaVA folder)")
    t.set_defaults(load_in_8bit=False, load_in_4bit=False)
    t.add_argument("--out", default="runs/tiny")
    t.add_argument("--steps", type=at_least(0), help="joint-stage steps (default 2500)")
    t.add_argument(
        "--sam-warmup-steps", type=at_least(0), help="stage-1 steps, SAM alone (default 300)"
    )
    t.add_argument(
        "--images-per-batch",
        type=at_least(1),
        help="scenes per step; both image encoders run once per scene (default 8)",
    )
    t.add_argument(
        "--queries-per-image",
        type=at_least(1),
        help="instructions per scene, each its own conversation for the LLM (default 3)",
    )
    t.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    t.add_argument(
        "--video-fraction",
        type=float,
        help="share of joint steps that also train on a synthetic video clip (default 0)",
    )
    t.add_argument(
        "--target-weight",
        type=float,
        help="weight of a loss marking the image tokens on each query's targets (default 0); "
        "the head is saved with the model and completes multi-target answers",
    )
    t.add_argument(
        "--target-marks",
        choices=["half", "every"],
        help="the target head's positive tokens: those a target covers by half ('half', the "
        "default) or also each target's most-covered token ('every')",
    )
    t.add_argument(
        "--token-probe",
        type=float,
        help="weight of the object probe on the LLM's image tokens (projector output), training "
        "only (default 0)",
    )
    t.add_argument(
        "--dense-probe",
        type=float,
        help="weight of the object probe read per token: each vision patch and LLM image token "
        "names the attributes of the object covering it (training only; default 0)",
    )
    t.add_argument(
        "--relation-probe",
        type=float,
        help="weight of a probe asking each object's tokens how many objects share its colour / "
        "shape / size / texture and whether it is the largest or smallest of its group "
        "(training only; default 0)",
    )
    t.add_argument(
        "--answer-order",
        choices=list(ANSWER_ORDERS),
        help="one-target answers: [SEG] then the description (default, what the model answers "
        "with), the description then [SEG] (the scaffold of the bundled recipe's first run), or "
        "restate: the instruction's own phrase copied before [SEG]; restate_reason_after: the "
        "same, with a leading reason (implicit instructions) moved after the description",
    )
    t.add_argument(
        "--multi-order",
        choices=list(MULTI_ORDERS),
        help="multi-target answers: the count, then the targets (default); list_first: the "
        "targets left to right, then the count; group_first: a first [SEG] for the whole "
        "group, whose mask's connected components give the count at prediction time",
    )
    t.add_argument(
        "--probe-swap",
        type=float,
        help="share of scenes the object probe also reads with colour channels reordered "
        "(default 0)",
    )
    t.add_argument("--video-clips", type=int, help="synthetic clips per video step (default 1)")
    t.add_argument(
        "--video-sam-frames",
        type=int,
        help="frames of each training clip SAM decodes the [SEG] prompt on (default 2)",
    )
    t.add_argument(
        "--video-pointer",
        action="store_true",
        default=None,
        help="video samples also train the [SEG] pointer per frame and prompt SAM with its "
        "point track, as `segapp video` does",
    )
    t.add_argument(
        "--video-token-losses",
        action="store_true",
        default=None,
        help="video samples also train the target head and the [SEG] pointer over every LLM "
        "frame's visual tokens (SAM still prompted with [SEG] alone)",
    )
    t.add_argument(
        "--vision-stem",
        choices=["patch", "conv", "conv4"],
        help="vision tower input layer of a model built from scratch: patch (default), conv "
        "(3 x 3 stride-2 convolutions) or conv4 (a 4 x 4 patchify layer, then conv's; ~3x cheaper)",
    )
    t.add_argument(
        "--llm-layers",
        type=int,
        metavar="N",
        help="decoder layers of the LLM of a model built from scratch (tiny: 4)",
    )
    t.add_argument(
        "--projector-norm",
        action="store_true",
        help="LayerNorm on the projector output of a model built from scratch (image tokens "
        "at text-embedding scale, so patch positions stay readable)",
    )
    t.add_argument(
        "--prefix-attention",
        action="store_true",
        help="build the model from scratch as a prefix LM: instruction and image tokens attend "
        "to each other both ways, the answer causally",
    )
    t.add_argument(
        "--video-seg-pointer",
        type=int,
        metavar="WIDTH",
        help="a second [SEG] pointer of this width for video, trained by "
        "--video-token-losses so the image pointer is left to images; it gives `segapp video` "
        "its point track (built with the model from scratch, or added as a fresh head to an "
        "--init-from segapp model)",
    )
    t.add_argument("--threads", type=int)
    t.add_argument("--workers", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", default="auto")
    t.add_argument(
        "--no-resume", action="store_true", help="start over even if a checkpoint exists"
    )
    t.set_defaults(func=cmd_train)


def cmd_train_video(args: argparse.Namespace) -> int:
    from segapp.build import load_model
    from segapp.cli import pick_device
    from segapp.video.adapter import AdapterConfig, fit_video_adapter

    acfg = AdapterConfig()
    changes = {
        k: getattr(args, k)
        for k in ("steps", "lr", "presence", "answer_order", "seed", "threads")
        if getattr(args, k) is not None
    }
    if args.frames:
        changes["frames"] = tuple(args.frames)
    acfg = dataclasses.replace(acfg, **changes)
    acfg.check()  # before the model loads
    out = Path(args.out)
    if out.resolve() == Path(args.init_from).resolve():
        raise InputError("--out must not be the --init-from directory", "--out")
    bundle = load_model(args.init_from, device=pick_device(args.device))
    last = fit_video_adapter(bundle, out, acfg, progress=not args.quiet)
    print(json.dumps({"out": str(out), **last}))
    return 0


def add_train_video_command(sub: Any) -> None:
    """Add `segapp train-video` to the CLI's subparsers."""
    t = sub.add_parser(
        "train-video",
        help="train a segapp model's video adapter (motion map + video pointer), images untouched",
        description="Freeze a trained segapp model and train only what video reads: a motion "
        "map added to each frame token (how it differs from its patch's mean over the frames) "
        "and a video [SEG] pointer that says where the target is on each frame and whether it "
        "is there. Image answers and masks stay exactly as they were. The result is a segapp "
        "weights directory (--out).",
    )
    t.add_argument("--init-from", default="tiny", metavar="MODEL", help="preset or weights dir")
    t.add_argument("--out", required=True, help="weights directory to write")
    t.add_argument("--steps", type=at_least(0), help="synthetic clips, one per step (default 4000)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    t.add_argument(
        "--presence",
        type=float,
        help="probability the video pointer needs on a frame's best token for the frame to keep "
        "its mask, saved with the model (default 0.3)",
    )
    t.add_argument(
        "--answer-order",
        choices=list(ANSWER_ORDERS),
        help="how the model words its answers (default restate, the bundled recipe's)",
    )
    t.add_argument(
        "--frames",
        type=int,
        nargs="+",
        metavar="N",
        help="LLM frames per training clip, taken in turn (default 4; `--frames 4 8` also "
        "trains for `segapp video --frames 8`)",
    )
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    t.add_argument("--device", default="auto")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train_video)
