"""`/sdapi/v1/*`: the subset of A1111's API the standalone host serves, shaped so an A1111 client
works unchanged. Bodies are typed (pydantic) down to every script argument; generations wait in
a queue of their own, so an interrupt or a progress poll is answered at once however many are
waiting."""
from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

from fastapi import APIRouter, Body, HTTPException
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)
from typing_extensions import Annotated

from ...network.files import NetworkFileError
from ...parser.names import valid_unicode
from ..api import SCRIPT_TITLE, png_base64
from ..library import Library
from ..masks import MaskError, check_mask_name, decode_image
from .host import MAX_SEED, DiffusersHost, Interrupted
from .host import Request as Txt2Img
from .limits import OverBudget
from .samplers import sampler_named

MAX_QUEUED = 100  # generations waiting; more are refused (503) instead of held in memory


def _unicode(text: str) -> str:
    if not valid_unicode(text):
        raise ValueError("not valid Unicode (a lone surrogate)")
    return text


Text = Annotated[str, AfterValidator(_unicode)]


# A1111's txt2img request fields (1.10): echoed in "parameters" as A1111 does; other unknown
# fields are accepted, ignored and not echoed.
A1111_FIELDS = frozenset((
    "prompt negative_prompt styles seed subseed subseed_strength seed_resize_from_h "
    "seed_resize_from_w sampler_name sampler_index scheduler batch_size n_iter steps cfg_scale "
    "distilled_cfg_scale width height restore_faces tiling do_not_save_samples do_not_save_grid "
    "eta denoising_strength s_min_uncond s_churn s_tmax s_tmin s_noise override_settings "
    "override_settings_restore_afterwards refiner_checkpoint refiner_switch_at "
    "disable_extra_networks firstpass_image comments enable_hr firstphase_width "
    "firstphase_height hr_scale hr_upscaler hr_second_pass_steps hr_resize_x hr_resize_y "
    "hr_checkpoint_name hr_sampler_name hr_scheduler hr_prompt hr_negative_prompt force_task_id "
    "script_name script_args send_images save_images alwayson_scripts infotext").split())


class Txt2ImgBody(BaseModel):
    """A1111's /sdapi/v1/txt2img fields NetWeave's host uses; others are accepted and ignored."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data):
        """Every field, the ignored ones too, as JSON can say it back: no NaN, no lone
        surrogate (it would fail only when the answer is written)."""
        if isinstance(data, dict):
            for key, value in data.items():
                try:
                    json.dumps([key, value], ensure_ascii=False, allow_nan=False).encode("utf-8")
                except (ValueError, UnicodeEncodeError, RecursionError):
                    raise ValueError(f"field {key!r} holds a non-finite number or text that is "
                                     "not valid Unicode") from None
        return data

    prompt: Text = Field("", max_length=100_000)
    negative_prompt: Text = Field("", max_length=100_000)
    steps: int = Field(20, ge=1, le=500)
    cfg_scale: float = Field(7.0, ge=0, le=100)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    width: int = Field(512, ge=8, le=4096, multiple_of=8)
    height: int = Field(512, ge=8, le=4096, multiple_of=8)
    batch_size: int = Field(1, ge=1, le=16)
    n_iter: int = Field(1, ge=1, le=100)
    frames: int = Field(1, ge=1, le=241)  # a video model's (Wan: 4k+1), each a picture back
    sampler_name: Text = "Euler"
    send_images: bool = True

    @field_validator("sampler_name")
    @classmethod
    def _known_sampler(cls, name: str) -> str:
        return sampler_named(name).value
    alwayson_scripts: Dict[Text, Any] = Field(default_factory=dict)


class ScriptArgs(BaseModel):
    """NetWeave's own argument: inline masks, name → base64 image."""
    model_config = ConfigDict(extra="ignore")
    masks: Dict[Text, Text] = Field(default_factory=dict)


def script_args(alwayson: Dict[str, Any]) -> ScriptArgs:
    """The NetWeave script's arguments from `alwayson_scripts`: {"args": [{"masks": {name:
    base64 PNG}}]}, or the WebUIs' [true, {"masks": …}] (title matched case-insensitively, as
    A1111 does). Any other shape is a 422 that says where."""
    for title, entry in alwayson.items():
        if title.lower() != SCRIPT_TITLE.lower():
            continue
        where = f"alwayson_scripts.{title}"
        if not isinstance(entry, dict):
            raise HTTPException(422, f'{where} must be an object {{"args": [...]}}')
        args = entry.get("args", [])
        if not isinstance(args, list):
            raise HTTPException(422, f"{where}.args must be a list, not {type(args).__name__}")
        found = ScriptArgs()
        for i, arg in enumerate(args):
            if isinstance(arg, bool) or arg is None:  # the WebUIs' on/off flag
                continue
            if not isinstance(arg, dict):
                raise HTTPException(422, f"{where}.args[{i}] must be true/false or "
                                         f'{{"masks": {{name: base64}}}}, not {type(arg).__name__}')
            try:
                found = ScriptArgs.model_validate(arg)
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in first["loc"])
                raise HTTPException(422, f"{where}.args[{i}]{loc}: {first['msg']}") from None
        return found
    return ScriptArgs()


