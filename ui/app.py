"""segapp web UI: Gradio Blocks over a `segapp.client` (in-process Service or a REST backend).

The UI only wires: every handler calls the client and turns its dicts into components. No model
is loaded at import; `main()` loads it (or, with `--backend URL`, holds none at all). Per-session
data (the last result, clicked points, personalization shots) lives in `gr.State`; model work
shares one queue ("gpu") with a concurrency limit; errors become messages, never a dead page.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from segapp.client import Client
from segapp.errors import InputError, SegappError
from segapp.export import overlay, rle_to_mask, save_png
from segapp.images import load_image

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "examples"
POLL_S = 0.25
JOB_LIMIT_S = 3600.0


def image_input(*, max_pixels: int, **kwargs: Any) -> gr.Image:
    """A gr.Image decoded by segapp's `load_image` (the CLI's decoding, EXIF and pixel limit), so
    an unreadable or huge upload gets segapp's one-line message, not a preprocessing trace.

    (The instance's preprocess is replaced rather than subclassing: gradio writes a .pyi file
    next to the source of every Component subclass.)
    """
    image = gr.Image(type="numpy", **kwargs)
    default = image.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None or payload.path is None:  # nothing, or a data: URL (webcam)
            return default(payload)
        try:
            return load_image(payload.path, max_pixels=max_pixels)
        except InputError as exc:
            raise gr.Error(f"{exc.what} ({payload.orig_name or 'image'})") from None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def examples() -> list[list[str]]:
    """[image path, instruction] for each bundled example."""
    rows = []
    for spec in sorted(EXAMPLES_DIR.glob("*.json")):
        image = spec.with_suffix(".png")
        if image.is_file():
            rows.append([str(image), json.loads(spec.read_text())["text"][0]])
    return rows


def _fail(exc: Exception) -> gr.Error:
    if isinstance(exc, SegappError):
        return gr.Error(str(exc))
    return gr.Error(f"internal failure: {type(exc).__name__}: {exc}")


def _masks(record: dict) -> list[np.ndarray]:
    return [rle_to_mask(m["rle"]) for m in record["masks"]]


def _draw(image: np.ndarray, record: dict, points: list[tuple[float, float, int]]) -> np.ndarray:
    labels = [f"{m['label']} {m['score']:.2f}" for m in record["masks"]]
    canvas = overlay(image, _masks(record), labels) if record["masks"] else image.copy()
    radius = max(3, min(image.shape[:2]) // 80)
    for x, y, label in points:
        colour = (40, 220, 40) if label == 1 else (230, 30, 30)
        y0, y1 = int(max(0, y - radius)), int(min(image.shape[0], y + radius + 1))
        x0, x1 = int(max(0, x - radius)), int(min(image.shape[1], x + radius + 1))
        canvas[y0:y1, x0:x1] = colour
    return canvas


def _downloads(record: dict) -> list[str]:
    folder = Path(tempfile.mkdtemp(prefix="segapp-ui-"))
    files = []
    for i, mask in enumerate(_masks(record)):
        save_png(folder / f"mask_{i}.png", mask)
        files.append(str(folder / f"mask_{i}.png"))
    (folder / "result.json").write_text(json.dumps(record))
    return [*files, str(folder / "result.json")]


def _table(record: dict) -> list[list[Any]]:
    return [[i, m["label"], round(m["score"], 3), m["area"]] for i, m in enumerate(record["masks"])]


def _wait(client: Client, job: dict, user: str, progress: gr.Progress) -> dict:
    """Poll a job until it finishes (bounded), mirroring its progress in the UI."""
    deadline = time.monotonic() + JOB_LIMIT_S
    while job.get("state") not in ("done", "failed"):
        if time.monotonic() > deadline:
            raise gr.Error("the job did not finish in time")
        progress(job.get("progress", 0.0), desc=job.get("message") or job.get("state"))
        time.sleep(POLL_S)
        job = client.job(job["id"], user)
    if job["state"] == "failed":
        raise gr.Error(job.get("error") or "the job failed")
    progress(1.0, desc="done")
    return job


def build(
    client: Client, *, local_folders: bool = False, max_pixels: int = 16_000_000
) -> gr.Blocks:
    """The Blocks app over `client`. local_folders: the Batch tab may read a server folder;
    max_pixels: larger uploads are refused before decoding."""

    def run_segment(image, instruction, user, runs):
        if image is None:
            raise gr.Error("upload an image first (or pick an example)")
        started = time.perf_counter()
        try:
            record = client.segment(image, instruction, user=user or None)
        except Exception as exc:
            raise _fail(exc) from None
        state = {"image": image, "instruction": instruction, "record": record, "points": []}
        took = time.perf_counter() - started
        status = f"run {runs + 1}: {len(record['masks'])} mask(s) in {took:.2f} s"
        choices = [(f"{i}: {m['label']}", i) for i, m in enumerate(record["masks"])]
        return (
            _draw(image, record, []),
            record["answer"],
            _table(record),
            _downloads(record),
            state,
            gr.update(
                choices=choices or [("points only", -1)], value=choices[0][1] if choices else -1
            ),
            status,
            runs + 1,
        )

    def add_point(state, kind, mask_index, evt: gr.SelectData):
        if not state:
            raise gr.Error("run a segmentation first, then click on the result to refine it")
        x, y = evt.index[0], evt.index[1]
        points = [*state["points"], (float(x), float(y), 1 if kind == "positive" else 0)]
        index = -1 if mask_index is None else int(mask_index)
        try:
            refined = client.refine(state["image"], state["instruction"], points, index)
        except Exception as exc:
            raise _fail(exc) from None
        record = dict(state["record"])
        masks = list(record["masks"])
        if 0 <= index < len(masks):
            masks[index] = refined
        else:
            masks.append(refined)
        record["masks"] = masks
        new_state = {**state, "record": record, "points": points}
        return _draw(state["image"], record, points), _table(record), _downloads(record), new_state

    def clear_points(state):
        if not state:
            return None, [], None, state
        return (
            _draw(state["image"], state["record"], []),
            _table(state["record"]),
            None,
            {
                **state,
                "points": [],
            },
        )

    # ---- personalize ------------------------------------------------------------------------
    def add_shot(editor, mask_upload, shots):
        if editor is None or editor.get("background") is None:
            raise gr.Error("upload an example image into the editor first")
        image = np.asarray(editor["background"])[..., :3].astype(np.uint8)
        if mask_upload is not None:
            mask = np.asarray(mask_upload)
            mask = (mask.max(axis=2) if mask.ndim == 3 else mask) > 127
        else:
            painted = [np.asarray(layer) for layer in editor.get("layers") or []]
            mask = np.zeros(image.shape[:2], bool)
            for layer in painted:
                alpha = layer[..., 3] if layer.ndim == 3 and layer.shape[2] == 4 else layer
                mask |= alpha > 0
        if mask.shape != image.shape[:2]:
            raise gr.Error(f"the mask is {mask.shape[::-1]}, the image {image.shape[1::-1]}")
        if not mask.any():
            raise gr.Error("the mask is empty: paint the object or upload a mask")
        if len(shots) >= 5:
            raise gr.Error("at most 5 shots")
        shots = [*shots, (image, mask)]
        gallery = [(overlay(im, [m]), f"shot {i + 1}") for i, (im, m) in enumerate(shots)]
        return shots, gallery, f"{len(shots)} shot(s) ready"

    def fit(shots, name, steps, method, user, progress=gr.Progress()):  # noqa: B008 - gradio's injection
        if not shots:
            raise gr.Error("add at least one shot (image + mask)")
        try:
            job = client.start_personalize(
                user,
                (name or "").strip(),
                [s[0] for s in shots],
                [s[1] for s in shots],
                steps=int(steps) if steps else None,
                method=method,
            )
            job = _wait(client, job, user, progress)
        except gr.Error:
            raise
        except Exception as exc:
            raise _fail(exc) from None
        info = job["result"] or {}
        return (
            f"learned `<{info.get('name', name)}>`: try `segment <{info.get('name', name)}>`",
            _concepts(user),
        )

    def _concepts(user):
        try:
            rows = client.concepts(user)
        except Exception as exc:
            raise _fail(exc) from None
        return [
            [c.get("name"), c.get("method", ""), c.get("shots", ""), c.get("created", "")]
            for c in rows
        ]

    def delete(name, user):
        try:
            client.delete_concept(user, (name or "").strip())
        except Exception as exc:
            raise _fail(exc) from None
        return _concepts(user), f"deleted `<{name}>`"

    # ---- video ------------------------------------------------------------------------------
    def run_video(video, instruction, merge, user, progress=gr.Progress()):  # noqa: B008 - gradio's injection
        if not video:
            raise gr.Error("upload a video clip first")
        try:
            job = client.start_video(
                user, Path(video), instruction, merge=float(merge) or None, prune=None
            )
            job = _wait(client, job, user, progress)
            out = client.video_overlay(job, user, Path(tempfile.mkdtemp(prefix="segapp-ui-")))
        except gr.Error:
            raise
        except Exception as exc:
            raise _fail(exc) from None
        result = job["result"] or {}
        return (str(out) if out else None), result.get("answer", ""), result.get("stats", {})

    # ---- batch ------------------------------------------------------------------------------
    def run_batch(archive, folder, instruction):
        try:
            if archive:
                data = Path(archive).read_bytes()
            elif folder and local_folders:
                from segapp.archive import pack_folder

                data = pack_folder(Path(folder))
            else:
                raise gr.Error(
                    "upload a zip of images" + (" or give a folder" if local_folders else "")
                )
            out = client.batch_zip(data, instruction)
        except gr.Error:
            raise
        except Exception as exc:
            raise _fail(exc) from None
        path = Path(tempfile.mkdtemp(prefix="segapp-ui-")) / "segapp_batch.zip"
        path.write_bytes(out)
        return str(path), f"{len(out)} bytes of masks and COCO JSON"

    with gr.Blocks(title="segapp") as demo:
        gr.Markdown("## segapp: reason, then segment")
        user = gr.Textbox("local", label="User", elem_id="user", max_lines=1)
        with gr.Tab("Reason & Segment", id="segment"):
            state = gr.State(None)
            runs = gr.State(0)  # per session: numbers the status line
            with gr.Row():
                with gr.Column():
                    image = image_input(label="Image", elem_id="seg_image", max_pixels=max_pixels)
                    instruction = gr.Textbox(label="Instruction", elem_id="instruction", lines=2)
                    run = gr.Button("Run", variant="primary", elem_id="run")
                    gr.Examples(examples(), inputs=[image, instruction], label="Examples")
                with gr.Column():
                    shown = gr.Image(
                        label="Overlay (click to refine)", elem_id="overlay", interactive=False
                    )
                    answer = gr.Textbox(label="Answer", elem_id="answer", interactive=False)
                    with gr.Row():
                        kind = gr.Radio(
                            ["positive", "negative"], value="positive", label="Click adds"
                        )
                        pick = gr.Dropdown(choices=[], label="Mask to refine", elem_id="mask_pick")
                        clear = gr.Button("Clear points")
                    table = gr.Dataframe(
                        headers=["#", "label", "score", "area"],
                        label="Masks",
                        elem_id="masks",
                        interactive=False,
                    )
                    files = gr.File(label="Downloads (PNG masks, JSON)", file_count="multiple")
                    status = gr.Markdown(elem_id="status")
            run.click(
                run_segment,
                [image, instruction, user, runs],
                [shown, answer, table, files, state, pick, status, runs],
                concurrency_id="gpu",
                api_name="segment",
            )
            instruction.submit(
                run_segment,
                [image, instruction, user, runs],
                [shown, answer, table, files, state, pick, status, runs],
                concurrency_id="gpu",
                api_name=False,
            )
            shown.select(
                add_point, [state, kind, pick], [shown, table, files, state], concurrency_id="gpu"
            )
            clear.click(clear_points, [state], [shown, table, files, state], api_name=False)

        with gr.Tab("Personalize", id="personalize"):
            shots = gr.State([])
            with gr.Row():
                with gr.Column():
                    editor = gr.ImageEditor(
                        type="numpy",
                        label="Example image (paint the object)",
                        elem_id="shot_editor",
                        brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"),
                    )
                    mask_upload = gr.Image(
                        type="numpy", label="...or upload its mask", elem_id="shot_mask"
                    )
                    add = gr.Button("Add shot", elem_id="add_shot")
                    shots_text = gr.Markdown("0 shots", elem_id="shots_text")
                with gr.Column():
                    gallery = gr.Gallery(label="Shots", columns=5, height=160)
                    name = gr.Textbox(label="Concept name", elem_id="concept_name", max_lines=1)
                    steps = gr.Number(label="Steps (empty: default)", precision=0, elem_id="steps")
                    method = gr.Radio(
                        [("LoRA (few-shot fit)", "lora"), ("training-free (PerSAM)", "persam")],
                        value="lora",
                        label="Method",
                        elem_id="method",
                    )
                    fit_btn = gr.Button("Fit", variant="primary", elem_id="fit")
                    fitted = gr.Markdown(elem_id="fit_result")
                    concepts = gr.Dataframe(
                        headers=["name", "method", "shots", "created"],
                        label="Your concepts",
                        elem_id="concepts",
                        interactive=False,
                    )
                    with gr.Row():
                        to_delete = gr.Textbox(
                            label="Delete concept", max_lines=1, elem_id="delete_name"
                        )
                        delete_btn = gr.Button("Delete", elem_id="delete")
            add.click(
                add_shot, [editor, mask_upload, shots], [shots, gallery, shots_text], api_name=False
            )
            fit_btn.click(
                fit, [shots, name, steps, method, user], [fitted, concepts], concurrency_id="gpu"
            )
            delete_btn.click(delete, [to_delete, user], [concepts, fitted], concurrency_id="gpu")
            demo.load(_concepts, [user], [concepts], api_name=False)

        with gr.Tab("Video", id="video"):
            with gr.Row():
                with gr.Column():
                    video = gr.Video(label="Clip", elem_id="video_in")
                    v_instruction = gr.Textbox(label="Instruction", elem_id="video_instruction")
                    merge = gr.Slider(
                        0.0, 0.95, value=0.7, step=0.05, label="Token merge ratio (0: off)"
                    )
                    v_run = gr.Button("Run", variant="primary", elem_id="video_run")
                with gr.Column():
                    v_out = gr.Video(label="Overlay", elem_id="video_out")
                    v_answer = gr.Textbox(label="Answer", interactive=False)
                    v_stats = gr.JSON(label="Tokens and times")
            v_run.click(
                run_video,
                [video, v_instruction, merge, user],
                [v_out, v_answer, v_stats],
                concurrency_id="gpu",
            )

        with gr.Tab("Batch", id="batch"):
            with gr.Row():
                with gr.Column():
                    archive = gr.File(
                        label="Zip of images", file_types=[".zip"], elem_id="batch_zip"
                    )
                    folder = gr.Textbox(label="...or a folder on the server", visible=local_folders)
                    b_instruction = gr.Textbox(label="Instruction", elem_id="batch_instruction")
                    b_run = gr.Button("Run", variant="primary", elem_id="batch_run")
                with gr.Column():
                    b_out = gr.File(label="Masks + COCO JSON (zip)")
                    b_text = gr.Markdown()
            b_run.click(
                run_batch, [archive, folder, b_instruction], [b_out, b_text], concurrency_id="gpu"
            )
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def launch(client: Client, *, host: str = "127.0.0.1", port: int = 7860, **build_kw: Any) -> None:
    """Serve the UI over `client` until interrupted (`segapp demo` calls this)."""
    demo = build(client, **build_kw)
    demo.launch(
        server_name=host, server_port=port, show_error=True, quiet=True, footer_links=["api"]
    )


if __name__ == "__main__":  # python -m ui.app [segapp demo options]
    import sys

    from segapp.cli import main

    main(["demo", *sys.argv[1:]])
