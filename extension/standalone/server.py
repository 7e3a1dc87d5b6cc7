"""The standalone server: A1111's API subset, NetWeave's routes, and a Gradio page, on one
FastAPI app bound to 127.0.0.1 (another address only with --api-auth). Request bodies are
bounded (FastAPI's max_body_size: refused from Content-Length before they are read), and every
error is JSON that says what and where."""
from __future__ import annotations

import ipaddress
import os
import threading
from typing import Sequence

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import tab
from ..api import netweave_router
from .auth import BasicAuth
from .host import DiffusersHost, Request
from .sdapi import MAX_QUEUED, sdapi_router
from ..library import Library
from ..masks import MaskStore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
SCRIPT = os.path.join(ROOT, "javascript",
                      "netweave.js")


def build_app(host: DiffusersHost, library: Library, masks: MaskStore, ui: bool = True,
              auth: Sequence[str] = ()) -> FastAPI:
    """`auth`: "user:password" pairs; when given, every route and the page need one of them."""
    app = FastAPI(title="NetWeave", max_body_size=host.limits.max_body_bytes)
    app.include_router(netweave_router(masks, library, lambda: host.model.arch))
    app.include_router(sdapi_router(host, library))
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(413, _too_large)
    if ui:
        import gradio as gr
        with open(SCRIPT, encoding="utf-8") as f:  # the prompt-box helpers WebUIs load too
            head = f"<script>{f.read()}</script>"
        app = gr.mount_gradio_app(app, page(host), path="/", head=head)
    if auth:
        app.add_middleware(BasicAuth, credentials=auth)
    return app


async def _invalid(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    """422 with where (loc) and what (msg) of each problem; the offending input is not echoed
    (it may be huge, or text that cannot be encoded)."""
    problems = []
    for e in exc.errors():
        loc = [p if isinstance(p, (int, str)) else str(p) for p in e.get("loc", ())]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:]).lstrip(".") \
            or "the body"
        msg = str(e.get("msg", "invalid"))
        if isinstance(e.get("ctx"), dict) and "error" in e["ctx"]:
            msg = f"{msg}: {e['ctx']['error']}"
        msg = f"{where} must be{msg[len('Input should be'):]}" if msg.startswith("Input should be") \
            else f"{where}: {msg}"
        problems.append({"loc": loc, "msg": msg, "type": e.get("type", "")})
    return JSONResponse({"detail": problems}, status_code=422)


async def _too_large(request: HTTPRequest, exc) -> JSONResponse:
    if getattr(exc, "detail", None) not in (None, "Content Too Large"):  # a route's own message
        return JSONResponse({"detail": exc.detail}, status_code=413)
    limit = request.scope.get("starlette.max_body_size")
    said = request.headers.get("content-length")
    size = f" ({said} bytes)" if said else ""
    return JSONResponse({"detail": f"the request body{size} is over this route's limit of "
                                   f"{limit} bytes"}, status_code=413)


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
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="netweave_steps")
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
            tab.build(host.masks, host.context, lambda: last["image"],
                      host.settings, prompt, steps)
    blocks.queue(default_concurrency_limit=1, max_size=MAX_QUEUED)  # the API's bound, on the page too
    return blocks


def loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_address(address: str, auth: Sequence[str]) -> None:
    if not loopback(address) and not auth:
        raise ValueError(f"serving on {address} would let anyone on the network generate and "
                         "write masks; add --api-auth USER:PASSWORD or serve on 127.0.0.1")


def serve(host: DiffusersHost, library: Library, masks: MaskStore, port: int = 7860,
          address: str = "127.0.0.1", auth: Sequence[str] = ()) -> None:
    import uvicorn
    check_address(address, auth)
    uvicorn.run(build_app(host, library, masks, auth=auth), host=address, port=port,
                log_level="info")
