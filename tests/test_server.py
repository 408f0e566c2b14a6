"""`segapp serve` as a real process on 127.0.0.1: same masks as the CLI, clear errors that leave
the server serving, bearer tokens, and the bounded load test of `segapp bench serve`."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from segapp.cli import run
from segapp.serve_bench import bench_serve, free_port, running

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"
CASES = [
    ("05_implicit.png", "Segment the thing that is the colour of a banana in this image."),
    ("06_multi.png", "all the circles"),
]
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bundled tiny model behind bearer tokens, a 2 MiB upload limit and 1 MP images."""
    folder = tmp_path_factory.mktemp("serve")
    tokens = folder / "tokens.txt"
    tokens.write_text("".join(f"{t} {u}\n" for t, u in TOKENS.items()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["serve", "--port", str(port), "--tokens", str(tokens), "--max-upload-mb", "2"]
    argv += ["--max-pixels", "1000000", "--concepts", str(folder / "concepts")]
    with running(argv, url):
        yield url


def _post(url: str, image: bytes, instruction: str, token: str = "tok-alice") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/segment",
        data={"instruction": instruction},
        files={"image": ("x.png", image, "image/png")},
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )


def _cli_record(image: Path, instruction: str, out: Path, capsys) -> dict:
    assert run(["segment", str(image), instruction, "--out-dir", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(("name", "instruction"), CASES)
def test_rest_gives_the_cli_masks(server: str, name: str, instruction: str, tmp_path, capsys):
    want = _cli_record(EXAMPLES / name, instruction, tmp_path, capsys)
    response = _post(server, (EXAMPLES / name).read_bytes(), instruction)
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["answer"] == want["answer"]
    assert got["masks"] == want["masks"]  # RLE, polygons, bbox, score, label: all equal
    assert got["masks"], "the tiny model segments something in these examples"


def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(server: str) -> None:
    good = (EXAMPLES / CASES[1][0]).read_bytes()
    huge = io.BytesIO()
    Image.fromarray(np.zeros((1100, 1100, 3), np.uint8)).save(huge, format="PNG")
    cases = [
        (b"this is not an image\n", "all the circles", 400, "not an image file"),
        (huge.getvalue(), "all the circles", 413, "image too large: 1100x1100"),
        (good, "   ", 400, "instruction is empty"),
        (good, "x" * 3000, 400, "instruction too long"),
        (good, "segment <nosuch>", 400, "no concept <nosuch>"),
        (good, "segment <Bad Name!>", 200, None),  # not a concept reference: plain text
        (bytes(3 * 2**20), "all the circles", 413, "upload too large"),
    ]
    for data, instruction, status, message in cases:
        response = _post(server, data, instruction)
        assert response.status_code == status, (instruction[:20], response.text)
        if message:
            assert message in response.json()["error"]
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"
    assert _post(server, good, CASES[1][1]).status_code == 200


def test_tokens_decide_the_user(server: str) -> None:
    good = (EXAMPLES / CASES[1][0]).read_bytes()
    assert _post(server, good, "all the circles", token="wrong").status_code == 401
    response = httpx.get(f"{server}/v1/concepts", headers={"Authorization": "Bearer tok-bob"})
    assert response.json()["user"] == "bob"
    # asking for someone else with ?user= does not work: the token decides
    response = httpx.get(
        f"{server}/v1/concepts",
        params={"user": "alice"},
        headers={"Authorization": "Bearer tok-bob"},
    )
    assert response.json()["user"] == "bob"
    missing = httpx.get(f"{server}/v1/jobs/per-0-x", headers={"Authorization": "Bearer tok-bob"})
    assert missing.status_code == 404


def test_health_version_refine_and_batch(server: str) -> None:
    auth = {"Authorization": "Bearer tok-alice"}
    version = httpx.get(f"{server}/version", timeout=10).json()
    assert version["segapp"] and version["model"] == "tiny" and version["loaded"]
    image = (EXAMPLES / CASES[0][0]).read_bytes()
    base = _post(server, image, CASES[0][1]).json()
    x0, y0, x1, y1 = base["masks"][0]["bbox"]
    refined = httpx.post(
        f"{server}/v1/refine",
        data={
            "instruction": CASES[0][1],
            "points": json.dumps([[(x0 + x1) / 2, (y0 + y1) / 2, 1]]),
        },
        files={"image": ("x.png", image, "image/png")},
        headers=auth,
        timeout=120,
    )
    assert refined.status_code == 200, refined.text
    mask = refined.json()["mask"]
    assert mask["rle"]["size"] == [256, 256] and mask["area"] > 0
    outside = httpx.post(
        f"{server}/v1/refine",
        data={"instruction": CASES[0][1], "points": "[[999, 5, 1]]"},
        files={"image": ("x.png", image, "image/png")},
        headers=auth,
    )
    assert outside.status_code == 400 and "outside" in outside.json()["error"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, _ in CASES:
            archive.writestr(f"pics/{name}", (EXAMPLES / name).read_bytes())
        archive.writestr("../evil.png", image)  # skipped: escapes the folder
    response = httpx.post(
        f"{server}/v1/batch",
        data={"instruction": "all the circles"},
        files={"archive": ("in.zip", buffer.getvalue(), "application/zip")},
        headers=auth,
        timeout=300,
    )
    assert response.status_code == 200, response.text[:300]
    names = zipfile.ZipFile(io.BytesIO(response.content)).namelist()
    assert "coco.json" in names and "results.jsonl" in names
    rows = zipfile.ZipFile(io.BytesIO(response.content)).read("results.jsonl").splitlines()
    assert sorted(json.loads(r)["image"] for r in rows) == sorted(f"pics/{n}" for n, _ in CASES)


def test_load_20_clients_x_5_requests_every_answer_is_right_or_503() -> None:
    """A small queue forces 503s: each is immediate with Retry-After, each 200 is exactly the
    answer its request gets alone, and the server is healthy afterwards."""
    result = bench_serve("tiny", clients=20, requests=5, max_pending=4, max_batch=4)
    assert result["answered"] == result["sent"] == 100
    assert result["ok_200"] > 0 and result["busy_503"] > 0
    assert result["busy_with_retry_after"] == result["busy_503"]
    assert result["other_status"] == []
    assert result["mismatched_results"] == 0
    assert result["healthy_after"] and result["ok"]


def _clip(path: Path, frames: int = 6) -> Path:
    """A short synthetic clip written as MJPG AVI."""
    import cv2

    from segapp.data.videos import generate_clip

    clip = generate_clip("test", 3, frames=frames)
    h, w = clip.frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (w, h))
    for frame in clip.frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_video_job_reports_progress_stats_and_serves_the_overlay(
    server: str, tmp_path: Path
) -> None:
    pytest.importorskip("segapp.video.pipeline")
    auth = {"Authorization": "Bearer tok-alice"}
    video = _clip(tmp_path / "clip.avi")
    started = httpx.post(
        f"{server}/v1/video",
        data={"instruction": "all the circles", "merge": "0.7"},
        files={"video": ("clip.avi", video.read_bytes(), "video/x-msvideo")},
        headers=auth,
    )
    assert started.status_code == 202, started.text
    job = started.json()
    seen = {round(job["progress"], 2)}  # a short job may be done by the first poll
    deadline = time.monotonic() + 300
    while job["state"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = httpx.get(f"{server}/v1/jobs/{job['id']}", headers=auth).json()
        seen.add(round(job["progress"], 2))
    assert job["state"] == "done", job
    stats = job["result"]["stats"]
    assert stats["frames"] == 6 and 0 < stats["visual_tokens_kept"] < stats["visual_tokens_total"]
    assert len(seen) >= 2 and max(seen) == 1.0  # progress moved, and ended at 100%
    # another user cannot see it; its owner can fetch the overlay video
    other = httpx.get(f"{server}/v1/jobs/{job['id']}", headers={"Authorization": "Bearer tok-bob"})
    assert other.status_code == 404
    overlay = httpx.get(f"{server}/v1/jobs/{job['id']}/overlay", headers=auth)
    assert overlay.status_code == 200 and len(overlay.content) > 1000
