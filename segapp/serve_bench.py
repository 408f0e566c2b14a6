"""`segapp bench serve`: a bounded load test of `segapp serve` on loopback.

Phase 1 asks each client's (image, instruction) once, one request at a time: the reference
answers and the sequential throughput. Phase 2 runs `clients` threads x `requests` each, all at
once. Every phase-2 answer must be a 200 equal to its reference (same answer, same masks: no
request gets another's result) or a 503 with Retry-After; the server must be healthy after.
Reported: p50 / p95 latency of the 200s, throughput, and concurrent / sequential throughput.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from segapp.errors import SegappError

START_LIMIT_S = 180.0
REQUEST_LIMIT_S = 300.0
INSTRUCTIONS = ("all the circles", "the largest red object", "segment the blue square")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(
    url: str, process: subprocess.Popen | None, limit_s: float, *, path: str = "/health"
) -> None:
    """Poll `url` + `path` until 200, the process exits, or `limit_s` passes."""
    import httpx

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SegappError(f"the server exited with code {process.returncode}", url)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise SegappError(f"the server did not become healthy in {limit_s:.0f} s", url)


@contextlib.contextmanager
def running(
    argv: Sequence[str], url: str, *, env: dict[str, str] | None = None, health: str = "/health"
) -> Iterator[Any]:
    """Run `python -m segapp.cli ARGV...` until the block ends (terminate, then kill); the
    block starts once `url` + `health` answers 200 (at most START_LIMIT_S)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "segapp.cli", *argv],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        try:
            wait_healthy(url, process, START_LIMIT_S, path=health)
        except SegappError:
            process.kill()
            _, err = process.communicate(timeout=10)
            raise SegappError(f"server failed to start: {err.decode()[-500:]}", url) from None
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _png(image: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _ask(client: Any, data: bytes, instruction: str, name: str) -> tuple[int, dict, dict, float]:
    t0 = time.perf_counter()
    response = client.post(
        "/v1/segment",
        data={"instruction": instruction},
        files={"image": (name, data, "image/png")},
        timeout=REQUEST_LIMIT_S,
    )
    took = time.perf_counter() - t0
    body = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    return response.status_code, body, dict(response.headers), took


def _key(body: dict) -> tuple:
    return (
        body.get("answer"),
        tuple((m["rle"]["counts"], m["score"]) for m in body.get("masks", [])),
    )


def bench_serve(
    model: str = "tiny",
    *,
    clients: int = 20,
    requests: int = 5,
    max_pending: int = 16,
    max_batch: int = 8,
    url: str | None = None,
) -> dict[str, Any]:
    """Start `segapp serve` on 127.0.0.1 (or use `url`), load it, check and time the answers."""
    import httpx

    from segapp.benchmarks import machine
    from segapp.data.instructions import generate_sample

    asks = [
        (_png(generate_sample("test", i).image), INSTRUCTIONS[i % len(INSTRUCTIONS)], f"c{i}.png")
        for i in range(clients)
    ]
    own = url is None
    port = free_port()
    url = url or f"http://127.0.0.1:{port}"
    argv = ["serve", "--host", "127.0.0.1", "--port", str(port), "--model", model]
    argv += ["--max-pending", str(max_pending), "--max-batch", str(max_batch)]
    server = running(argv, url) if own else contextlib.nullcontext()
    with server, httpx.Client(base_url=url) as http:
        _ask(http, *asks[0])  # warm-up
        t0 = time.perf_counter()
        reference = {}
        for data, text, name in asks:
            status, body, _, _ = _ask(http, data, text, name)
            if status != 200:
                raise SegappError(f"reference request failed with HTTP {status}: {body}", url)
            reference[name] = _key(body)
        sequential_s = time.perf_counter() - t0

        outcomes: list[tuple[str, int, dict, dict, float]] = []
        lock = threading.Lock()

        def client_loop(index: int) -> None:
            data, text, name = asks[index]
            with httpx.Client(base_url=url) as own_http:
                for _ in range(requests):
                    try:
                        status, body, headers, took = _ask(own_http, data, text, name)
                    except httpx.HTTPError as exc:
                        status, body, headers, took = -1, {"error": str(exc)}, {}, 0.0
                    with lock:
                        outcomes.append((name, status, body, headers, took))

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=REQUEST_LIMIT_S * requests)
        load_s = time.perf_counter() - t0
        healthy_after = http.get("/health", timeout=10).status_code == 200
        after = _ask(http, *asks[0])
    ok = [o for o in outcomes if o[1] == 200]
    busy = [o for o in outcomes if o[1] == 503]
    mismatched = sum(_key(body) != reference[name] for name, _, body, _, _ in ok)
    latencies = sorted(o[4] for o in ok)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None
    throughput = len(ok) / load_s if load_s > 0 else 0.0
    sequential = clients / sequential_s
    result = {
        "bench": "serve",
        "model": model,
        "clients": clients,
        "requests_per_client": requests,
        "server": {"max_pending": max_pending, "max_batch": max_batch, "url": url},
        "sent": clients * requests,
        "answered": len(outcomes),
        "ok_200": len(ok),
        "busy_503": len(busy),
        "busy_with_retry_after": sum("retry-after" in o[3] for o in busy),
        "other_status": sorted({o[1] for o in outcomes} - {200, 503}),
        "mismatched_results": mismatched,
        "healthy_after": healthy_after
        and after[0] == 200
        and _key(after[1]) == reference[asks[0][2]],
        "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "latency_p95_s": round(p95, 4) if p95 is not None else None,
        "load_wall_s": round(load_s, 3),
        "throughput_rps": round(throughput, 3),
        "sequential_rps": round(sequential, 3),
        "concurrent_vs_sequential": round(throughput / sequential, 2),
        "machine": machine(),
    }
    result["ok"] = bool(
        result["answered"] == result["sent"]
        and not result["other_status"]
        and result["busy_with_retry_after"] == result["busy_503"]
        and mismatched == 0
        and result["healthy_after"]
    )
    return result
