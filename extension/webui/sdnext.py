"""SD.Next host adapter (diffusers pipelines; docs/design.md §6). SD.Next has no per-step script callback (`on_cfg_denoiser` is never
fired), activates extra networks once per pass right before it encodes the prompt, and merges
`p.task_args` over the pipeline's arguments. So:

- `process`: take the `lora`, `lyco`, `loractl` and `model` names; the built-in Lora is first
  told to load nothing (it puts back what it merged). Disabled: names back, weights restored.
- `before_process_batch` (the prompts still have their tags): the plan.
- our handler's `activate` (SD.Next calls it in `process_base`, just before encoding): the
  engine activated and the text encoders left as step 0 has them, so SD.Next's own encoding
  is right; `p.task_args["callback_on_step_end"]` becomes a wrapper that first runs SD.Next's
  `diffusers_callback` (progress, interrupt, previews), then moves the engine and swaps the
  embeddings where a text-encoder segment ends (PipelineRun, as in the standalone host).
- The tags stay in `p.network_data`, part of SD.Next's prompt-embedding cache key.
- The hires pass (a second pipeline call with the same callback): the last base step moves the
  weights to hires step 0 and the `hr*` strengths follow.
One prompt per batch: SD.Next keeps one network set per batch, so NetWeave uses the first
prompt's plan for every image.
"""
from __future__ import annotations

from typing import Dict, Optional

from modules import extra_networks, processing_callbacks, script_callbacks, scripts, shared

from ...network.engine import Engine
from ...network.plan import CompileContext
from ..api import netweave_router
from ..masks import MaskError, MaskStore
from ..pipeline_run import PipelineRun
from ..session import Session, compile_context
from .common import (ScriptParts, TagNames, inline_masks, library, mask_folder,
                     register_settings, settings, ui_tab, write_report)


class NetWeaveNetworks(extra_networks.ExtraNetwork):
    """Holds our tag names. SD.Next calls every handler once per pass right before encoding;
    the first call of a pass starts NetWeave's run."""

    def activate(self, p, params_list, step=0, include=None, exclude=None):
        ADAPTER.start_pass(p)

    def deactivate(self, p, force=False):
        pass


def pipeline():
    return getattr(shared.sd_model, "pipe", shared.sd_model)  # some wrappers nest it


class Adapter:
    def __init__(self):
        self.engine: Optional[Engine] = None
        self.model_id: Optional[int] = None
        self.names = TagNames(NetWeaveNetworks)
        self.masks = MaskStore(mask_folder)
        self.prompt: Optional[str] = None  # the batch's, with its tags
        self.session: Optional[Session] = None
        self.params: Dict = {}  # the generation's extra_generation_params
        self.inline: Dict = {}
        self.problems = []
        self.started = None  # the p whose pass has begun
        self.run: Optional[PipelineRun] = None

    @staticmethod
    def arch() -> str:
        if shared.sd_model_type == "sdxl":
            return "sdxl"
        unet = pipeline().unet
        return "sd2" if getattr(unet.config, "cross_attention_dim", 768) == 1024 else "sd1"

    def engine_for(self) -> Engine:
        pipe = pipeline()
        if self.engine is None or self.model_id != id(pipe.unet):
            if self.engine is not None:
                self.engine.deactivate()
            trees = {"unet": pipe.unet, "te1": pipe.text_encoder}
            if getattr(pipe, "text_encoder_2", None) is not None:
                trees["te2"] = pipe.text_encoder_2
            self.engine = Engine(trees, self.arch(), library().find)
            self.model_id = id(pipe.unet)
        return self.engine

    def take_names(self, p) -> None:
        self.names.take(p)  # the built-in puts back what it merged before NetWeave copies

    def off(self) -> None:
        self.names.give_back()
        if self.engine is not None:
            self.engine.deactivate()
        self.prompt = self.run = self.session = None

    def context(self, steps: int) -> CompileContext:
        """What the tab's explain compiles against."""
        return compile_context(self.arch(), settings(), steps, masks=self.masks)

    def plan_batch(self, p, prompts, options) -> None:
        """The prompts still have their tags here; the engine starts with the pass."""
        self.inline, self.problems = {}, []
        try:
            self.inline = inline_masks(options)
        except (MaskError, ValueError) as exc:
            self.problems.append(f"masks: {exc}")
        self.prompt = prompts[0]
        self.started = None
        p.task_args["callback_on_step_end"] = self.step_end

    def start_pass(self, p) -> None:
        if self.started is p:
            return  # the other names of the same pass
        self.started = p
        if self.prompt is None:  # NetWeave's script did not see this generation: no network
            if self.engine is not None:
                self.engine.deactivate()
            self.run = self.session = None
            return
        engine = self.engine_for()
        session = Session(engine, library(), self.masks, settings())
        vae_scale = getattr(pipeline(), "vae_scale_factor", 8)
        cfg = p.cfg_scale > 1
        hires = (getattr(p, "hr_second_pass_steps", 0) or p.steps) \
            if getattr(p, "enable_hr", False) else None
        plan, = session.prepare([self.prompt], steps=p.steps, hires_steps=hires,
                                latent=(p.height // vae_scale, p.width // vae_scale),
                                rows=(2 if cfg else 1) * p.batch_size, inline=self.inline,
                                problems=self.problems)
        self.run = PipelineRun(engine, pipeline(), engine.arch, pipeline().device,
                               plan.prompt, p.negative_prompts[0], p.batch_size, cfg,
                               p.steps, plan.hires_steps)
        self.session, self.params = session, p.extra_generation_params
        self.prompt = None  # used: the next generation brings its own
        write_report(p.extra_generation_params, session.report)

    def step_end(self, pipe, step, timestep, kwargs):
        kwargs = processing_callbacks.diffusers_callback(pipe, step, timestep, kwargs)
        if self.run is not None:
            kwargs.update(self.run.step_end(step))
            if self.session.collect():  # found while sampling: into the infotext too
                write_report(self.params, self.session.report)
        return kwargs


ADAPTER = Adapter()


class NetWeaveScript(ScriptParts, scripts.Script):
    adapter = ADAPTER

    def batch(self, p, prompts, options):
        ADAPTER.plan_batch(p, prompts, options)


def on_app_started(demo, app) -> None:
    app.include_router(netweave_router(ADAPTER.masks, library(), Adapter.arch))


script_callbacks.on_app_started(on_app_started)
script_callbacks.on_ui_settings(register_settings)
script_callbacks.on_ui_tabs(lambda: ui_tab(ADAPTER.masks, ADAPTER.context))
script_callbacks.on_script_unloaded(ADAPTER.off)
