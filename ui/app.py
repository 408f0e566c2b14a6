"""segapp web UI: Gradio Blocks over a `segapp.client` (in-process Service or a REST backend).

The UI only wires: every handler calls the client and turns its dicts into components. No model
is loaded at import; `main()` loads it (or, with `--backend URL`, holds none at all). Per-session
data (the last result, clicked points, personalization shots) lives in `gr.State`; model work
shares one queue ("gpu") with a concurrency limit; errors become messages, never a dead page.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from segapp.client import Client
from ui.tabs import batch_tab, personalize_tab, segment_tab, video_tab
from ui.widgets import examples, image_input

__all__ = ["build", "examples", "image_input", "launch"]


def build(
    client: Client, *, local_folders: bool = False, max_pixels: int = 16_000_000
) -> gr.Blocks:
    """The Blocks app over `client`. local_folders: the Batch tab may read a server folder;
    max_pixels: larger uploads are refused before decoding."""
    with gr.Blocks(title="segapp") as demo:
        gr.Markdown("## segapp: reason, then segment")
        user = gr.Textbox("local", label="User", elem_id="user", max_lines=1)
        with gr.Tab("Reason & Segment", id="segment"):
            segment_tab(client, user, max_pixels)
        with gr.Tab("Personalize", id="personalize"):
            personalize_tab(client, user, demo)
        with gr.Tab("Video", id="video"):
            video_tab(client, user)
        with gr.Tab("Batch", id="batch"):
            batch_tab(client, local_folders)
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
