"""NetWeave on a diffusers Stable Diffusion / SDXL pipeline (the standalone host; SD.Next runs
the same pipelines).

One generation: the prompt's tags compile to a plan; the engine merges it at step 0; the text
is encoded once per text-encoder segment (and once more per regional text-encoder network);
the pipeline runs with those embeddings, and its step callback moves the engine to the next
step and swaps the embeddings where a segment ends. Generations are serialized on the model:
a second request waits for the first.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
from PIL import Image

from ..network.engine import Engine
from ..network.plan import CompileContext, Plan, compile_prompt, region_masks
from .library import Library
from .masks import Overlay, mask_hash
from .models import Model


class Interrupted(Exception):
    """The user stopped the generation."""


@dataclass
class Request:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    masks: Dict[str, Image.Image] = field(default_factory=dict)  # inline, in front of the store

    def check(self) -> None:
        problems = []
        if not 1 <= self.steps <= 500:
            problems.append(f"steps must be 1–500, not {self.steps}")
        if not 1 <= self.batch_size <= 16:
            problems.append(f"batch_size must be 1–16, not {self.batch_size}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not 8 <= v <= 4096 or v % 8:
                problems.append(f"{name} must be a multiple of 8 from 8 to 4096, not {v}")
        if not 0 <= self.cfg_scale <= 100:
            problems.append(f"cfg_scale must be 0–100, not {self.cfg_scale}")
        if len(self.prompt) + len(self.negative_prompt) > 100_000:
            problems.append("the prompt is longer than 100,000 characters")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Result:
    images: List[Image.Image]
    seed: int
    plan: Plan
    errors: List[str]  # parse errors and engine problems, each one line
    infotexts: List[str]


@dataclass
class Progress:
    job: str = ""
    step: int = 0
    steps: int = 0
    started: float = 0.0
    busy: bool = False
    interrupted: bool = False

    @property
    def fraction(self) -> float:
        return self.step / self.steps if self.steps else 0.0

    def eta(self) -> float:
        if not self.busy or not self.step:
            return 0.0
        return (time.time() - self.started) / self.step * (self.steps - self.step)


class DiffusersHost:
    def __init__(self, model: Model, library: Library, masks: Optional[Mapping] = None,
                 device: str = "cpu", strict: bool = False):
        self.model = model
        self.library = library
        self.masks = masks if masks is not None else {}
        self.device = device
        self.strict = strict
        model.pipe.to(device)
        self.engine = Engine(model.trees(), model.arch, library.find)
        self.lock = threading.Lock()
        self.progress = Progress()
        self.last_plan: Optional[Plan] = None

    def context(self, steps: int, masks: Mapping) -> CompileContext:
        return CompileContext(arch=self.model.arch, steps=steps, masks=frozenset(masks),
                              strict=self.strict)

    def interrupt(self) -> None:
        self.progress.interrupted = True

    def txt2img(self, req: Request) -> Result:
        req.check()
        with self.lock:  # one generation at a time on this model
            self.progress = Progress(job=f"txt2img {time.time():.0f}", steps=req.steps,
                                     started=time.time(), busy=True)
            try:
                return self._generate(req)
            finally:
                self.progress.busy = False

    def _generate(self, req: Request) -> Result:
        pipe, engine = self.model.pipe, self.engine
        masks = Overlay(req.masks, self.masks)
        plan = compile_prompt(req.prompt, self.context(req.steps, masks))
        self.last_plan = plan
        errors = [f"{e.severity}: {e.message} (column {e.column})" for e in plan.errors]
        seed = req.seed if req.seed >= 0 else int(np.random.default_rng().integers(2 ** 31))
        b = req.batch_size
        cfg = req.cfg_scale > 1.0
        engine.latent = (req.height // self.model.vae_scale, req.width // self.model.vae_scale)
        engine.batch = 2 * b if cfg else b
        engine.masks = masks
        try:
            engine.activate(plan)  # its problems are in engine.errors, with those of the run
            engine.set_rows([0] * engine.batch, [True] * b * cfg + [False] * b)
            embeds = self._encodings(plan.prompt, req.negative_prompt, b, cfg)
            state = {"segment": engine.segment_at(0)}
            engine.set_step(0)
            self._use(embeds, state["segment"], cfg)

            def on_step_end(pipe_, i, t, kwargs):
                self.progress.step = i + 1
                if self.progress.interrupted:
                    raise Interrupted("interrupted")
                k = i + 1
                if k >= req.steps:
                    return {}
                engine.set_step(k)
                seg = engine.segment_at(k)
                if seg == state["segment"]:
                    return {}
                state["segment"] = seg
                return {"prompt_embeds": self._use(embeds, seg, cfg)}

            first = embeds[state["segment"]]
            out = pipe(prompt_embeds=first["pos"], negative_prompt_embeds=first["neg"] if cfg else None,
                       **self._pooled(first, cfg), num_inference_steps=req.steps,
                       guidance_scale=req.cfg_scale, height=req.height, width=req.width,
                       generator=torch.Generator("cpu").manual_seed(seed),
                       callback_on_step_end=on_step_end,
                       callback_on_step_end_tensor_inputs=["prompt_embeds"], output_type="pil")
        except BaseException:
            engine.deactivate()  # nothing stays changed after a failed generation
            raise
        errors += engine.errors
        images = list(out.images)
        info = [self.infotext(req, seed + i, plan, errors, masks) for i in range(len(images))]
        return Result(images, seed, plan, errors, info)

    # ---- text ------------------------------------------------------------------------
    def _encode(self, text: str, b: int) -> dict:
        pipe = self.model.pipe
        with torch.no_grad():
            out = pipe.encode_prompt(prompt=text, device=self.device, num_images_per_prompt=b,
                                     do_classifier_free_guidance=False)
        if self.model.arch == "sdxl":  # (embeds, neg, pooled, neg_pooled)
            return {"embeds": out[0], "pooled": out[2]}
        return {"embeds": out[0]}

    def _encodings(self, prompt: str, negative: str, b: int, cfg: bool) -> dict:
        """Per segment: the prompt and negative encodings and the regional variants."""
        engine, found = self.engine, {}
        for seg in engine.te_segments():
            engine.apply_te(seg)
            pos = self._encode(prompt, b)
            neg = None
            if cfg:
                engine.apply_te(seg, uncond=True)
                neg = self._encode(negative, b)
            variants = {}
            for j in seg.variants:
                engine.apply_te(seg, variant=j)
                variants[j] = self._encode(prompt, b)["embeds"]
            found[seg] = {"pos": pos["embeds"], "neg": None if neg is None else neg["embeds"],
                          "pooled": pos.get("pooled"),
                          "neg_pooled": None if neg is None else neg.get("pooled"),
                          "variants": variants}
        return found

    def _use(self, embeds: dict, seg, cfg: bool) -> torch.Tensor:
        """The UNet's conditioning for a segment ([negative; prompt] rows with CFG, as the
        pipeline concatenates them), and the regional variants given to the engine."""
        e = embeds[seg]
        rows = torch.cat([e["neg"], e["pos"]]) if cfg else e["pos"]
        self.engine.set_text_variants(rows, {
            j: torch.cat([e["neg"], v]) if cfg else v for j, v in e["variants"].items()})
        return rows

    def _pooled(self, e: dict, cfg: bool) -> dict:
        if self.model.arch != "sdxl":
            return {}
        return {"pooled_prompt_embeds": e["pooled"],
                "negative_pooled_prompt_embeds": e["neg_pooled"] if cfg else None}

    # ---- infotext -----------------------------------------------------------------------
    def infotext(self, req: Request, seed: int, plan: Plan, errors: List[str], masks) -> str:
        """A1111's layout: the prompt with its tags, the negative prompt, then parameters;
        NetWeave adds the masks it used (name:hash) and its errors."""
        params = {"Steps": req.steps, "Sampler": "Euler", "CFG scale": req.cfg_scale,
                  "Seed": seed, "Size": f"{req.width}x{req.height}", "Model": self.model.name}
        used = sorted({m for n in plan.networks if n.region is not None
                       for m in region_masks(n.region) if m in masks})
        if used:
            params["NetWeave masks"] = ",".join(f"{m}:{mask_hash(masks[m])}" for m in used)
        if errors:
            params["NetWeave errors"] = " | ".join(e.replace(",", ";") for e in errors)
        text = req.prompt + ("\nNegative prompt: " + req.negative_prompt if req.negative_prompt else "")
        return text + "\n" + ", ".join(f"{k}: {v}" for k, v in params.items())

