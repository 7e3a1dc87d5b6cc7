"""HTTP routes. `/netweave/v1/*` is NetWeave's own API, the same for every host (masks, parse,
networks); `/sdapi/v1/*` is the subset of A1111's API the standalone host serves, shaped so an
A1111 client works unchanged. Bad requests get a 4xx with a message, never a 500."""
from __future__ import annotations

import base64
import io
import json
from typing import Any, Callable, Dict, List, Optional

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ..network.blocks import BLOCKS, PRESETS
from ..network.plan import CompileContext, compile_prompt
from ..parser import BUILTIN_REGIONS, INTERPOLATIONS, KINDS, KNOWN_KEYS
from .diffusers_host import DiffusersHost, Interrupted
from .diffusers_host import Request as Txt2Img
from .library import Library
from .masks import MaskError, MaskStore, check_mask_name, decode_image, mask_hash

SCRIPT_TITLE = "NetWeave"


def png_base64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mask_info(name: str, img) -> dict:
    return {"name": name, "width": img.width, "height": img.height, "hash": mask_hash(img)}


class ParseRequest(BaseModel):
    prompt: str = Field(max_length=100_000)
    steps: int = Field(20, ge=1, le=500)
    hires_steps: Optional[int] = Field(None, ge=1, le=500)
    arch: Optional[str] = None
    strict: bool = False


def netweave_router(masks: MaskStore, library: Library, arch: Callable[[], str]) -> APIRouter:
    """The routes every host mounts; `arch()` is the loaded model's architecture."""
    r = APIRouter(prefix="/netweave/v1")

    @r.get("/masks")
    def list_masks():
        return {"masks": [_mask_info(n, masks[n]) for n in masks]}

    @r.get("/masks/{name}")
    def get_mask(name: str):
        try:
            img = masks[name]
        except KeyError:
            raise HTTPException(404, f"no mask named '{name}'") from None
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @r.put("/masks/{name}")
    async def put_mask(name: str, request: Request):
        """Body: the image (PNG, any type PIL reads) or JSON {"image": base64}."""
        data = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                data = json.loads(data)["image"]
            except (ValueError, KeyError, TypeError):
                raise HTTPException(400, 'JSON body must be {"image": "<base64>"}') from None
        try:
            return _mask_info(name, masks.put(name, data))
        except MaskError as exc:
            raise HTTPException(413 if "larger than" in str(exc) else 400, str(exc)) from None

    @r.delete("/masks/{name}")
    def delete_mask(name: str):
        try:
            masks.delete(name)
        except MaskError as exc:
            raise HTTPException(400, str(exc)) from None
        except KeyError:
            raise HTTPException(404, f"no mask named '{name}'") from None
        return {"deleted": name}

    @r.post("/parse")
    def parse(req: ParseRequest):
        try:
            ctx = CompileContext(arch=req.arch or arch(), steps=req.steps,
                                 hires_steps=req.hires_steps, masks=frozenset(masks),
                                 strict=req.strict)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return compile_prompt(req.prompt, ctx).to_dict()

    @r.get("/vocabulary")
    def vocabulary():
        """What the prompt box completes: tag kinds, keys (block names included), lbw presets,
        interpolations, built-in regions."""
        a = arch()
        return {"kinds": list(KINDS), "keys": list(KNOWN_KEYS) + list(BLOCKS[a]),
                "presets": sorted(PRESETS[a]), "interpolations": list(INTERPOLATIONS),
                "regions": list(BUILTIN_REGIONS)}

    @r.get("/networks")
    def networks():
        found = [library.describe("lora", n) for n in library.names("lora")]
        found += [library.describe("model", n) for n in library.names("model")]
        return {"networks": found}

    return r


class Txt2ImgBody(BaseModel):
    """A1111's /sdapi/v1/txt2img fields NetWeave's host uses; others are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = Field(1, ge=1, le=100)  # unbounded, one request could hold the host for days
    send_images: bool = True
    alwayson_scripts: Dict[str, Any] = Field(default_factory=dict)


def script_args(alwayson: Dict[str, Any]) -> Dict[str, Any]:
    """The NetWeave script's arguments from `alwayson_scripts`: {"args": [{"masks": {name:
    base64 PNG}}]} (title matched case-insensitively, as A1111 does)."""
    for title, entry in alwayson.items():
        if title.lower() == SCRIPT_TITLE.lower():
            args = entry.get("args", []) if isinstance(entry, dict) else None
            if not isinstance(args, list) or (args and not isinstance(args[0], dict)):
                raise HTTPException(422, 'alwayson_scripts.NetWeave.args must be [{"masks": {…}}]')
            return args[0] if args else {}
    return {}


def sdapi_router(host: DiffusersHost, library: Library) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1")

    @r.post("/txt2img")
    def txt2img(body: Txt2ImgBody):
        args = script_args(body.alwayson_scripts)
        inline = {}
        for name, data in (args.get("masks") or {}).items():
            try:
                check_mask_name(name)
                inline[name] = decode_image(data, f"mask '{name}'")
            except MaskError as exc:
                raise HTTPException(422, str(exc)) from None
        images: List = []
        infos, seeds, errors = [], [], []
        seed = body.seed
        for i in range(body.n_iter):
            req = Txt2Img(prompt=body.prompt, negative_prompt=body.negative_prompt,
                          steps=body.steps, cfg_scale=body.cfg_scale,
                          seed=seed if seed < 0 else seed + i * body.batch_size,
                          width=body.width, height=body.height, batch_size=body.batch_size,
                          masks=inline)
            try:
                result = host.txt2img(req)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            except Interrupted:
                break
            images += result.images
            infos += result.infotexts
            seeds += [result.seed + k for k in range(len(result.images))]
            errors = result.errors
        plan = host.last_plan.to_dict() if host.last_plan is not None else None
        info = {"prompt": body.prompt, "negative_prompt": body.negative_prompt,
                "seed": seeds[0] if seeds else body.seed, "all_seeds": seeds,
                "steps": body.steps, "cfg_scale": body.cfg_scale, "width": body.width,
                "height": body.height, "batch_size": body.batch_size,
                "sd_model_name": host.model.name, "infotexts": infos,
                "netweave": {"errors": errors, "plan": plan}}
        return {"images": [png_base64(im) for im in images] if body.send_images else [],
                "parameters": body.model_dump(), "info": json.dumps(info)}

    @r.get("/loras")
    def loras():
        out = []
        for name in library.names("lora"):
            path = library.find("lora", name)
            entry = library.describe("lora", name)
            out.append({"name": name, "alias": name, "path": path,
                        "metadata": entry["metadata"]})
        return out

    @r.get("/progress")
    def progress():
        p = host.progress
        return {"progress": p.fraction if p.busy else 0.0,
                "eta_relative": p.eta(),
                "state": {"skipped": False, "interrupted": p.interrupted, "job": p.job,
                          "job_count": 1 if p.busy else 0, "job_timestamp": "",
                          "job_no": 0, "sampling_step": p.step, "sampling_steps": p.steps},
                "current_image": None, "textinfo": None}

    @r.post("/interrupt")
    def interrupt(_: Optional[dict] = Body(None)):
        host.interrupt()
        return {}

    return r

