"""What the AUTOMATIC1111 and Forge adapters share (both run LDM module trees behind A1111's
script and extra-network API): the tag handler, one generation's plans, the step from
`on_cfg_denoiser`, the text-encoder swaps, the always-on script and the callbacks. A host's
adapter subclasses `Adapter` with its module trees, how its own LoRA lets go of the model
(`take_names`) and how the UNet batch rows are laid out (`describe_rows`).

Per generation (hooks in A1111's order):
- `process`: take the four names in the extra-network registry (the built-in Lora would parse
  our tags with float() and patch the same layers); the built-in loads nothing and puts back
  every layer it changed, so NetWeave's pristine copies are the model's. Disabled: give the
  names back and restore every weight.
- `before_process_batch` (the prompts still have their tags): a Session (session.py) compiles
  one plan per prompt of the batch (the hires prompts' folded in) and activates the engine; the
  text encoders are merged for step 0 — the host then encodes with them.
- `on_cfg_denoiser`, at every model evaluation: the step (A1111's `sampling_step` lags by one,
  so from the denoiser's own call counter), the pass (`p.is_hr_pass`); where text-encoder
  strengths change during the pass (or a prompt of the batch has other TE networks, or a
  regional TE network acts), the conditioning rows are swapped for an encoding made with the
  right text-encoder weights, cached per segment: made by the host's own prompt_parser as the
  host makes its conds (prompt editing, AND, the hires prompt and size, SDXL's dicts).
- Infotext: the tags stay in the prompt; the session's report (report.py: problems, masks,
  `Lora hashes`) goes into p.extra_generation_params, again whenever sampling adds to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from modules import extra_networks, shared  # the host's own

from ...network.engine import Engine
from ...network.files import FileHash
from ...network.plan import CompileContext, Plan
from ..masks import MaskError, MaskStore
from ..session import Session, compile_context
from .common import (ScriptParts, TagNames, inline_masks, library, mask_folder, settings,
                     write_report)

PLMS = "PLMS"


class NetWeaveNetworks(extra_networks.ExtraNetwork):
    """Holds our tag names in the registry. NetWeave reads the tags from the prompts itself
    (before A1111 strips them), so activation has nothing to do here."""

    def activate(self, p, params_list):
        pass

    def deactivate(self, p):
        pass


@dataclass
class Run:
    """What one generation needs at every denoiser call."""

    plans: List[Plan]
    te_swap: bool
    session: Session
    conds: Dict = field(default_factory=dict)  # (phase, segments) -> the host's cond schedules


class Adapter:
    file_hash = FileHash.TENSORS  # what the host's own Lora writes in `Lora hashes`

    def __init__(self):
        self.engine: Optional[Engine] = None
        self.model_id: Optional[int] = None
        self.names = TagNames(NetWeaveNetworks)
        self.run: Optional[Run] = None
        self.masks = MaskStore(mask_folder)

    # ---- the model -----------------------------------------------------------------------
    @staticmethod
    def arch(sd_model) -> str:
        if getattr(sd_model, "is_sdxl", False):
            return "sdxl"
        return "sd2" if getattr(sd_model, "is_sd2", False) else "sd1"

    @staticmethod
    def trees(sd_model) -> dict:
        """{"unet", "te1"[, "te2"]}: the host model's module roots."""
        raise NotImplementedError

    def engine_options(self) -> dict:
        """Extra Engine arguments the host needs (Forge: its scaled weights)."""
        return {}

    def host_context(self, p) -> dict:
        """What only the host knows of this generation for the plans (Session.prepare's
        `negative_rows`, `sigmas`): none here."""
        return {}

    def engine_for(self, sd_model) -> Engine:
        if self.engine is None or self.model_id != id(sd_model):
            if self.engine is not None:
                self.engine.deactivate()
            self.engine = Engine(self.trees(sd_model), self.arch(sd_model), library().find,
                                 **self.engine_options())
            self.model_id = id(sd_model)
        return self.engine

    # ---- the registry --------------------------------------------------------------------
    def take_names(self, p) -> None:
        """The registry entries become NetWeave's; the host's own LoRA lets go of the model."""
        raise NotImplementedError

    def off(self) -> None:
        self.names.give_back()
        if self.engine is not None:
            self.engine.deactivate()
        self.run = None

    # ---- one batch -----------------------------------------------------------------------
    def context(self, steps: int) -> CompileContext:
        """What the tab's explain compiles against."""
        return compile_context(self.arch(shared.sd_model), settings(), steps, masks=self.masks)

    def start_batch(self, p, prompts: List[str], inline: Dict, problems: List[str]) -> None:
        engine = self.engine_for(p.sd_model)
        session = Session(engine, library(), self.masks, settings(), self.file_hash)
        hires = (p.hr_second_pass_steps or p.steps) if getattr(p, "enable_hr", False) else None
        plans = session.prepare(prompts, steps=p.steps, hires_steps=hires,
                                hires_prompts=hires_prompts(p) if hires else None,
                                latent=(p.height // 8, p.width // 8), rows=2 * len(prompts),
                                inline=inline, problems=problems, **self.host_context(p))
        segments = [engine.te_segments(phase, i) for i in range(len(plans))
                    for phase in (("base", "hires") if hires else ("base",))]
        # A1111 encodes every cond (the hires pass's too) once, with step 0's weights: NetWeave
        # encodes them itself wherever text-encoder strengths differ from that
        te_swap = any(len(s) > 1 or s[0].variants or s[0].strengths != segments[0][0].strengths
                      for s in segments if s) or _te_neg(plans)
        if segments[0]:
            engine.apply_te(segments[0][0])  # A1111 encodes next, with these weights
        self.run = Run(plans, te_swap, session)
        write_report(p.extra_generation_params, session.report)

    def on_denoiser(self, params) -> None:
        if self.run is None or self.engine is None or self.engine.plan is None:
            return
        d = params.denoiser
        p = d.p
        phase = "hires" if getattr(p, "is_hr_pass", False) else "base"
        engine = self.engine
        engine.set_latent(params.x.shape[-2:])  # the hires pass samples an upscaled latent
        engine.set_step(current_step(d, engine.plan.hires_steps if phase == "hires"
                                     else engine.plan.steps), phase)
        if self.run.session.collect():  # found while sampling: into this image's infotext
            write_report(p.extra_generation_params, self.run.session.report)
        n = len(self.run.plans)
        # SDXL's conds are dicts with a shape (prompt_parser.DictWithShape): crossattn's
        per = max(1, params.text_cond.shape[0] // n)  # AND sub-prompts repeat a cond row
        self.describe_rows(n, per)
        if self.run.te_swap:
            params.text_cond, params.text_uncond = self.conditioning(p, phase, d)

    def describe_rows(self, n: int, per: int) -> None:
        """Which prompt each UNet batch row is, for n prompts with `per` cond rows each."""
        raise NotImplementedError

    def conditioning(self, p, phase: str, denoiser):
        """Cond and uncond rows for this model evaluation, each prompt encoded with its own
        text-encoder segment (and negative strengths), the way the host encodes them (prompt
        editing, the hires prompts and size, SDXL's dicts); regional TE networks get rows of
        their own. Encodings are cached per segment and rebuilt at the denoiser's step."""
        from modules import prompt_parser  # the host's own

        engine = self.engine
        k = engine.position[1]
        segs = tuple(engine.segment_at(k, phase, i) for i in range(len(self.run.plans)))
        if (phase, segs) not in self.run.conds:
            self.run.conds[phase, segs] = self._encode(p, phase, segs, denoiser)
        cond, uncond, variants = self.run.conds[phase, segs]
        step = denoiser.step
        rows = prompt_parser.reconstruct_multicond_batch(cond, step)[1]
        neg = prompt_parser.reconstruct_cond_batch(uncond, step)
        engine.set_text_variants(_crossattn(rows, neg), {
            j: _crossattn(prompt_parser.reconstruct_multicond_batch(v, step)[1], neg)
            for j, v in variants.items()})
        return rows, neg

    def _encode(self, p, phase, segs, denoiser):
        """(cond, uncond, {regional network: cond}) schedules of the batch, as A1111's
        setup_conds / calculate_hr_conds make them, one prompt at a time with its segment."""
        from modules import prompt_parser

        engine = self.engine
        if phase == "hires":
            prompts, negatives = p.hr_prompts, p.hr_negative_prompts
            size = dict(width=p.hr_upscale_to_x, height=p.hr_upscale_to_y)
            steps = (getattr(p, "firstpass_steps", p.steps),
                     denoiser.sampler.config.total_steps(p.hr_second_pass_steps or p.steps))
        else:
            prompts, negatives = p.prompts, p.negative_prompts
            size = dict(width=p.width, height=p.height)
            steps = (getattr(p, "firstpass_steps", p.steps), None)

        def learned(text, negative=False):
            texts = prompt_parser.SdConditioning([text], is_negative_prompt=negative, **size)
            if negative:
                return prompt_parser.get_learned_conditioning(p.sd_model, texts, *steps)[0]
            return prompt_parser.get_multicond_learned_conditioning(p.sd_model, texts,
                                                                    *steps).batch[0]
        cond, uncond, variant_rows = [], [], {}
        for i, seg in enumerate(segs):
            engine.apply_te(seg)
            cond.append(learned(prompts[i]))
            engine.apply_te(seg, uncond=True)
            uncond.append(learned(negatives[i], negative=True))
            for j in seg.variants:
                engine.apply_te(seg, variant=j)
                variant_rows.setdefault(j, {})[i] = learned(prompts[i])

        def multicond(batch):
            return prompt_parser.MulticondLearnedConditioning((len(batch),), batch)
        return multicond(cond), uncond, {
            j: multicond([rows.get(i, c) for i, c in enumerate(cond)])
            for j, rows in variant_rows.items()}


def hires_prompts(p) -> List[str]:
    """The batch's hires prompts with their tags: A1111 slices them from all_hr_prompts only
    after before_process_batch (an empty hires prompt field is the prompt itself)."""
    every = getattr(p, "all_hr_prompts", None)
    if every:
        bs = p.batch_size
        return list(every[p.iteration * bs:(p.iteration + 1) * bs])
    return list(getattr(p, "hr_prompts", None) or p.prompts)


def current_step(denoiser, steps: Optional[int]) -> int:
    """The 0-based step of this model evaluation. A1111's `sampling_step` is set after a
    step's first evaluation, so it lags; the denoiser counts its calls per pass instead: one
    per step, two for second-order samplers (the last step one), PLMS one extra at the start."""
    k = denoiser.step
    config = getattr(denoiser.sampler, "config", None)
    options = getattr(config, "options", {}) or {}
    name = getattr(config, "name", "")
    if options.get("second_order") and name != "Restart":
        k //= 2
    elif name == PLMS:
        k = max(k - 1, 0)
    n = steps or getattr(denoiser, "steps", k + 1)
    return min(k, n - 1)


def _crossattn(cond, uncond) -> torch.Tensor:
    """The UNet's cross-attention context rows (conds, then unconds): SDXL's are the dicts'
    "crossattn" (its "vector" is global to a row, so regions cannot tell it apart); a list of
    rows where the conds and unconds have other lengths."""
    if isinstance(cond, dict):
        cond, uncond = cond["crossattn"], uncond["crossattn"]
    if cond.shape[1:] != uncond.shape[1:]:  # a language model's captions keep their lengths
        return [*cond, *uncond]  # (Neo's Z-Image): one (tokens, width) per row
    return torch.cat([cond, uncond])


def _te_neg(plans: List[Plan]) -> bool:
    return any(n.neg != 1.0 for plan in plans for n in plan.networks)



class LdmScript(ScriptParts):
    """The always-on script of both hosts: one plan per prompt of each batch."""

    def batch(self, p, prompts, options):
        inline, problems = {}, []
        try:
            inline = inline_masks(options)
        except (MaskError, ValueError) as exc:
            problems.append(f"masks: {exc}")
        self.adapter.start_batch(p, prompts, inline, problems)


def register(adapter: Adapter) -> None:
    """The host callbacks of an adapter: the step, settings, the tab, the routes, unloading."""
    from modules import script_callbacks

    from ..api import netweave_router
    from .common import register_settings, ui_tab

    def on_app_started(demo, app) -> None:
        app.include_router(netweave_router(adapter.masks, library(),
                                           lambda: adapter.arch(shared.sd_model)))
    script_callbacks.on_cfg_denoiser(adapter.on_denoiser)
    script_callbacks.on_ui_settings(register_settings)
    script_callbacks.on_ui_tabs(lambda: ui_tab(adapter.masks, adapter.context))
    script_callbacks.on_app_started(on_app_started)
    script_callbacks.on_script_unloaded(adapter.off)
