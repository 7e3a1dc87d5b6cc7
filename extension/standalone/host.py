"""NetWeave on a diffusers Stable Diffusion / SDXL pipeline (the standalone host; SD.Next runs
the same pipelines), and on the pipelines of flow-matching transformers — Flux, Chroma,
Z-Image, Qwen-Image, SD3/3.5, Wan 2.2 (extension/flow_run.py, flow_families.py).

One generation: the prompt's tags compile to a plan; the engine merges it at step 0; the text
is encoded once per text-encoder segment (and once more per regional text-encoder network);
the pipeline runs with those embeddings, and its step callback moves the engine to the next
step and swaps the embeddings where a segment ends. Generations are serialized on the model:
a second request waits for the first.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
from PIL import Image

from ...network.engine import Engine
from ...network.files import NetworkFileError
from ...network.plan import CompileContext, Plan
from ...parser.names import valid_unicode
from ..library import Library
from ..pipeline_run import PipelineRun
from ..report import Report
from ..session import Session, compile_context
from ..settings import Settings
from .limits import Limits
from .models import Model
from ..experts import flow_engine
from ..flow_run import FlowRun, flow_schedule, high_noise_steps
from .samplers import FLOW_SAMPLERS, Sampler, scheduler_for, step_sigmas


MAX_SEED = 2 ** 62  # seed + image index stays a 64-bit generator seed


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
    sampler: Sampler = Sampler.EULER
    frames: int = 1  # a video model's frames (Wan: 4k+1); 1, a picture, for every model

    def check(self) -> None:
        problems = []
        if not 1 <= self.frames <= 241 or (self.frames - 1) % 4:
            problems.append(f"frames must be 1, 5, 9, … (4k+1) up to 241, not {self.frames}")
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
        if not -1 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be -1 (random) or 0–{MAX_SEED}, not {self.seed}")
        if len(self.prompt) + len(self.negative_prompt) > 100_000:
            problems.append("the prompt is longer than 100,000 characters")
        for name in ("prompt", "negative_prompt"):
            if not valid_unicode(getattr(self, name)):
                problems.append(f"{name} is not valid Unicode (a lone surrogate)")
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
                 device: str = "cpu", settings: Optional[Settings] = None,
                 limits: Optional[Limits] = None):
        self.model = model
        self.limits = limits or Limits()
        self.library = library
        self.masks = masks if masks is not None else {}
        self.device = device
        self.settings = settings or Settings()
        model.pipe.to(device)
        self.scheduler_config = model.pipe.scheduler.config  # each sampler is built from it
        self.engine = flow_engine(model.pipe, model.arch, model.trees(), library.find) \
            if model.flow else Engine(model.trees(), model.arch, library.find)
        self.lock = threading.Lock()
        self.progress = Progress()

    def samplers(self) -> List[Sampler]:
        """The samplers this model runs with (a flow model: its pipeline's Euler)."""
        return list(FLOW_SAMPLERS) if self.model.flow else list(Sampler)

    def context(self, steps: int, sampler: Sampler = Sampler.EULER) -> CompileContext:
        """What the tab's explain compiles against (the sigmas of `sampler` at `steps`; a flow
        model's at its own picture size, which its shift depends on)."""
        if self.model.flow:
            size = self.model.size
            sigmas, _ = flow_schedule(self.model.pipe, steps, self.model.latent(size, size))
            ctx = compile_context(self.model.arch, self.settings, steps, masks=self.masks,
                                  sigmas=sigmas, negative_rows=not self.model.distilled)
            experts = getattr(self.engine, "experts", None)  # Wan 2.2: the first expert's plan
            high = high_noise_steps(self.model.pipe, steps, self.model.latent(size, size))
            return dataclasses.replace(ctx, expert=experts[0], switch_step=high) if experts \
                else ctx
        sigmas = step_sigmas(scheduler_for(Sampler(sampler), self.scheduler_config), steps)
        return compile_context(self.model.arch, self.settings, steps, masks=self.masks,
                               sigmas=sigmas)

    def interrupt(self) -> None:
        self.progress.interrupted = True

    def check(self, req: Request) -> None:
        """What this model cannot run (ValueError): a picture size off its latent grid, a
        sampler its pipeline does not take."""
        step = self.model.vae_scale
        if self.model.flow and (req.width % step or req.height % step):
            raise ValueError(f"width and height must be multiples of {step} for this "
                             f"{self.model.arch} model (2×2 patches of the latent), not "
                             f"{req.width}x{req.height}")
        if req.frames > 1 and not self._video:
            raise ValueError(f"this {self.model.arch} model draws pictures, not videos: frames "
                             f"must be 1, not {req.frames}")
        if Sampler(req.sampler) not in self.samplers():
            raise ValueError(f"this {self.model.arch} model samples with "
                             + ", ".join(s.value for s in self.samplers())
                             + f" (its pipeline's scheduler), not {req.sampler}")

    @property
    def _video(self) -> bool:
        import inspect
        return "num_frames" in inspect.signature(type(self.model.pipe).__call__).parameters

    def txt2img(self, req: Request) -> Result:
        """One batch; ValueError (before anything runs) for a request out of bounds."""
        req.check()
        self.check(req)
        self.limits.check_work(req.width, req.height, req.steps, req.batch_size * req.frames)
        with self.lock:  # one generation at a time on this model
            self.progress = Progress(job=f"txt2img {time.time():.0f}", steps=req.steps,
                                     started=time.time(), busy=True)
            try:
                return self._generate(req)
            except NetworkFileError as exc:
                # A file changed on disk while the generation read it (weights are restored):
                # once more, the changed file read again or refused as its tag's error.
                result = self._generate(req)
                result.errors.insert(0, f"{exc}; the generation was run again")
                return result
            finally:
                self.progress.busy = False

    def _generate(self, req: Request) -> Result:
        if self.model.flow:
            return self._generate_flow(req)
        pipe, engine = self.model.pipe, self.engine
        session = Session(engine, self.library, self.masks, self.settings)
        seed = req.seed if req.seed >= 0 else int(np.random.default_rng().integers(2 ** 31))
        b = req.batch_size
        cfg = req.cfg_scale > 1.0
        pipe.scheduler = scheduler_for(Sampler(req.sampler), self.scheduler_config)
        # the pipeline's own sigmas, from a twin of its scheduler set up as it will set it up
        sigmas = step_sigmas(scheduler_for(Sampler(req.sampler), self.scheduler_config),
                             req.steps)
        try:
            plan, = session.prepare(
                [req.prompt], steps=req.steps, inline=req.masks, rows=2 * b if cfg else b,
                latent=self.model.latent(req.height, req.width),
                sigmas=sigmas)
            run = PipelineRun(engine, pipe, self.model.arch, self.device, plan.prompt,
                              req.negative_prompt, b, cfg, req.steps)
            out = pipe(**run.first_args(), num_inference_steps=req.steps,
                       guidance_scale=req.cfg_scale, height=req.height, width=req.width,
                       generator=torch.Generator("cpu").manual_seed(seed),
                       callback_on_step_end=self._step_callback(run),
                       callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs,
                       output_type="pil")
        except BaseException:
            engine.deactivate()  # nothing stays changed after a failed generation
            raise
        session.collect()
        images = list(out.images)
        info = [self.infotext(req, seed + i, session.report) for i in range(len(images))]
        return Result(images, seed, plan, session.report.lines(), info)

    def _step_callback(self, run):
        """The pipeline's step-end callback: progress, an interrupt, the engine's next step."""
        def on_step_end(pipe_, i, t, kwargs):
            self.progress.step = i + 1
            if self.progress.interrupted:
                raise Interrupted("interrupted")
            return run.step_end(i)
        return on_step_end

    def _generate_flow(self, req: Request) -> Result:
        """A flow family's pipeline (flow_families.py): the CFG field becomes the argument its
        family takes (Flux dev's distilled guidance: no negative rows; Qwen-Image's
        true_cfg_scale; else guidance_scale), and the negative prompt runs where the pipeline
        would run it; the plan gets the very sigmas the pipeline samples with at this size.
        A video model (Wan) returns each video's frames in order."""
        model, engine = self.model, self.engine
        pipe, family = model.pipe, model.family
        seed = req.seed if req.seed >= 0 else int(np.random.default_rng().integers(2 ** 31))
        b = req.batch_size
        cfg = family.cfg(req.cfg_scale, model.distilled)
        latent = model.latent(req.height, req.width)
        sigmas, shift = flow_schedule(pipe, req.steps, latent)
        high = high_noise_steps(pipe, req.steps, latent)  # Wan 2.2: the experts' switch
        session = Session(engine, self.library, self.masks, self.settings)
        run = None
        try:
            plan, = session.prepare([req.prompt], steps=req.steps, inline=req.masks, rows=b,
                                    latent=latent, sigmas=sigmas, negative_rows=cfg,
                                    switch_step=high)
            run = FlowRun(engine, pipe, model.arch, self.device, plan.prompt,
                          req.negative_prompt, b, cfg, req.steps)
            extra = {"num_frames": req.frames} if self._video else {}
            out = pipe(**run.first_args(), **family.guidance_args(req.cfg_scale, cfg,
                                                                   model.distilled),
                       **extra, num_inference_steps=req.steps, height=req.height,
                       width=req.width, max_sequence_length=run.length,
                       generator=torch.Generator("cpu").manual_seed(seed),
                       callback_on_step_end=self._step_callback(run), output_type="pil")
        except BaseException:
            engine.deactivate()  # nothing stays changed after a failed generation
            raise
        finally:
            if run is not None:
                run.close()
        session.collect()
        images = list(out.images) if hasattr(out, "images") else \
            [frame for video in out.frames for frame in video]
        extra = {"Shift": round(shift, 4)}
        if high is not None:  # Wan 2.2: where the low-noise expert takes over
            extra["Experts"] = f"high 1-{high}, low {high + 1}-{req.steps}"
        if self._video:
            extra["Frames"] = req.frames
        per = len(images) // b  # a video's frames share its seed
        info = [self.infotext(req, seed + i // per, session.report, extra)
                for i in range(len(images))]
        return Result(images, seed, plan, session.report.lines(), info)

    # ---- infotext -----------------------------------------------------------------------
    def infotext(self, req: Request, seed: int, report: Report, extra: Optional[dict] = None) -> str:
        """A1111's layout: the prompt with its tags, the negative prompt, then parameters
        (a value with `,`, `:` or a line break JSON-quoted, as A1111 writes it); NetWeave adds
        its report: masks used (name:hash), `Lora hashes`, problems. Flux dev's guidance is
        Forge's `Distilled CFG Scale` (its CFG scale is 1: no negative pass); a flow model
        adds the shift of its schedule (`explain --shift` takes it)."""
        cfg = {"CFG scale": req.cfg_scale}
        if self.model.distilled:
            cfg = {"CFG scale": 1, "Distilled CFG Scale": req.cfg_scale}
        params = {"Steps": req.steps, "Sampler": str(req.sampler), **cfg, **(extra or {}),
                  "Seed": seed, "Size": f"{req.width}x{req.height}", "Model": self.model.name,
                  **report.infotext()}
        text = req.prompt + ("\nNegative prompt: " + req.negative_prompt if req.negative_prompt else "")
        return text + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in params.items())


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text