def sdapi_router(host: DiffusersHost, library: Library) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1")
    # Generations run one at a time on the model: waiting ones sit in this queue, not in the
    # server's thread pool, which stays free for interrupts, progress and the mask routes.
    queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netweave-txt2img")
    waiting = [0]
    count = threading.Lock()

    def guidance(body: Txt2ImgBody) -> float:
        """The CFG field: on a guidance-distilled model (Flux dev) Forge's clients send the
        guidance as `distilled_cfg_scale` (and cfg_scale 1): that one when it is given."""
        distilled = getattr(body, "distilled_cfg_scale", None)
        if host.model.distilled and isinstance(distilled, (int, float)) and \
                not isinstance(distilled, bool) and 0 <= distilled <= 100:
            return float(distilled)
        return body.cfg_scale

    def generate(body: Txt2ImgBody, args: ScriptArgs) -> dict:
        inline = {}
        for name, data in args.masks.items():
            try:
                check_mask_name(name)
                inline[name] = decode_image(data, f"mask '{name}'")
            except MaskError as exc:
                raise HTTPException(422, str(exc)) from None
        images: List = []
        infos, seeds, errors, plan = [], [], [], None
        seed = body.seed
        for i in range(body.n_iter):
            req = Txt2Img(prompt=body.prompt, negative_prompt=body.negative_prompt,
                          steps=body.steps, cfg_scale=guidance(body),
                          seed=seed if seed < 0 else seed + i * body.batch_size,
                          width=body.width, height=body.height, batch_size=body.batch_size,
                          masks=inline, sampler=sampler_named(body.sampler_name),
                          frames=body.frames)
            try:
                result = host.txt2img(req)
            except NetworkFileError as exc:  # changed on disk twice during one generation
                raise HTTPException(409, str(exc)) from None
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            except Interrupted:
                break
            images += result.images
            infos += result.infotexts
            seeds += [result.seed + k // body.frames for k in range(len(result.images))]
            errors, plan = result.errors, result.plan.to_dict()  # this request's own
        info = {"prompt": body.prompt, "negative_prompt": body.negative_prompt,
                "seed": seeds[0] if seeds else body.seed, "all_seeds": seeds,
                "steps": body.steps, "cfg_scale": body.cfg_scale, "width": body.width,
                "height": body.height, "batch_size": body.batch_size,
                "sd_model_name": host.model.name, "infotexts": infos,
                "netweave": {"errors": errors, "plan": plan}}
        return {"images": [png_base64(im) for im in images] if body.send_images else [],
                "parameters": {k: v for k, v in body.model_dump().items() if k in A1111_FIELDS},
                "info": json.dumps(info)}

    @r.post("/txt2img")
    async def txt2img(body: Txt2ImgBody):
        args = script_args(body.alwayson_scripts)
        try:
            host.limits.check_work(body.width, body.height, body.steps,
                                   body.batch_size * body.n_iter * body.frames)
        except OverBudget as exc:
            raise HTTPException(422, str(exc)) from None
        with count:
            if waiting[0] >= MAX_QUEUED:
                raise HTTPException(503, f"{MAX_QUEUED} generations are waiting; try again later")
            waiting[0] += 1
        try:
            return await asyncio.wrap_future(queue.submit(generate, body, args))
        finally:
            with count:
                waiting[0] -= 1

    @r.get("/loras")
    def loras():
        out = []
        for name in library.names("lora"):
            entry = library.describe("lora", name)  # its path relative to the host's folder
            out.append({"name": name, "alias": name, "path": entry["path"],
                        "metadata": entry["metadata"]})
        return out

    @r.get("/samplers")
    def samplers():
        return [{"name": s.value, "aliases": [], "options": {}} for s in host.samplers()]

    @r.get("/progress")
    async def progress():
        p = host.progress
        return {"progress": p.fraction if p.busy else 0.0,
                "eta_relative": p.eta(),
                "state": {"skipped": False, "interrupted": p.interrupted, "job": p.job,
                          "job_count": 1 if p.busy else 0, "job_timestamp": "",
                          "job_no": 0, "sampling_step": p.step, "sampling_steps": p.steps},
                "current_image": None, "textinfo": None}

    @r.post("/interrupt")
    async def interrupt(_: Optional[dict] = Body(None)):
        host.interrupt()
        return {}

    return r

