"""`segapp demo` as a real process on 127.0.0.1, driven by headless Chromium (Playwright, Debian's
chromium) and by gradio_client. Screenshots go to $SEGAPP_ARTIFACTS/screenshots (default
out/screenshots)."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from segapp.cli import run
from segapp.serve_bench import free_port, running

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "data" / "examples"
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(os.environ.get("SEGAPP_ARTIFACTS", ROOT / "out")) / "screenshots"
CASE = ("06_multi.png", "all the circles")
CONCEPT_SHOT = "05_implicit.png"  # its target (the yellow circle) becomes the concept
WAIT_MS = 240_000


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    concepts = tmp_path_factory.mktemp("ui") / "concepts"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = ["demo", "--port", str(port), "--concepts", str(concepts), "--max-pixels", "1000000"]
    with running(argv, url, health="/"):
        yield url


@pytest.fixture(scope="module")
def page(demo: str) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium; make test does)")
    playwright = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.set_default_timeout(WAIT_MS)
        tab.goto(demo)
        tab.wait_for_selector("#run")
        yield tab
        browser.close()


@pytest.fixture(scope="module")
def gradio(demo: str) -> Any:
    from gradio_client import Client

    return Client(demo, verbose=False)


def _cli_record(image: Path, instruction: str, out: Path, capsys) -> dict:
    assert run(["segment", str(image), instruction, "--out-dir", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _concept_mask(path: Path) -> Path:
    spec = json.loads((EXAMPLES / CONCEPT_SHOT).with_suffix(".json").read_text())
    mask = np.zeros((spec["imageHeight"], spec["imageWidth"]), np.uint8)
    cv2.fillPoly(mask, [np.array(spec["shapes"][0]["points"], np.int32)], 255)
    Image.fromarray(mask).save(path)
    return path


def _segment_in_browser(page: Any, image: Path, instruction: str) -> str:
    """Upload, type, run; returns the answer once it and the overlay are shown."""
    page.get_by_role("tab", name="Reason & Segment").click()
    page.locator("#seg_image input[type=file]").set_input_files(str(image))
    before = page.locator("#status").inner_text()
    page.locator("#instruction textarea").fill(instruction)
    page.locator("#run").click()
    try:
        page.wait_for_function(  # the status line names each finished run
            f"document.querySelector('#status').innerText.trim() !== {json.dumps(before)}"
            " && document.querySelector('#status').innerText.includes('mask(s)')",
            timeout=WAIT_MS,
        )
    except Exception:
        page.screenshot(path=str(SHOTS / "segment_failed.png"), full_page=True)
        raise AssertionError(page.locator("body").inner_text()[-1500:]) from None
    page.locator("#overlay img").wait_for(state="visible")
    return page.locator("#answer textarea").input_value()


def _add_shot(page: Any, image: Path) -> None:
    """Uploads `image` into the editor and clicks "Add shot" until the shot is taken. The editor's
    upload lands asynchronously and, on a slow machine, an upload started while the tab is still
    mounting can stall; so "Add shot" is retried and the image re-uploaded (both bounded)."""
    for _upload in range(4):
        page.locator("#shot_editor input[type=file]").first.set_input_files(str(image))
        for _click in range(6):
            page.locator("#add_shot").click()
            try:
                page.wait_for_function(
                    "document.querySelector('#shots_text').innerText.includes('shot(s) ready')",
                    timeout=10_000,
                )
                return
            except Exception:
                continue


def _toast(page: Any, text: str) -> None:
    page.get_by_text(text).first.wait_for(state="visible", timeout=30_000)


# ---- Reason & Segment ----------------------------------------------------------------------
def test_browser_segments_an_example_like_the_cli(page: Any, tmp_path: Path, capsys) -> None:
    want = _cli_record(EXAMPLES / CASE[0], CASE[1], tmp_path, capsys)
    answer = _segment_in_browser(page, EXAMPLES / CASE[0], CASE[1])
    assert answer == want["answer"]
    table = page.locator("#masks").inner_text()
    assert want["masks"] and all(str(m["area"]) in table for m in want["masks"])
    src = page.locator("#overlay img").get_attribute("src")
    page.screenshot(path=str(SHOTS / "segment.png"), full_page=True)
    # a click on the overlay adds a positive point and re-draws the refined mask
    box = page.locator("#overlay img").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function(
        f"document.querySelector('#overlay img').getAttribute('src') !== {json.dumps(src)}"
    )


def test_browser_bad_input_shows_a_message_and_the_page_keeps_working(page: Any) -> None:
    page.get_by_role("tab", name="Reason & Segment").click()
    page.locator("#seg_image input[type=file]").set_input_files(str(EXAMPLES / CASE[0]))
    page.locator("#instruction textarea").fill("   ")
    page.locator("#run").click()
    _toast(page, "instruction is empty")
    page.screenshot(path=str(SHOTS / "error.png"), full_page=True)
    assert _segment_in_browser(page, EXAMPLES / CASE[0], CASE[1])


def test_gradio_client_gets_the_cli_masks(gradio: Any, tmp_path: Path, capsys) -> None:
    from gradio_client import handle_file

    want = _cli_record(EXAMPLES / CASE[0], CASE[1], tmp_path, capsys)
    _, answer, _, files, _, _ = gradio.predict(
        handle_file(str(EXAMPLES / CASE[0])), CASE[1], "local", api_name="/segment"
    )
    record = json.loads(Path(files[-1]).read_text())
    assert answer == want["answer"] == record["answer"]
    assert record["masks"] == want["masks"]
    pngs = [np.array(Image.open(f)) > 0 for f in files[:-1]]
    assert len(pngs) == len(want["masks"])
    for png, i in zip(pngs, range(len(pngs)), strict=True):
        assert int(png.sum()) == want["masks"][i]["area"]


def test_gradio_client_bad_input_gets_clear_messages(gradio: Any, tmp_path: Path) -> None:
    from gradio_client import handle_file

    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    huge = tmp_path / "huge.png"
    Image.fromarray(np.zeros((1100, 1100, 3), np.uint8)).save(huge)
    cases = [
        (text, CASE[1], "local", "not an image file"),
        (huge, CASE[1], "local", "image too large: 1100x1100"),
        (EXAMPLES / CASE[0], "", "local", "instruction is empty"),
        (EXAMPLES / CASE[0], "segment <nosuch>", "local", "no concept <nosuch>"),
        (EXAMPLES / CASE[0], CASE[1], "Not A Slug", "user"),
    ]
    for image, instruction, user, message in cases:
        with pytest.raises(Exception, match=message):
            gradio.predict(handle_file(str(image)), instruction, user, api_name="/segment")
    _, answer, *_ = gradio.predict(
        handle_file(str(EXAMPLES / CASE[0])), CASE[1], "local", api_name="/segment"
    )
    assert answer


def test_gradio_client_batch_tab_returns_masks_and_coco(gradio: Any, tmp_path: Path) -> None:
    from gradio_client import handle_file

    archive = tmp_path / "in.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in (CASE[0], CONCEPT_SHOT):
            zf.write(EXAMPLES / name, f"imgs/{name}")
    out, _ = gradio.predict(handle_file(str(archive)), "", CASE[1], api_name="/run_batch")
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        coco = json.loads(zf.read("coco.json"))
    assert {"coco.json", "results.jsonl"} <= set(names)
    assert {im["file_name"] for im in coco["images"]} <= {f"imgs/{CASE[0]}", f"imgs/{CONCEPT_SHOT}"}
    assert any(n.startswith("masks/") and n.endswith(".png") for n in names)


# ---- Personalize ---------------------------------------------------------------------------
def test_browser_personalize_with_progress_then_segment(
    page: Any, gradio: Any, tmp_path: Path
) -> None:
    pytest.importorskip("segapp.personalize.fit")
    mask = _concept_mask(tmp_path / "mask.png")
    page.get_by_role("tab", name="Personalize").click()
    page.locator("#shot_editor").wait_for(state="visible")
    page.locator("#shot_mask input[type=file]").set_input_files(str(mask))
    page.locator("#shot_mask img").wait_for(state="visible")
    _add_shot(page, EXAMPLES / CONCEPT_SHOT)
    shots = page.locator("#shots_text").inner_text()
    assert "shot(s) ready" in shots, page.locator("body").inner_text()[-1500:]
    page.locator("#concept_name textarea, #concept_name input").first.fill("banana-thing")
    page.locator("#steps input").fill("2")
    page.locator("#fit").click()
    bar = page.locator(".progress-bar").first
    bar.wait_for(state="visible", timeout=60_000)  # a live progress bar while fitting
    page.screenshot(path=str(SHOTS / "personalize_progress.png"), full_page=True)
    try:
        page.wait_for_function(
            "document.querySelector('#fit_result').innerText.includes('learned <banana-thing>')",
            timeout=300_000,
        )
    finally:
        page.screenshot(path=str(SHOTS / "personalize_fit_end.png"), full_page=True)
    assert "banana-thing" in page.locator("#concepts").inner_text()
    page.screenshot(path=str(SHOTS / "personalize.png"), full_page=True)
    # the concept now segments, for its owner
    answer = _segment_in_browser(page, EXAMPLES / CONCEPT_SHOT, "segment <banana-thing>")
    assert answer
    page.screenshot(path=str(SHOTS / "personalize_segment.png"), full_page=True)
    # ... and is nobody else's
    from gradio_client import handle_file

    with pytest.raises(Exception, match="has no concept <banana-thing>"):
        gradio.predict(
            handle_file(str(EXAMPLES / CONCEPT_SHOT)),
            "segment <banana-thing>",
            "bob",
            api_name="/segment",
        )
    # delete it from the Personalize tab: it leaves the list and stops segmenting
    page.get_by_role("tab", name="Personalize").click()
    page.locator("#delete_name textarea, #delete_name input").first.fill("banana-thing")
    page.locator("#delete").click()
    page.wait_for_function(
        "document.querySelector('#fit_result').innerText.includes('deleted <banana-thing>')"
    )
    assert "banana-thing" not in page.locator("#concepts").inner_text()
    with pytest.raises(Exception, match="has no concept <banana-thing>"):
        gradio.predict(
            handle_file(str(EXAMPLES / CONCEPT_SHOT)),
            "segment <banana-thing>",
            "local",
            api_name="/segment",
        )


def test_browser_other_tabs_render(page: Any) -> None:
    for tab, name in (("Video", "video"), ("Batch", "batch")):
        page.get_by_role("tab", name=tab).click()
        page.locator(f"#{name}_run").wait_for(state="visible")
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_gradio_client_video_tab_gives_overlay_and_token_stats(gradio: Any, tmp_path: Path) -> None:
    pytest.importorskip("segapp.video.pipeline")
    from gradio_client import handle_file

    from segapp.data.videos import generate_clip

    clip = generate_clip("test", 3, frames=6)
    h, w = clip.frames[0].shape[:2]
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (w, h))
    for frame in clip.frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    out, answer, stats = gradio.predict(
        handle_file(str(path)), "all the circles", 0.7, "local", api_name="/run_video"
    )
    assert answer and stats["frames"] == 6
    assert stats["visual_tokens_kept"] < stats["visual_tokens_total"]
    assert Path(out["video"] if isinstance(out, dict) else out).stat().st_size > 1000


# ---- UI on one machine, model on another: demo --backend URL ---------------------------------
@pytest.fixture(scope="module")
def remote_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """`segapp serve` (the model) and `segapp demo --backend` (no model) as two processes."""
    from gradio_client import Client

    concepts = tmp_path_factory.mktemp("remote") / "concepts"
    api_port, ui_port = free_port(), free_port()
    api, ui = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ui_port}"
    with (
        running(["serve", "--port", str(api_port), "--concepts", str(concepts)], api),
        running(["demo", "--port", str(ui_port), "--backend", api], ui, health="/"),
    ):
        yield Client(ui, verbose=False)


def test_ui_over_a_rest_backend_gives_the_cli_masks(remote_ui: Any, tmp_path: Path, capsys):
    from gradio_client import handle_file

    want = _cli_record(EXAMPLES / CASE[0], CASE[1], tmp_path, capsys)
    _, answer, _, files, _, _ = remote_ui.predict(
        handle_file(str(EXAMPLES / CASE[0])), CASE[1], "local", api_name="/segment"
    )
    assert answer == want["answer"]
    assert json.loads(Path(files[-1]).read_text())["masks"] == want["masks"]
    with pytest.raises(Exception, match="instruction is empty"):
        remote_ui.predict(handle_file(str(EXAMPLES / CASE[0])), " ", "local", api_name="/segment")
