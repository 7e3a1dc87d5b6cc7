"""The standalone server: A1111's API subset, NetWeave's routes, and a Gradio page, on one
FastAPI app bound to 127.0.0.1 (another address only with --api-auth). Request bodies are
bounded (FastAPI's max_body_size: refused from Content-Length before they are read), and every
error is JSON that says what and where."""
from __future__ import annotations

import ipaddress
import os
import threading
from typing import Sequence

import gradio as gr  # the page; its event data types are resolved from this module's names
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import tab
from ..api import netweave_router
from .auth import BasicAuth
from .host import DiffusersHost, Request
from .samplers import Sampler
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
        with open(SCRIPT, encoding="utf-8") as f:  # the prompt-box helpers WebUIs load too
            head = f"<script>{f.read()}</script>"
        app = gr.mount_gradio_app(app, page(host, library), path="/", head=head)
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


def page(host: DiffusersHost, library: Library):
    """What an A1111 user reaches for first: prompt and negative prompt, sampler, steps, CFG
    scale, seed, size, batch count and size; the networks with their metadata, a click putting
    one's tag into the prompt (the WebUIs' cards); the gallery; NetWeave's tab."""

    size = host.model.size
    last = {"image": None}  # the mask tab previews over it

    def generate(prompt, negative, sampler, steps, cfg, seed, width, height, count, batch,
                 progress=gr.Progress()):
        images, infos, problems = [], [], []
        for i in range(int(count)):
            req = Request(prompt=prompt, negative_prompt=negative, steps=int(steps),
                          cfg_scale=float(cfg), sampler=Sampler(sampler),
                          seed=int(seed) if int(seed) < 0 else int(seed) + i * int(batch),
                          width=int(width), height=int(height), batch_size=int(batch))
            result = _run(host, req, progress, f"image {i + 1}/{int(count)}: ")
            images += result.images
            infos += result.infotexts
            problems += [p for p in result.errors if p not in problems]
        last["image"] = images[0] if images else None
        return images, "\n".join(infos), "\n".join(problems) or "no problems"

    def networks():
        rows = []
        for kind in ("lora", "model"):
            for name in library.names(kind):
                entry = library.describe(kind, name)
                rows.append([kind, name, entry["architecture"] or "",
                             ", ".join(entry["trigger_words"][:8]), entry["error"] or ""])
        return rows

    def insert(prompt, rows, evt: gr.SelectData):
        """A click on a network's row puts its tag at the end of the prompt."""
        kind, name = list(rows.iloc[evt.index[0]])[:2] if hasattr(rows, "iloc") \
            else rows[evt.index[0]][:2]
        tag = f"<lora:{name}:1>" if kind == "lora" else f"<model:{name}:0.5>"
        return (prompt.rstrip() + " " + tag).lstrip()

    with gr.Blocks(title="NetWeave") as blocks:
        gr.Markdown("# NetWeave")
        with gr.Tab("txt2img"):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="netweave_prompt")
            negative = gr.Textbox(label="Negative prompt", lines=2,
                                  elem_id="netweave_negative")
            with gr.Row():
                sampler = gr.Dropdown([s.value for s in host.samplers()],
                                      value=Sampler.EULER.value, label="Sampler",
                                      elem_id="netweave_sampler")
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="netweave_steps")
                # Flux dev's CFG field is the guidance its transformer embeds (no negative pass)
                cfg = gr.Slider(1, 30, value=host.model.default_cfg, step=0.5,
                                label="Distilled CFG scale (guidance)" if host.model.distilled
                                else "CFG scale", elem_id="netweave_cfg")
                seed = gr.Number(value=-1, precision=0, label="Seed")
            with gr.Row():
                grid = host.model.vae_scale  # a Flux latent's 2×2 patches: 16 px steps
                width = gr.Slider(64, 2048, value=size, step=grid, label="Width")
                height = gr.Slider(64, 2048, value=size, step=grid, label="Height")
                count = gr.Slider(1, 16, value=1, step=1, label="Batch count",
                                  elem_id="netweave_batch_count")
                batch = gr.Slider(1, 8, value=1, step=1, label="Batch size",
                                  elem_id="netweave_batch_size")
            button = gr.Button("Generate", variant="primary", elem_id="netweave_generate")
            gallery = gr.Gallery(label="Images", elem_id="netweave_gallery")
            info = gr.Textbox(label="Parameters", lines=3, elem_id="netweave_info")
            problems = gr.Textbox(label="NetWeave", lines=2, elem_id="netweave_errors")
            with gr.Accordion("Networks (click one to add its tag to the prompt)", open=True):
                cards = gr.Dataframe(networks, headers=["kind", "name", "architecture",
                                                        "trigger words", "problem"],
                                     interactive=False, elem_id="netweave_networks")
            cards.select(insert, [prompt, cards], [prompt])
            button.click(generate, [prompt, negative, sampler, steps, cfg, seed, width, height,
                                    count, batch], [gallery, info, problems])
        with gr.Tab("NetWeave"):
            tab.build(host.masks, host.context, lambda: last["image"],
                      host.settings, prompt, steps)
    blocks.queue(default_concurrency_limit=1, max_size=MAX_QUEUED)  # the API's bound, on the page too
    return blocks


def _run(host: DiffusersHost, req: Request, progress, label: str):
    """One txt2img on a worker thread, the page's progress bar following its steps."""
    done = {}

    def work():
        try:
            done["result"] = host.txt2img(req)
        except Exception as exc:  # shown to the user
            done["error"] = exc
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while worker.is_alive():
        p = host.progress
        progress(p.fraction if p.busy else 0.0, desc=f"{label}step {p.step}/{p.steps or req.steps}")
        worker.join(0.25)
    if "error" in done:
        raise gr.Error(str(done["error"]))
    return done["result"]


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
