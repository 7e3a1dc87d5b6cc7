"""SD.Next host adapter (diffusers pipelines; docs/design.md §6). SD.Next has no per-step
script callback (`on_cfg_denoiser` is never fired), activates extra networks once per pass
right before it encodes the prompt, and merges `p.task_args` over the pipeline's arguments. So:

- `process`: take the `lora`, `lyco`, `loractl` and `model` names; the built-in Lora is first
  made to unload what it fused (`release_builtin`). Disabled: names back, weights restored.
- `before_process_batch` (the prompts still have their tags): the plan, for this `p` only.
- our handler's `activate` (SD.Next calls it in `process_base`, just before encoding): the
  engine activated and the text encoders left as step 0 has them, so SD.Next's own encoding
  is right; `p.task_args["callback_on_step_end"]` becomes a wrapper that first runs SD.Next's
  `diffusers_callback` (progress, interrupt, previews), then moves the engine and swaps the
  embeddings where a text-encoder segment ends (PipelineRun, as in the standalone host). A
  generation NetWeave's script did not see gets no network (nothing of an earlier plan).
- SD.Next caches prompt encodings under a key made of the stripped prompts, settings and the
  `.items` of `p.network_data`, which holds the same tags whoever applies them. So NetWeave
  adds to its names' entries one item that says what its text encoders hold (`te_mark`),
  renewed when the hires pass moves them; an encoding is reused only for the same weights.
- The hires pass (a second pipeline call with the same callback): the last base step moves the
  weights to hires step 0 and the `hr*` strengths follow.
- The Control tab runs only the extension scripts listed in `installer.control_extensions`
  when its runner starts (after every script module is imported): NetWeave's title is added
  at import. Its API drops `alwayson_scripts`, so Control API requests run NetWeave with the
  UI defaults (on; NetWeave's `enabled` setting switches it off).
- The infotext gets the session's report (problems, `Lora hashes: "name: hash"` as A1111
  writes it) beside SD.Next's own entries.

Unlike SD.Next's built-in Lora, which applies a network's text-encoder part only when
`lora_apply_te` is set (off by default), NetWeave applies every part the tag asks for (`te=0`
leaves the text encoders alone), so a network with text-encoder keys draws differently in the
two modes under SD.Next's defaults.
One prompt per batch: SD.Next keeps one network set per batch, so NetWeave uses the first
prompt's plan for every image.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import sys
from typing import Dict, List, Optional

from modules import extra_networks, processing_callbacks, script_callbacks, scripts, shared

from ...network.engine import Engine
from ...network.plan import CompileContext
from ..api import netweave_router
from ..masks import MaskError, MaskStore
from ..pipeline_run import PipelineRun
from ..session import Session, compile_context
from .common import (TITLE, ScriptParts, TagNames, inline_masks, library, mask_folder,
                     register_settings, settings, ui_tab, write_report)

MARK = "netweave:te="  # no item of a parsed tag holds ':' (SD.Next splits tags on it)
TEXT_ENCODERS = ["text_encoder", "text_encoder_2", "text_encoder_3"]


class NetWeaveNetworks(extra_networks.ExtraNetwork):
    """Holds our tag names. SD.Next calls every handler once per pass right before encoding;
    the first call of a pass starts NetWeave's run. A handler named in the prompt gets its
    entry of `p.network_data` and marks it with what the text encoders hold."""

    def activate(self, p, params_list, step=0, include=None, exclude=None):
        ADAPTER.start_pass(p)
        ADAPTER.mark(params_list)

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
        self.planned = None  # (p, its batch's prompt with tags), from before_process_batch
        self.session: Optional[Session] = None
        self.params: Dict = {}  # the generation's extra_generation_params
        self.inline: Dict = {}
        self.problems = []
        self.started = None  # the p whose pass has begun
        self.run: Optional[PipelineRun] = None
        self.marked: List[list] = []  # the p.network_data entries marked in this pass

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
        self.names.take(p, quiet=release_builtin)  # before NetWeave copies any weight

    def off(self) -> None:
        self.names.give_back()
        if self.engine is not None:
            self.engine.deactivate()
        self.planned = self.run = self.session = None

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
        self.planned = (p, prompts[0])
        self.started = None
        p.task_args["callback_on_step_end"] = self.step_end

    def start_pass(self, p) -> None:
        if self.started is p:
            return  # the other names of the same pass
        self.started, self.marked = p, []
        planned, self.planned = self.planned, None  # used: the next generation brings its own
        if planned is None or planned[0] is not p:  # NetWeave's script did not see this one
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
        plan, = session.prepare([planned[1]], steps=p.steps, hires_steps=hires,
                                latent=(p.height // vae_scale, p.width // vae_scale),
                                rows=(2 if cfg else 1) * p.batch_size, inline=self.inline,
                                problems=self.problems)
        self.run = PipelineRun(engine, pipeline(), engine.arch, pipeline().device,
                               plan.prompt, p.negative_prompts[0], p.batch_size, cfg,
                               p.steps, plan.hires_steps)
        self.session, self.params = session, p.extra_generation_params
        write_report(p.extra_generation_params, session.report)

    def te_mark(self) -> str:
        """What the text encoders hold of NetWeave's now, for SD.Next's prompt cache key: a
        digest of the pass (base or hires: SD.Next encodes again for hires) and of every
        network of the plan as compiled (tag, strengths, blocks, schedule) with its file's
        hash. Equal marks, equal text-encoder weights; 'none' when NetWeave applies nothing."""
        if self.run is None or self.session is None:
            return MARK + "none"
        report = self.session.report  # the applied files' hashes, read once per generation
        described = [self.run.phase] + [
            [n.to_dict(), (report.models if n.kind == "model" else report.networks).get(n.name)]
            for plan in self.session.plans for n in plan.networks]
        text = json.dumps(described, sort_keys=True,
                          default=lambda v: v.tolist() if hasattr(v, "tolist") else repr(v))
        return MARK + hashlib.sha1(text.encode()).hexdigest()[:16]

    def mark(self, params_list) -> None:
        """One item in a named handler's `p.network_data` entry (`params_list` is that list):
        SD.Next's prompt cache key holds every entry's items, so an encoding made with other
        text-encoder weights (the built-in's, another plan's, the other pass's) is not reused."""
        if not params_list:
            return  # not named in the prompt: NetWeave changes nothing here
        params_list[:] = [x for x in params_list if not _is_mark(x)]
        params_list.append(extra_networks.ExtraNetworkParams(items=[self.te_mark()]))
        if not any(x is params_list for x in self.marked):
            self.marked.append(params_list)

    def step_end(self, pipe, step, timestep, kwargs):
        kwargs = processing_callbacks.diffusers_callback(pipe, step, timestep, kwargs)
        if self.run is not None:
            phase = self.run.phase
            kwargs.update(self.run.step_end(step))
            if self.run.phase != phase:  # the text encoders are at hires step 0 now
                for params_list in self.marked:
                    self.mark(params_list)
            if self.session.collect():  # found while sampling: into the infotext too
                write_report(self.params, self.session.report)
        return kwargs


ADAPTER = Adapter()


def _is_mark(params) -> bool:
    items = getattr(params, "items", None)
    return isinstance(items, list) and len(items) == 1 and str(items[0]).startswith(MARK)


def release_builtin(handler, p) -> None:
    """Make SD.Next's built-in Lora unload what it fused, whatever its settings. Its fused
    weights stay between generations until an activation that it sees as a change, and it
    compares a request only with what was loaded under the same include/exclude: SD.Next's
    own call excludes the text encoders unless `lora_apply_te`, other callers pass nothing,
    and the loads are kept in `loaded_loras` on the pipeline, keyed
    `include=<csv or all>:exclude=<csv or none>`. So it is activated with no networks under
    the key it has recorded and under both of the keys SD.Next's callers use."""
    if not {"include", "exclude"} <= set(inspect.signature(handler.activate).parameters):
        handler.activate(p, [])
        return
    filters = [([], TEXT_ENCODERS), ([], [])]
    for key in list(getattr(pipeline(), "loaded_loras", None) or {}):
        try:
            inc, exc = (part.split("=", 1)[1] for part in str(key).split(":", 1))
        except (ValueError, IndexError):
            continue  # a key of another shape: the two above still run
        found = ([] if inc == "all" else inc.split(","), [] if exc == "none" else exc.split(","))
        if found not in filters:
            filters.insert(0, found)
    for include, exclude in filters:
        handler.activate(p, [], include=include, exclude=exclude)


def allow_in_control() -> None:
    """SD.Next's Control runner keeps an extension's script only if its title is in
    `installer.control_extensions` (scripts_manager imports that list object) when the runner
    initialises, which is after every script module was imported: add NetWeave's title now.
    A host without the list is left as it is."""
    holders = [sys.modules.get("modules.scripts_manager")]
    try:
        import installer
        holders.append(installer)
    except ImportError:
        pass
    for holder in holders:
        titles = getattr(holder, "control_extensions", None)
        if isinstance(titles, list) and TITLE not in titles:
            titles.append(TITLE)


class NetWeaveScript(ScriptParts, scripts.Script):
    adapter = ADAPTER

    def batch(self, p, prompts, options):
        ADAPTER.plan_batch(p, prompts, options)


def on_app_started(demo, app) -> None:
    app.include_router(netweave_router(ADAPTER.masks, library(), Adapter.arch))


allow_in_control()
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_ui_settings(register_settings)
script_callbacks.on_ui_tabs(lambda: ui_tab(ADAPTER.masks, ADAPTER.context))
script_callbacks.on_script_unloaded(ADAPTER.off)
