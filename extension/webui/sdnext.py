"""SD.Next host adapter (diffusers pipelines; docs/design.md §6). SD.Next has no per-step
script callback (`on_cfg_denoiser` is never fired), activates extra networks once per pass
right before it encodes the prompt, and merges `p.task_args` over the pipeline's arguments. So:

- `process`: take the `lora`, `lyco`, `loractl` and `model` names; the built-in Lora is first
  made to unload what it fused (`release_builtin`) and the PEFT adapters it loaded through
  diffusers and left disabled are unloaded. Disabled: names back, weights restored.
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
- Flow-matching transformers (`shared.sd_model_type` 'f1', 'chroma', 'zimage', 'qwen', 'sd3',
  'wanai'; `start_flow`, the family table in extension/flow_families.py): the transformer and
  the text encoders are the trees; with networks in the plan NetWeave encodes the text itself
  through the pipeline's own encode_prompt and puts it in `p.task_args` (FlowRun, as in the
  standalone host), since SD.Next's loaders wrap `encode_prompt` in a cache keyed by the
  prompt text alone (and encode SD3 and Flux with their own parser); the plan gets the
  pipeline's sigmas. Wan 2.2 with both experts resident (`transformer_2`, a boundary): one
  engine per expert (extension/experts.py), `<lora:x:1:high>` and high=/low= per expert, steps
  counted across the run. SD.Next's facts: docs/design.md §6.

Unlike SD.Next's built-in Lora, which applies a network's text-encoder part only when
`lora_apply_te` is set (off by default), NetWeave applies every part the tag asks for (`te=0`
leaves the text encoders alone), so a network with text-encoder keys draws differently in the
two modes under SD.Next's defaults.
One prompt per batch: SD.Next keeps one network set per batch, so NetWeave uses the first
prompt's plan for every image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
from typing import Dict, List, Optional

from modules import extra_networks, processing_callbacks, script_callbacks, scripts, shared

from ...network.engine import Engine
from ...network.plan import EXPERTS, CompileContext
from ...parser import Severity
from ..api import netweave_router
from ..masks import MaskError, MaskStore
from ..pipeline_run import PipelineRun
from ..session import Session, compile_context
from ..experts import flow_engine
from ..flow_families import FAMILIES, Guidance, family_of, has_experts
from ..flow_run import FlowRun, flow_schedule, high_noise_steps
from .common import (TITLE, ScriptParts, TagNames, inline_masks, library, mask_folder,
                     register_settings, settings, ui_tab, write_report)

MARK = "netweave:te="  # no item of a parsed tag holds ':' (SD.Next splits tags on it)
TEXT_ENCODERS = ["text_encoder", "text_encoder_2", "text_encoder_3"]
# shared.sd_model_type (modules/modeldata.get_model_type) → NetWeave's architecture
FLOW = {"f1": "flux", "chroma": "chroma", "zimage": "zimage", "qwen": "qwenimage", "sd3": "sd3",
        "wanai": "wan22"}


class NetWeaveNetworks(extra_networks.ExtraNetwork):
    """Holds our tag names. SD.Next calls every handler once per pass right before encoding;
    the first call of a pass starts NetWeave's run. A handler named in the prompt gets its
    entry of `p.network_data` and marks it with what the text encoders hold."""

    def activate(self, p, params_list, step=0, include=None, exclude=None):
        ADAPTER.start_pass(p)
        ADAPTER.mark(params_list)

    def deactivate(self, p, force=False):
        ADAPTER.end_generation()  # weights stay merged; the Flux family's text hook goes


def pipeline():
    return getattr(shared.sd_model, "pipe", shared.sd_model)  # some wrappers nest it


def denoiser(pipe):
    return pipe.transformer if Adapter.arch() in FLOW.values() else pipe.unet


def model_trees(pipe, arch: str) -> dict:
    """The engine's components as SD.Next's pipelines hold them: a flow family's transformer
    is "unet" (Wan 2.2: the high-noise expert's; extension/experts.py adds the other), its text
    encoders by the family table (Flux.1's CLIP-L te1 and T5 te2, Chroma's T5 te2, SD3's
    CLIP-L and CLIP-G)."""
    if arch in FAMILIES:
        return FAMILIES[arch].trees(pipe)
    trees = {"unet": pipe.unet, "te1": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        trees["te2"] = pipe.text_encoder_2
    return trees


class Unhijacked:
    """The pipeline with its own encode_prompt: SD.Next's loaders (Flux, Chroma, Z-Image, SD3,
    Qwen-Image, Wan) replace it by
    a wrapper (modules/sd_hijack_te.py) that caches encodings by the prompt text alone, which
    would hand NetWeave one text-encoder state's encoding for another's."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    @property
    def encode_prompt(self):
        return getattr(self._pipe, "orig_encode_prompt", self._pipe.encode_prompt)


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
        self.flow_steps = 0  # step callbacks of a Flux-family run so far

    @staticmethod
    def arch() -> str:
        if shared.sd_model_type in FLOW:
            return FLOW[shared.sd_model_type]
        if shared.sd_model_type == "sdxl":
            return "sdxl"
        unet = pipeline().unet
        return "sd2" if getattr(unet.config, "cross_attention_dim", 768) == 1024 else "sd1"

    def engine_for(self) -> Engine:
        pipe = pipeline()
        model = denoiser(pipe)  # the hires pass's pipeline shares it with the base pass's
        if self.engine is None or self.model_id != id(model):
            if self.engine is not None:
                self.engine.deactivate()
            arch = self.arch()
            trees = model_trees(pipe, arch)
            self.engine = flow_engine(pipe, arch, trees, library().find) if arch in FLOW.values() \
                else Engine(trees, arch, library().find)
            self.model_id = id(model)
        return self.engine

    def take_names(self, p) -> None:
        self.names.take(p, quiet=release_builtin)  # before NetWeave copies any weight

    def off(self) -> None:
        self.names.give_back()
        self.end_generation()
        if self.engine is not None:
            self.engine.deactivate()
        self.planned = self.run = self.session = None

    def end_generation(self) -> None:
        """A Flux-family run's transformer hook goes with its generation: a later one (NetWeave
        off, or a pass NetWeave's script did not see) must get the pipeline's own text."""
        if isinstance(self.run, FlowRun):
            self.run.close()

    def context(self, steps: int) -> CompileContext:
        """What the tab's explain compiles against (Wan 2.2 with both experts: the first
        expert's plan)."""
        ctx = compile_context(self.arch(), settings(), steps, masks=self.masks)
        two = ctx.arch in FLOW.values() and has_experts(pipeline())
        return dataclasses.replace(ctx, expert=EXPERTS[0]) if two else ctx

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
        self.started, self.marked, self.flow_steps = p, [], 0
        self.end_generation()
        planned, self.planned = self.planned, None  # used: the next generation brings its own
        if planned is None or planned[0] is not p:  # NetWeave's script did not see this one
            if self.engine is not None:
                self.engine.deactivate()
            self.run = self.session = None
            return
        engine = self.engine_for()
        session = Session(engine, library(), self.masks, settings())
        if engine.arch in FLOW.values():
            self.run = self.start_flow(p, planned[1], engine, session)
        else:
            self.run = self.start_sd(p, planned[1], engine, session)
        self.session, self.params = session, p.extra_generation_params
        write_report(p.extra_generation_params, session.report)

    def start_sd(self, p, prompt: str, engine: Engine, session: Session) -> PipelineRun:
        """SD.Next encodes the text itself, with the text encoders as step 0 has them; the
        UNet gets the negative rows first, then the prompt's, in one call."""
        vae_scale = getattr(pipeline(), "vae_scale_factor", 8)
        cfg = p.cfg_scale > 1
        hires = (getattr(p, "hr_second_pass_steps", 0) or p.steps) \
            if getattr(p, "enable_hr", False) else None
        plan, = session.prepare([prompt], steps=p.steps, hires_steps=hires,
                                latent=(p.height // vae_scale, p.width // vae_scale),
                                rows=(2 if cfg else 1) * p.batch_size, inline=self.inline,
                                problems=self.problems)
        return PipelineRun(engine, pipeline(), engine.arch, pipeline().device,
                           plan.prompt, p.negative_prompts[0], p.batch_size, cfg,
                           p.steps, plan.hires_steps)

    def start_flow(self, p, prompt: str, engine, session: Session) -> Optional[FlowRun]:
        """The flow families' pipelines. They call the transformer once per kind of row (Flux,
        Chroma, Qwen-Image, Wan: the prompt's, then with CFG the negative prompt's) or once
        with both (SD3: negative first; Z-Image: a list, the prompt's first). SD.Next's
        guidance_scale is the CFG scale (Flux.1: its distilled guidance); Flux.1 and Qwen-Image
        run their negative prompt when `cfg_true` (true_cfg_scale) is above 1, Z-Image when
        the CFG scale is above 0, the others above 1. With networks in the plan NetWeave
        encodes the text itself and hands it to the pipeline in p.task_args (merged over
        SD.Next's arguments; with 'prompt' there SD.Next does not encode), so SD.Next's prompt
        caches never hold an encoding made with NetWeave's text-encoder weights; FlowRun's
        transformer hook then tells the engine each call's rows and swaps the text where a
        text-encoder segment ends. The hires pass keeps the base pass's last step."""
        pipe = pipeline()
        try:
            family = family_of(pipe)
        except ValueError as exc:  # an edit or video pipeline of the same model type
            session.report.add(f"{exc}; networks are not applied", Severity.ERROR)
            engine.deactivate()
            return None
        vae = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)
        latent = (2 * (p.height // (2 * vae)), 2 * (p.width // (2 * vae)))  # as prepare_latents
        true_cfg = family.guidance in (Guidance.FLUX, Guidance.TRUE_CFG)
        cfg = family.cfg((getattr(p, "cfg_true", 0) or 0) if true_cfg else p.cfg_scale)
        plan, = session.prepare([prompt], steps=p.steps, latent=latent, rows=p.batch_size,
                                inline=self.inline, problems=self.problems,
                                sigmas=flow_sigmas(pipe, p.steps, latent), negative_rows=cfg,
                                switch_step=high_noise_steps(pipe, p.steps, latent))
        if not plan.networks:
            return None  # nothing to apply: SD.Next's own text and calls, untouched
        if getattr(p, "enable_hr", False):
            session.report.add("the hires pass of a transformer model keeps the base pass's "
                               "last step (hr=, hrte= and hrunet= are not applied there)",
                               Severity.WARNING)
        run = FlowRun(engine, Unhijacked(pipe), engine.arch, pipe.device, plan.prompt,
                      p.negative_prompts[0], p.batch_size, cfg, p.steps)
        p.task_args.update(prompt=None, prompt_2=None, prompt_3=None, negative_prompt=None,
                           negative_prompt_2=None, negative_prompt_3=None, **run.first_args())
        return run

    def te_mark(self) -> str:
        """What the text encoders hold of NetWeave's now, for SD.Next's prompt cache key: a
        digest of the pass (base or hires: SD.Next encodes again for hires) and of every
        network of the plan as compiled (tag, strengths, blocks, schedule) with its file's
        hash. Equal marks, equal text-encoder weights; 'none' when NetWeave applies nothing."""
        if self.run is None or self.session is None:
            return MARK + "none"
        report = self.session.report  # the applied files' hashes, read once per generation
        described = [getattr(self.run, "phase", "base")] + [
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
        if isinstance(self.run, FlowRun):
            self.flow_steps += 1  # past the base pass (hires): its last step stays
            if self.flow_steps <= self.run.steps:
                kwargs.update(self.run.step_end(step))
        elif self.run is not None:
            phase = self.run.phase
            kwargs.update(self.run.step_end(step))
            if self.run.phase != phase:  # the text encoders are at hires step 0 now
                for params_list in self.marked:
                    self.mark(params_list)
        if self.session is not None and self.session.collect():  # found while sampling
            write_report(self.params, self.session.report)
        return kwargs


ADAPTER = Adapter()


def flow_sigmas(pipe, steps: int, latent):
    """The sigmas a flow family's pipeline will call its transformer with (a twin of its
    scheduler set up as the pipeline sets it up), or None where the scheduler SD.Next put in
    does not take the pipeline's sigmas (then `s…` positions warn and are left out)."""
    try:
        return flow_schedule(pipe, steps, latent)[0]
    except (TypeError, ValueError, AttributeError, KeyError):
        return None


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
    else:
        filters = [([], TEXT_ENCODERS), ([], [])]
        for key in list(getattr(pipeline(), "loaded_loras", None) or {}):
            try:
                inc, exc = (part.split("=", 1)[1] for part in str(key).split(":", 1))
            except (ValueError, IndexError):
                continue  # a key of another shape: the two above still run
            found = ([] if inc == "all" else inc.split(","),
                     [] if exc == "none" else exc.split(","))
            if found not in filters:
                filters.insert(0, found)
        for include, exclude in filters:
            handler.activate(p, [], include=include, exclude=exclude)
    unload_adapters(pipeline())


def unload_adapters(pipe) -> None:
    """Where SD.Next has no native loader for the model (Wan, Qwen-Image; any model with
    `lora_force_diffusers`) the built-in loads a network through diffusers (PEFT), and a
    request without it only disables the adapters (lora/extra_networks_lora.py): the layers
    stay PEFT wrappers around the model's own, in which NetWeave's key map finds no layer it
    knows (a tag then does nothing: "N of its layers name no layer of this model"). Once the
    built-in holds nothing, the pipeline's own unload_lora_weights puts every layer back (the
    built-in loads its file again when next asked; SD.Next re-applies its offload before each
    pipeline call)."""
    try:
        held = pipe.get_list_adapters()
    except (AttributeError, ValueError, TypeError):  # no LoRA loader, or no peft: none held
        return
    if any(held.values()):
        pipe.unload_lora_weights()


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
