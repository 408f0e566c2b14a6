"""`segapp serve`, `segapp demo` and `segapp bench serve`: argument parsing over server / ui / bench.

Registered by segapp.cli with `add_serve_commands(sub)` and `add_serve_bench(bench_sub)`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from segapp.argtypes import at_least
from segapp.errors import InputError


def _service_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--model", default="tiny", help="preset name or weights directory")
    sp.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda:N")
    sp.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 (or fp16) on CUDA, the weights' dtype on CPU",
    )
    sp.add_argument(
        "--max-pixels", type=at_least(1), default=16_000_000, help="refuse larger images"
    )
    sp.add_argument("--max-pending", type=at_least(1), default=16, help="queue size before 503")
    sp.add_argument("--max-batch", type=at_least(1), default=8, help="requests decoded together")
    sp.add_argument("--concepts", help="per-user concept store (default <weights>/adapters)")


def _service(args: argparse.Namespace) -> Any:
    from segapp.service import Service, ServiceConfig

    return Service(
        ServiceConfig(
            model=args.model,
            device=args.device,
            precision=args.precision,
            max_pixels=args.max_pixels,
            max_pending=args.max_pending,
            max_batch=args.max_batch,
            concepts_root=Path(args.concepts) if args.concepts else None,
        )
    )


def add_serve_commands(sub: Any) -> None:
    """Add `segapp serve` and `segapp demo` to the CLI's subparsers."""
    s = sub.add_parser("serve", help="REST backend (FastAPI/uvicorn) over the model")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--tokens", help="file of 'token user' lines: require bearer tokens")
    s.add_argument("--max-upload-mb", type=at_least(1), default=64, help="request body limit")
    _service_args(s)
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="Gradio web UI (in process, or over --backend URL)")
    d.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--backend", help="URL of a `segapp serve` backend: the UI holds no model")
    d.add_argument("--token", help="bearer token for --backend (or SEGAPP_TOKEN)")
    _service_args(d)
    d.set_defaults(func=cmd_demo)


def cmd_serve(args: argparse.Namespace) -> int:
    from segapp.server import read_tokens, serve

    tokens = read_tokens(Path(args.tokens)) if args.tokens else None
    print(f"segapp serve: http://{args.host}:{args.port} (model {args.model})", flush=True)
    serve(
        _service(args),
        host=args.host,
        port=args.port,
        tokens=tokens,
        max_upload_bytes=args.max_upload_mb * 2**20,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from segapp.client import LocalClient, RemoteClient

    try:
        from ui.app import launch
    except ImportError as exc:
        raise InputError(f"the UI needs gradio: pip install -e . ({exc})", "segapp demo") from None
    if args.backend:
        client: Any = RemoteClient(args.backend, token=args.token or os.environ.get("SEGAPP_TOKEN"))
        client.info()  # fail now, with one line, if the backend is unreachable
    else:
        service = _service(args)
        service.bundle  # noqa: B018 - load in main, not at import nor on the first click
        client = LocalClient(service)
    print(f"segapp demo: http://{args.host}:{args.port}", flush=True)
    launch(
        client,
        host=args.host,
        port=args.port,
        local_folders=not args.backend,
        max_pixels=args.max_pixels,
    )
    return 0


def add_serve_bench(bench_sub: Any) -> None:
    """Add `segapp bench serve` to the `segapp bench` subparsers."""
    b = bench_sub.add_parser(
        "serve", help="load test of `segapp serve` on loopback: p50/p95 latency, throughput, 503s"
    )
    b.add_argument("--model", default="tiny")
    b.add_argument("--clients", type=at_least(1), default=20, help="concurrent clients (20)")
    b.add_argument("--requests", type=at_least(1), default=5, help="requests per client (5)")
    b.add_argument("--max-pending", type=at_least(1), default=16, help="server queue size")
    b.add_argument("--max-batch", type=at_least(1), default=8, help="server batch size")
    b.add_argument("--url", help="bench a running server instead of starting one")
    b.set_defaults(func=cmd_bench_serve)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from segapp.serve_bench import bench_serve

    result = bench_serve(
        args.model,
        clients=args.clients,
        requests=args.requests,
        max_pending=args.max_pending,
        max_batch=args.max_batch,
        url=args.url,
    )
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1
