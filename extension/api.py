"""`/netweave/v1/*`: NetWeave's own HTTP API, the same in every host (masks, parse, vocabulary,
networks). Bad requests get a 4xx with a message, never a 500: bodies are checked field by field,
text must be valid Unicode, numbers finite and in range. The standalone host's A1111-shaped
routes are in standalone/sdapi.py."""
from __future__ import annotations

import base64
import inspect
import io
import json
from dataclasses import dataclass
from typing import Callable, Optional

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from ..network.blocks import BLOCKS, PRESETS
from ..network.plan import KEYED_BLOCKS, CompileContext, compile_prompt
from ..parser import BUILTIN_REGIONS, INTERPOLATIONS, KINDS, KNOWN_KEYS
from ..parser.names import valid_unicode
from .library import Library
from .masks import MAX_BYTES, MaskError, MaskStore, UnreadableMask, mask_hash

MASK_BODY = MAX_BYTES * 4 // 3 + 1024  # a mask as base64 in JSON
PARSE_BODY = 1 << 20  # a prompt of 100,000 characters, escaped


# FastAPI refuses a body over a route's max_body_size from its Content-Length, unread; the
# WebUIs' FastAPI (0.94–0.124) has no such argument: there the route reads at most the limit.
ROUTE_LIMIT = {"max_body_size": MASK_BODY} \
    if "max_body_size" in inspect.signature(APIRouter.put).parameters else {}


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, or a 413 once it is known to be over `limit` bytes."""
    said = request.headers.get("content-length", "")
    if said.isdigit() and int(said) > limit:
        raise HTTPException(413, f"the request body ({said} bytes) is over this route's limit "
                                 f"of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the request body is over this route's limit of "
                                     f"{limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)



SCRIPT_TITLE = "NetWeave"


def png_base64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _mask_info(name: str, img) -> dict:
    return {"name": name, "width": img.width, "height": img.height, "hash": mask_hash(img)}


@dataclass(frozen=True)
class ParseRequest:
    """POST /parse's body. Checked by hand, not by a pydantic model: the WebUIs this router
    runs in have pydantic 1 (A1111) or 2 (Forge, SD.Next)."""

    prompt: str
    steps: int = 20
    hires_steps: Optional[int] = None
    arch: Optional[str] = None
    strict: bool = False

    @classmethod
    def from_json(cls, data) -> "ParseRequest":
        """ValueError saying which field is wrong and how."""
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("prompt: a string is required")
        if len(prompt) > 100_000 or not valid_unicode(prompt):
            raise ValueError("prompt: at most 100,000 characters of valid Unicode")
        for name, default in (("steps", 20), ("hires_steps", None)):
            value = data.get(name, default)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= 500):
                raise ValueError(f"{name} must be a whole number from 1 to 500, not {value!r}")
        if not isinstance(data.get("arch") or "", str):
            raise ValueError("arch: a string, such as sd1")
        if not isinstance(data.get("strict", False), bool):
            raise ValueError("strict: true or false")
        return cls(prompt, data.get("steps", 20), data.get("hires_steps"), data.get("arch"),
                   data.get("strict", False))


def netweave_router(masks: MaskStore, library: Library, arch: Callable[[], str]) -> APIRouter:
    """The routes every host mounts; `arch()` is the loaded model's architecture."""
    r = APIRouter(prefix="/netweave/v1")

    @r.get("/masks")
    def list_masks():
        found = []
        for n in masks:
            try:
                found.append(_mask_info(n, masks[n]))
            except UnreadableMask as exc:  # listed with its problem; the others still work
                found.append({"name": n, "error": str(exc)})
            except KeyError:  # deleted meanwhile
                pass
        return {"masks": found}

    @r.get("/masks/{name}")
    def get_mask(name: str):
        try:
            img = masks[name]
        except KeyError:
            raise HTTPException(404, f"no mask named '{name}'") from None
        except UnreadableMask as exc:
            raise HTTPException(409, str(exc)) from None
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @r.put("/masks/{name}", **ROUTE_LIMIT)
    async def put_mask(name: str, request: Request):
        """Body: the image (PNG, any type PIL reads) or JSON {"image": base64}."""
        data = await read_capped(request, MASK_BODY)
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                data = json.loads(data)["image"]
            except (ValueError, KeyError, TypeError):
                raise HTTPException(400, 'JSON body must be {"image": "<base64>"}') from None
        try:
            return _mask_info(name, masks.put(name, data))
        except MaskError as exc:
            raise HTTPException(413 if "larger than" in str(exc) else 400, str(exc)) from None
        except OSError as exc:
            raise HTTPException(507, f"the mask could not be written ({exc.strerror})") from None

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
    async def parse(request: Request):
        try:
            req = ParseRequest.from_json(json.loads(await read_capped(request, PARSE_BODY)))
        except ValueError as exc:  # JSON's own errors are ValueErrors too
            raise HTTPException(422, str(exc)) from None
        try:
            ctx = CompileContext(arch=req.arch or arch(), steps=req.steps,
                                 hires_steps=req.hires_steps, masks=frozenset(masks),
                                 networks=frozenset(library.names("lora")),
                                 models=frozenset(library.names("model")), strict=req.strict)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return compile_prompt(req.prompt, ctx).to_dict()

    @r.get("/vocabulary")
    def vocabulary():
        """What the prompt box completes: tag kinds, keys (block names included), lbw presets,
        interpolations, built-in regions."""
        a = arch()
        return {"kinds": list(KINDS), "keys": completion_keys(a),
                "presets": sorted(PRESETS[a]), "interpolations": list(INTERPOLATIONS),
                "regions": list(BUILTIN_REGIONS)}

    @r.get("/networks")
    def networks():
        found = [library.describe("lora", n) for n in library.names("lora")]
        found += [library.describe("model", n) for n in library.names("model")]
        return {"networks": found}

    return r


def completion_keys(arch: str) -> list:
    """The keys a tag takes on `arch`: every non-block key, and the block keys of the blocks
    it has (a text encoder's only where it has that encoder; a transformer's IN and OUT blocks
    are the in= and out= groups' keys already)."""
    words = [k for k in KNOWN_KEYS if not k.isupper()]
    blocks = [b for b in BLOCKS[arch] if b in KEYED_BLOCKS[arch] and b.lower() not in words]
    return words + blocks
