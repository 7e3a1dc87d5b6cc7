"""The standalone server: A1111's API subset, NetWeave's routes, and a Gradio page, on one
FastAPI app bound to 127.0.0.1."""
from __future__ import annotations

import os
import threading

from fastapi import FastAPI

from . import tab
from .api import netweave_router, sdapi_router
from .diffusers_host import DiffusersHost, Request
from .library import Library
from .masks import MaskStore

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "javascript",
                      "netweave.js")


def build_app(host: DiffusersHost, library: Library, masks: MaskStore, ui: bool = True) -> FastAPI:
    app = FastAPI(title="NetWeave")
    app.include_router(netweave_router(masks, library, lambda: host.model.arch))
    app.include_router(sdapi_router(host, library))
    if ui:
        import gradio as gr
        with open(SCRIPT, encoding="utf-8") as f:  # the prompt-box helpers WebUIs load too
            head = f"<script>{f.read()}</script>"
        app = gr.mount_gradio_app(app, page(host), path="/", head=head)
    return app


def page(host: DiffusersHost):
    """Prompt, negative prompt, steps, seed, size; the gallery; NetWeave's explain panel."""
    import gradio as gr

    size = host.model.size
    last = {"image": None}  # the mask tab previews over it

    def generate(prompt, negative, steps, seed, width, height, progress=gr.Progress()):
        req = Request(prompt=prompt, negative_prompt=negative, steps=int(steps), seed=int(seed),
                      width=int(width), height=int(height))
        done = {}

        def work():
            try:
                done["result"] = host.txt2img(req)
            except Exception as exc:  # shown to the user below
                done["error"] = exc
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():  # the progress bar follows the sampler's steps
            p = host.progress
            progress(p.fraction if p.busy else 0.0, desc=f"step {p.step}/{p.steps or req.steps}")
            worker.join(0.25)
        if "error" in done:
            raise gr.Error(str(done["error"]))
        result = done["result"]
        last["image"] = result.images[0] if result.images else None
        return result.images, "\n".join(result.infotexts), "\n".join(result.errors) or "no errors"

    with gr.Blocks(title="NetWeave") as blocks:
        gr.Markdown("# NetWeave")
        with gr.Tab("txt2img"):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="netweave_prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2)
            with gr.Row():
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps")
                seed = gr.Number(value=-1, precision=0, label="Seed")
                width = gr.Slider(64, 2048, value=size, step=8, label="Width")
                height = gr.Slider(64, 2048, value=size, step=8, label="Height")
            button = gr.Button("Generate", variant="primary", elem_id="netweave_generate")
            gallery = gr.Gallery(label="Images", elem_id="netweave_gallery")
            info = gr.Textbox(label="Parameters", lines=3)
            problems = gr.Textbox(label="NetWeave", lines=2, elem_id="netweave_errors")
            button.click(generate, [prompt, negative, steps, seed, width, height],
                         [gallery, info, problems])
        with gr.Tab("NetWeave"):
            tab.build(host.masks, lambda n: host.context(n, host.masks), lambda: last["image"],
                      host.settings, prompt)
    blocks.queue(default_concurrency_limit=1)
    return blocks


def serve(host: DiffusersHost, library: Library, masks: MaskStore, port: int = 7860) -> None:
    import uvicorn
    uvicorn.run(build_app(host, library, masks), host="127.0.0.1", port=port, log_level="info")
