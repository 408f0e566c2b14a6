"""`segapp personalize`, `segapp eval personal` and `segapp bench personalize`.

Registered by segapp.cli: `add_personalize_command(sub)`, `add_eval_personal(eval_sub)`,
`add_bench_personalize(bench_sub)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _store(args: argparse.Namespace):
    from segapp.personalize.store import ConceptStore

    return ConceptStore(Path(args.store) if args.store else None)


def add_store_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--store", help="concept store folder (default weights/adapters)")


def add_personalize_command(sub: Any) -> None:
    p = sub.add_parser(
        "personalize",
        help="teach a new object from 1-5 (image, mask) shots; list or delete a user's concepts",
        description='Fit concept NAME for user U; then use it as `segment IMG "segment <NAME>" '
        "--user U`.",
    )
    p.add_argument("--user", required=True, help="user id (a-z, 0-9, '-', '_')")
    p.add_argument("--name", help="concept name; instructions refer to it as <name>")
    p.add_argument("--images", nargs="+", help="1-5 images showing the object")
    p.add_argument("--masks", nargs="+", help="one mask PNG per image (object = white)")
    p.add_argument("--steps", type=int, help="LoRA optimisation steps (default 200)")
    p.add_argument("--method", default="lora", choices=["lora", "persam"])
    p.add_argument("--list", action="store_true", help="list the user's concepts")
    p.add_argument("--delete", action="store_true", help="delete concept --name")
    p.add_argument("--model", default="tiny", help="preset name or weights directory")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_store_args(p)
    p.set_defaults(func=cmd_personalize)


def _read_mask(path: str):
    import numpy as np
    from PIL import Image

    from segapp.errors import InputError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L") if im.mode in ("1", "P", "RGB", "RGBA", "LA") else im)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read mask: {exc}", path) from None


def cmd_personalize(args: argparse.Namespace) -> int:
    from segapp.errors import InputError
    from segapp.personalize.store import validate_slug

    store = _store(args)
    validate_slug(args.user, "user")
    if args.list:
        infos = store.list(args.user)
        if args.json:
            print(json.dumps({"user": args.user, "concepts": [i.to_dict() for i in infos]}))
        else:
            for i in infos:
                print(f"{i.token}  {i.method}  {i.shots} shot(s)  {i.size_bytes} B  {i.created}")
            if not infos:
                print(f"user {args.user!r} has no concepts")
        return 0
    if not args.name:
        raise InputError("give --name (or --list)", "--name")
    if args.delete:
        store.delete(args.user, args.name)
        print(
            json.dumps({"deleted": f"{args.user}/{args.name}"})
            if args.json
            else f"deleted <{args.name}> of {args.user}"
        )
        return 0
    if not args.images or not args.masks:
        raise InputError("give --images and --masks (one mask per image)", "--images")
    from segapp.build import load_model
    from segapp.cli import pick_device
    from segapp.images import load_image
    from segapp.personalize.fit import fit_concept

    validate_slug(args.name, "name")
    images = [load_image(p) for p in args.images]
    masks = [_read_mask(p) for p in args.masks]
    bundle = load_model(args.model, device=pick_device(args.device))
    from tqdm import tqdm

    bar = tqdm(total=100, desc=f"fit <{args.name}>", disable=args.quiet or None, unit="%")

    def progress(fraction: float, message: str) -> None:
        bar.n = int(100 * fraction)
        bar.set_postfix_str(message)
        bar.refresh()

    try:
        info = fit_concept(
            bundle,
            store,
            args.user,
            args.name,
            images,
            masks,
            steps=args.steps,
            method=args.method,
            progress=progress,
        )
    finally:
        bar.close()
    if args.json:
        print(json.dumps(info.to_dict()))
    else:
        print(
            f"fitted {info.token} for {info.user} ({info.method}, {info.shots} shot(s), "
            f"{info.fit_seconds:.1f} s, {info.size_bytes} B) in {info.path}",
            file=sys.stdout,
        )
    return 0


def add_eval_personal(eval_sub: Any) -> None:
    e = eval_sub.add_parser(
        "personal", help="mIoU of base / PerSAM / LoRA on novel concepts, 1-3-5 shots"
    )
    e.add_argument("--model", default="tiny")
    e.add_argument("--device", default="auto")
    e.add_argument("--concepts", type=int, default=4, help="novel concepts (default 4)")
    e.add_argument("--shots", default="1,3,5", help="comma list of shot counts")
    e.add_argument("--scenes", type=int, default=20, help="positive test scenes per concept")
    e.add_argument("--negatives", type=int, default=20, help="concept-free scenes per concept")
    e.add_argument("--steps", type=int, help="LoRA steps (default: the fit default)")
    e.add_argument("--methods", default="base,persam,lora")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval_personal)


def cmd_eval_personal(args: argparse.Namespace) -> int:
    from segapp.build import load_model
    from segapp.cli import pick_device
    from segapp.errors import InputError
    from segapp.personalize.evaluate import evaluate_personal

    try:
        shots = tuple(int(s) for s in args.shots.split(","))
    except ValueError:
        raise InputError(f"bad shot list {args.shots!r}", "--shots") from None
    methods = tuple(m.strip() for m in args.methods.split(","))
    bad = [m for m in methods if m not in ("base", "persam", "lora")]
    if bad or any(not 1 <= k <= 5 for k in shots):
        raise InputError("methods are base, persam, lora; shots 1 to 5", "--methods/--shots")
    bundle = load_model(args.model, device=pick_device(args.device))
    summary = evaluate_personal(
        bundle,
        concepts=args.concepts,
        shots=shots,
        scenes=args.scenes,
        negatives=args.negatives,
        steps=args.steps,
        methods=methods,
        seed=args.seed,
        progress=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)),
    )
    print(json.dumps(summary, indent=2))
    return 0


def add_bench_personalize(bench_sub: Any) -> None:
    b = bench_sub.add_parser(
        "personalize", help="fit time, peak memory, adapter size, adapter switch time"
    )
    b.add_argument("--model", default="tiny")
    b.add_argument("--shots", type=int, default=5)
    b.add_argument("--steps", type=int, help="LoRA steps (default: the fit default)")
    b.add_argument("--switches", type=int, default=20)
    b.set_defaults(func=cmd_bench_personalize)


def cmd_bench_personalize(args: argparse.Namespace) -> int:
    from segapp.build import load_model
    from segapp.personalize.evaluate import bench_personalize

    bundle = load_model(args.model)
    result = bench_personalize(bundle, shots=args.shots, steps=args.steps, switches=args.switches)
    print(json.dumps(result, indent=2))
    return 0


def personal_segmenter(args: argparse.Namespace, bundle: Any) -> Any:
    """`segment --user` / `batch --user`: a PersonalSegmenter for that user."""
    from segapp.personalize.segmenter import PersonalSegmenter

    return PersonalSegmenter(bundle, _store(args), user=args.user)
