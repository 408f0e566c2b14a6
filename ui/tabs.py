"""The segapp UI's four tabs. Each builds its components inside the caller's `gr.Tab` and wires
their handlers to the client; model work shares the "gpu" concurrency queue."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np

from segapp.client import Client
from segapp.export import overlay
from segapp.images import mask_from_array
from ui.widgets import downloads, draw, examples, fail, image_input, mask_table, wait_job


def segment_tab(client: Client, user: gr.Textbox, max_pixels: int) -> None:
    """Reason & Segment: image + instruction -> overlay, answer, masks; clicks refine a mask."""

    def run_segment(image, instruction, user, runs):
        if image is None:
            raise gr.Error("upload an image first (or pick an example)")
        started = time.perf_counter()
        try:
            record = client.segment(image, instruction, user=user or None)
        except Exception as exc:
            raise fail(exc) from None
        state = {"image": image, "instruction": instruction, "record": record, "points": []}
        took = time.perf_counter() - started
        status = f"run {runs + 1}: {len(record['masks'])} mask(s) in {took:.2f} s"
        choices = [(f"{i}: {m['label']}", i) for i, m in enumerate(record["masks"])]
        return (
            draw(image, record, []),
            record["answer"],
            mask_table(record),
            downloads(record),
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
            raise fail(exc) from None
        record = dict(state["record"])
        masks = list(record["masks"])
        if 0 <= index < len(masks):
            masks[index] = refined
        else:
            masks.append(refined)
        record["masks"] = masks
        new_state = {**state, "record": record, "points": points}
        return (
            draw(state["image"], record, points),
            mask_table(record),
            downloads(record),
            new_state,
        )

    def clear_points(state):
        if not state:
            return None, [], None, state
        return (
            draw(state["image"], state["record"], []),
            mask_table(state["record"]),
            None,
            {
                **state,
                "points": [],
            },
        )

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
                kind = gr.Radio(["positive", "negative"], value="positive", label="Click adds")
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
    shown.select(add_point, [state, kind, pick], [shown, table, files, state], concurrency_id="gpu")
    clear.click(clear_points, [state], [shown, table, files, state], api_name=False)


def personalize_tab(client: Client, user: gr.Textbox, demo: gr.Blocks) -> None:
    """Personalize: paint or upload 1-5 shots, fit a concept, list and delete concepts."""

    def add_shot(editor, mask_upload, shots):
        if editor is None or editor.get("background") is None:
            raise gr.Error("upload an example image into the editor first")
        image = np.asarray(editor["background"])[..., :3].astype(np.uint8)
        if mask_upload is not None:
            mask = mask_from_array(mask_upload)
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
            job = wait_job(client, job, user, progress)
        except gr.Error:
            raise
        except Exception as exc:
            raise fail(exc) from None
        info = job["result"] or {}
        return (
            f"learned `<{info.get('name', name)}>`: try `segment <{info.get('name', name)}>`",
            _concepts(user),
        )

    def _concepts(user):
        try:
            rows = client.concepts(user)
        except Exception as exc:
            raise fail(exc) from None
        return [
            [c.get("name"), c.get("method", ""), c.get("shots", ""), c.get("created", "")]
            for c in rows
        ]

    def delete(name, user):
        try:
            client.delete_concept(user, (name or "").strip())
        except Exception as exc:
            raise fail(exc) from None
        return _concepts(user), f"deleted `<{name}>`"

    shots = gr.State([])
    with gr.Row():
        with gr.Column():
            editor = gr.ImageEditor(
                type="numpy",
                label="Example image (paint the object)",
                elem_id="shot_editor",
                brush=gr.Brush(colors=["#ff0000"], color_mode="fixed"),
            )
            mask_upload = gr.Image(type="numpy", label="...or upload its mask", elem_id="shot_mask")
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
                to_delete = gr.Textbox(label="Delete concept", max_lines=1, elem_id="delete_name")
                delete_btn = gr.Button("Delete", elem_id="delete")
    add.click(add_shot, [editor, mask_upload, shots], [shots, gallery, shots_text], api_name=False)
    fit_btn.click(fit, [shots, name, steps, method, user], [fitted, concepts], concurrency_id="gpu")
    delete_btn.click(delete, [to_delete, user], [concepts, fitted], concurrency_id="gpu")
    demo.load(_concepts, [user], [concepts], api_name=False)


def video_tab(client: Client, user: gr.Textbox) -> None:
    """Video: a clip + instruction -> overlay video, answer, token and time stats."""

    def run_video(video, instruction, merge, user, progress=gr.Progress()):  # noqa: B008 - gradio's injection
        if not video:
            raise gr.Error("upload a video clip first")
        try:
            job = client.start_video(
                user, Path(video), instruction, merge=float(merge) or None, prune=None
            )
            job = wait_job(client, job, user, progress)
            out = client.video_overlay(job, user, Path(tempfile.mkdtemp(prefix="segapp-ui-")))
        except gr.Error:
            raise
        except Exception as exc:
            raise fail(exc) from None
        result = job["result"] or {}
        return (str(out) if out else None), result.get("answer", ""), result.get("stats", {})

    with gr.Row():
        with gr.Column():
            video = gr.Video(label="Clip", elem_id="video_in")
            v_instruction = gr.Textbox(label="Instruction", elem_id="video_instruction")
            merge = gr.Slider(0.0, 0.95, value=0.7, step=0.05, label="Token merge ratio (0: off)")
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


def batch_tab(client: Client, local_folders: bool) -> None:
    """Batch: a zip of images (or a server folder) -> a zip of masks and COCO JSON."""

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
            raise fail(exc) from None
        path = Path(tempfile.mkdtemp(prefix="segapp-ui-")) / "segapp_batch.zip"
        path.write_bytes(out)
        return str(path), f"{len(out)} bytes of masks and COCO JSON"

    with gr.Row():
        with gr.Column():
            archive = gr.File(label="Zip of images", file_types=[".zip"], elem_id="batch_zip")
            folder = gr.Textbox(label="...or a folder on the server", visible=local_folders)
            b_instruction = gr.Textbox(label="Instruction", elem_id="batch_instruction")
            b_run = gr.Button("Run", variant="primary", elem_id="batch_run")
        with gr.Column():
            b_out = gr.File(label="Masks + COCO JSON (zip)")
            b_text = gr.Markdown()
    b_run.click(run_batch, [archive, folder, b_instruction], [b_out, b_text], concurrency_id="gpu")
