"""Forge Neo (Haoming02/sd-webui-forge-classic, branch `neo`) host adapter: Forge 2's script
and extra-network API (forge.py, ldm.py) on Neo's model objects, patchers and families
(docs/design.md §6, "Forge Neo").

What differs from Forge 2:
- Families: Neo's diffusion engine is named after its family (`type(sd_model).__name__`:
  StableDiffusion, StableDiffusionXL, Flux, Chroma, ZImage, QwenImage, Wan; `FAMILIES`). Its
  diffusion model (`forge_objects.unet.model.diffusion_model`, under Neo's KModel) is held in
  the original layouts NetWeave maps (LDM UNet; BFL Flux; NextDiT for Z-Image; Qwen-Image and
  Wan in their own names). Text encoders are `forge_objects.clip.cond_stage_model.<name>`
  (`TEXT`): clip_l, clip_g, t5xxl, and Neo's own classes for the others (backend/nn): Z-Image's
  `qwen3` and Qwen-Image's `qwen25_7b` hold the language model as `model` (`model.layers.N.
  self_attn.q_proj`, …; Qwen2.5-VL's vision tower beside it as `visual`, not mapped), Wan's
  `umt5xxl` the T5 as `transformer`; each is its model's te1 (`te=`, its lbw block, regional
  text-encoder networks). A file may name their layers as Neo's LoRA does
  (`text_encoders.qwen3.model.layers.…`), as ComfyUI, kohya, diffusers or DiffSynth do. A family
  NetWeave does not know (Flux.2, Lumina 2, Anima, …) keeps every tag for Neo's own LoRA: the
  names are not taken and the console says so once. So does a generation with Neo's refiner
  on any other family than Wan (an SDXL refiner: another architecture; `NeoAdapter.aside`).
- Wan 2.2 A14B runs on Neo as a checkpoint (the high-noise expert) and its refiner (the
  low-noise one), which Neo's `apply_refiner` switches to inside the denoiser, before any
  callback: NetWeave compiles each expert's plans (`high`/`low`, `high=`/`low=`) and follows
  the switch (`follow_refiner`, by what Neo changed: its ORIGINAL_CHECKPOINT set, or a new
  model object). "Reload state_dict only" loads the refiner into the same modules: the
  engine takes that as the pristine weights (`Engine.rewritten`) and merges the low-noise
  plans from that step on; at the end it restores them, before Neo's refiner script loads the
  original back, so that ends bit-exact. Otherwise Neo loads the refiner as a model of its
  own: a new engine takes it over (text encoders merged before Neo encodes the conds again)
  and the old one puts the first model back and lets go of it. Neo's "Lora Replacements"
  (`high_noise=low_noise`) rename the `<lora:>` files of the low-noise plans, as Neo renames
  its own; a renamed file that is missing is reported and left out after the switch.
- Neo's LoRA (`sd_forge_lora`) adds patches to clones of the patchers: merged (`patches`,
  merged at the model's load for sampling, the replaced Parameters kept in the patchers'
  shared `backup`) or online (`weight_wrapper_patches`, run on the weight at each forward;
  for quantized storage). In `process` its registry entry is taken, it loads nothing
  (`networks.load_networks([], [], [])`), and what it merged is put back now
  (`unpatch_model`), before NetWeave copies the weights: Neo would do so at the next load,
  after NetWeave's merges, and write its old Parameters over them.
- Neo's built-in `<lora:NAME:[w@t,…]>` schedule ("LoRA Control Integrated") reads the prompt
  in `before_process` and, in online mode, sets the strength of Neo's own online patches at
  every step, asserting they exist. With NetWeave applying the tags (the schedule is NetWeave
  syntax too) its mapping is emptied in `process`, so it does nothing and asserts nothing.
- Neo throws away what is put on the patchers before the extra networks are activated and
  re-copies `forge_objects` before each sampling; NetWeave changes module instances, not
  patchers, so nothing of it is lost. `process_before_every_sampling` checks that the
  diffusion model about to sample is the one NetWeave prepared and hooks its rows there.
- The CFG scale 1 runs no negative rows (Neo's cfg1 optimisation): `neg=` then warns.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from modules import scripts, shared  # the host's own

from ...network.plan import EXPERTS
from .common import TagNames, write_report
from .forge import ForgeAdapter
from .ldm import LdmScript, NetWeaveNetworks, current_step, register

# Neo's diffusion-engine class → NetWeave's architecture (backend/diffusion_engine/*.py)
# (Neo has no SD2 engine; its SDXL refiner, Flux.2, Lumina 2, Anima, … are not mapped)
FAMILIES = {"StableDiffusion": "sd1", "StableDiffusionXL": "sdxl", "Flux": "flux",
            "Chroma": "chroma", "ZImage": "zimage", "QwenImage": "qwenimage", "Wan": "wan22"}
# NetWeave's text-encoder component → Neo's JointTextEncoder entry, per architecture
TEXT = {"sd1": {"te1": "clip_l"}, "sdxl": {"te1": "clip_l", "te2": "clip_g"},
        "flux": {"te1": "clip_l", "te2": "t5xxl"}, "chroma": {"te2": "t5xxl"},
        "zimage": {"te1": "qwen3"}, "qwenimage": {"te1": "qwen25_7b"}, "wan22": {"te1": "umt5xxl"}}
SCHEDULE_TITLE = "LoRA Control Integrated"  # Neo's sd_forge_lora_schedule script
# the architectures whose refiner is the model's next expert, which NetWeave follows
EXPERT_REFINERS = ("wan22",)
REPLACEMENTS = "high_noise=low_noise"  # the default of Neo's refiner_lora_replacement


class NeoNetworks(NetWeaveNetworks):
    """NetWeave's registry entries on Neo. Neo activates the extra networks again at its
    refiner switch, and deactivates them after the last batch, before the scripts'
    postprocess (where its refiner script loads the original checkpoint back): both
    reach the adapter."""

    def __init__(self, name, adapter):
        super().__init__(name)
        self.adapter = adapter

    def activate(self, p, params_list):
        self.adapter.follow_refiner(p)

    def deactivate(self, p):
        self.adapter.end_refiner()


@dataclass
class Turns:
    """A batch whose refiner is its model's next expert (Wan 2.2: high noise, then low)."""

    loaded: bool  # Neo's refiner state dict was in the modules already at the batch's start
    in_place: Optional[bool] = None  # how Neo switched: its state dict, or a model of its own


class NeoAdapter(ForgeAdapter):
    def __init__(self):
        super().__init__()
        self.names = TagNames(lambda name: NeoNetworks(name, self))
        self._said = set()
        self._turns: Optional[Turns] = None

    @staticmethod
    def arch(sd_model) -> Optional[str]:
        return FAMILIES.get(type(sd_model).__name__)

    @staticmethod
    def trees(sd_model) -> dict:
        objects = sd_model.forge_objects
        text = objects.clip.cond_stage_model
        trees = {"unet": objects.unet.model.diffusion_model}
        for component, name in TEXT.get(NeoAdapter.arch(sd_model), {}).items():
            module = getattr(text, name, None)  # Neo's ModuleDict: children by attribute only
            if module is not None:
                trees[component] = module
        return trees

    def host_context(self, p) -> dict:
        context = {"negative_rows": not math.isclose(float(p.cfg_scale), 1.0)}
        if self._turns is not None:  # the first expert's plans now, the next one's kept
            context["experts"] = EXPERTS[1:] if self._turns.loaded else EXPERTS
            context["switch_step"] = switch_step(p)
            if self._turns.loaded:  # the low-noise expert from the start, with its files
                context["rename"] = self._renames()  # (Neo's LoRA renames only at a switch)
        return context

    def take_names(self, p) -> None:
        model = shared.sd_model
        aside = self.aside(p, model)
        if aside is not None:
            self.off()
            self._say(f"{aside}; its <lora:> tags are left to Neo's own LoRA")
            return
        self.names.take(p, quiet=lambda handler, p: None)
        release_neo_lora(model)
        silence_schedule(p)
        self.hook_rows(self.trees(model)["unet"])

    def aside(self, p, model) -> Optional[str]:
        """Why NetWeave leaves this generation to Neo, or None. Neo's refiner swaps the
        diffusion model's weights inside the denoiser, before any callback
        (sd_samplers_common.apply_refiner: loaded into the same modules, or a whole other
        model) and re-applies its LoRA for it. On Wan that is the model's low-noise expert,
        which NetWeave follows (`follow_refiner`); any other refiner (SDXL's: another
        architecture) is left to Neo."""
        if self.arch(model) is None:
            return f"Neo's {type(model).__name__} model is not one NetWeave maps"
        if refiner_of(p) is not None and self.arch(model) not in EXPERT_REFINERS:
            return ("this generation switches to a refiner model while sampling (NetWeave "
                    "follows that switch only from Wan 2.2's high-noise expert to its "
                    "low-noise one)")
        return None

    def start_batch(self, p, prompts, inline, problems) -> None:
        if self.aside(p, p.sd_model) is not None:
            return
        self._turns = None
        info = refiner_of(p)
        # Neo switches only once per generation (ORIGINAL_CHECKPOINT stays set until its
        # refiner script's postprocess): a later batch samples the refiner from its start
        if info is not None and not getattr(p, "enable_hr", False) and \
                getattr(p.sd_model, "sd_checkpoint_info", None) != info:
            self._turns = Turns(loaded=original_checkpoint() is not None)
        super().start_batch(p, prompts, inline, problems)

    # ---- Neo's refiner: Wan 2.2's second expert ------------------------------------------
    def on_denoiser(self, params) -> None:
        if self._turns is not None:
            self.follow_refiner(params.denoiser.p, params.denoiser)
        super().on_denoiser(params)

    def follow_refiner(self, p, denoiser=None) -> None:
        """Whether Neo has switched to the refiner, and if so the low-noise expert's plans
        from this step on. Neo gives no event: its apply_refiner runs first in the denoiser
        and then activates the extra networks again (unless they are disabled) and calls the
        cfg_denoiser callbacks, and both come here (`denoiser`: from the latter). What it
        changed says it switched, not the call: ORIGINAL_CHECKPOINT is set while the
        refiner's state dict is in the model's modules, and the other path makes a new model
        object (Neo sets no flag there). The state-dict path is followed at the denoiser
        callback, once Neo has loaded the model for sampling again (at the activation its
        weights are on the offload device); a new model at the activation, so its text
        encoders are merged before Neo encodes the conds with them."""
        turns = self._turns
        if turns is None or turns.in_place is not None or self.run is None or \
                self.engine is None or self.engine.plan is None:
            return
        model = shared.sd_model
        at = None if denoiser is None else ("base", current_step(denoiser, self.engine.plan.steps))
        if self.trees(model)["unet"] is not self.engine.trees["unet"]:
            self._to_model(p, model, at)
        elif original_checkpoint() is not None and not turns.loaded and at is not None:
            self.run.session.next_expert(rewritten=("unet",), at=at, rename=self._renames())
            turns.in_place = True
            self._switched(p)

    def _to_model(self, p, model, at: Optional[Tuple[str, int]]) -> None:
        """Neo loaded the refiner as a model of its own: a new engine on it takes over."""
        session = self.run.session
        at = at or self.engine.position
        if self.arch(model) != self.engine.arch:
            self._turns = None
            self._release()
            session.report.add(f"Neo's refiner is a {type(model).__name__} model, not the "
                               "next expert of this one; NetWeave's networks end at the switch")
            write_report(p.extra_generation_params, session.report)
            self.run = None
            return
        engine = self.engine_for(model)  # the first model's weights put back, let go of
        session.next_expert(engine, at=at, rename=self._renames())
        self._turns.in_place = False
        self.hook_rows(self.trees(model)["unet"])
        if engine.te_segments():  # Neo encodes the conds again next, with these weights
            engine.apply_te(engine.segment_at(at[1]))
        self._switched(p)

    def _switched(self, p) -> None:
        self.run.conds.clear()  # encodings made on the first expert's text-encoder weights
        write_report(p.extra_generation_params, self.run.session.report)

    def _renames(self) -> Callable[[str, str], str]:
        pairs = lora_replacements(getattr(shared.opts, "refiner_lora_replacement", REPLACEMENTS))
        return lambda kind, name: renamed(kind, name, pairs)

    def end_refiner(self) -> None:
        """The end of a generation that followed Neo's refiner (the networks' deactivation,
        or else the script's postprocess). Where the refiner's state dict is in the modules,
        every weight goes back to it now, before Neo's refiner script loads the original
        checkpoint over it; where Neo did that already, that is the pristine weight. A
        refiner loaded as a model of its own is put back and let go of, so Neo can free it
        when it loads the first model again."""
        turns, self._turns = self._turns, None
        if turns is None or self.engine is None:
            return
        if turns.in_place or turns.loaded:
            if original_checkpoint() is None:
                self.engine.rewritten(("unet",))
            self.engine.deactivate()
        elif turns.in_place is False:
            self._release()

    def _release(self) -> None:
        self.engine.deactivate()
        self.engine, self.model_id = None, None
        self.unhook_rows()

    def off(self) -> None:
        self._turns = None
        super().off()

    def before_sampling(self, p) -> None:
        """process_before_every_sampling: the UNet patcher Neo samples with now."""
        if self.run is None or self.engine is None or self.engine.plan is None:
            return
        unet = p.sd_model.forge_objects.unet.model.diffusion_model
        if unet is not self.engine.trees["unet"]:
            self.engine.deactivate()
            self.run.session.report.add("the model changed before sampling; NetWeave's "
                                        "networks are not applied to it")
            write_report(p.extra_generation_params, self.run.session.report)
            self.run = None
            return
        self.hook_rows(unet)

    def _say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            print(f"NetWeave: {line}", file=sys.stderr)


def refiner_of(p):
    """The refiner checkpoint Neo switches to while sampling this generation, or None."""
    info = getattr(p, "refiner_checkpoint_info", None)
    return info if info is not None and getattr(p, "refiner_switch_at", None) else None


def original_checkpoint() -> Optional[str]:
    """Neo's ORIGINAL_CHECKPOINT (modules/sd_samplers_common.py): set while the refiner's state
    dict is in the model's modules, until the refiner script's postprocess loads it back."""
    return getattr(sys.modules.get("modules.sd_samplers_common"), "ORIGINAL_CHECKPOINT", None)


def switch_step(p) -> Optional[int]:
    """The first step of the refiner when Neo switches by steps (opts.refiner_use_steps: at
    the first step k with k / steps ≥ the switch point, compared as Neo compares them); by
    sigma (the default) the adapter cannot say before sampling: None."""
    if not getattr(shared.opts, "refiner_use_steps", False):
        return None
    at = float(p.refiner_switch_at)
    return next((k for k in range(p.steps) if not at > k / p.steps), p.steps)


def lora_replacements(text: str) -> List[Tuple[str, str]]:
    """Neo's "Lora Replacements" (refiner_lora_replacement): one `before=after` a line, applied
    in turn, as plain text replacements, to each `<lora:>` name for the refiner pass. A line
    without `=` or with nothing before it is skipped here."""
    pairs = []
    for line in (text or "").splitlines():
        before, equals, after = line.partition("=")
        if equals and before.strip():
            pairs.append((before.strip(), after.strip()))
    return pairs


def renamed(kind: str, name: str, pairs: List[Tuple[str, str]]) -> str:
    if kind == "lora":  # Neo renames its "lora" extra networks only
        for before, after in pairs:
            name = name.replace(before, after)
    return name


def release_neo_lora(sd_model) -> None:
    """Neo's LoRA loads nothing from now on, and the weights it merged are put back now."""
    builtin = sys.modules.get("networks")  # extensions-builtin/sd_forge_lora/networks.py
    load = getattr(builtin, "load_networks", None)
    if load is not None:
        # forge_objects' unet and clip back to the originals, no patches. Not skipped: Neo's
        # "Reload state_dict only" refiner leaves current_lora_hash at str([]) (its text of no
        # networks) with the refiner pass's patched patchers in place
        sd_model.current_lora_hash = None
        load([], [], [])
    original = sd_model.forge_objects_original
    for patcher in (original.unet, original.clip.patcher):
        if patcher.backup:  # shared by every clone: what any of them merged
            patcher.unpatch_model()


def silence_schedule(p) -> None:
    """Neo's built-in `[w@t]` schedule forgets the tags it read: NetWeave applies them."""
    for script in getattr(p.scripts, "alwayson_scripts", None) or ():
        mapping = getattr(script, "mapping", None)
        if script.title() == SCHEDULE_TITLE and isinstance(mapping, dict):
            mapping.clear()  # its class-level dict, read by its on_cfg_denoiser callback


ADAPTER = NeoAdapter()


class NetWeaveScript(LdmScript, scripts.Script):
    adapter = ADAPTER

    def process_before_every_sampling(self, p, enabled=True, options="", **kwargs):
        if enabled:
            self.adapter.before_sampling(p)

    def postprocess(self, p, processed, *args):
        self.adapter.end_refiner()  # extra networks disabled: Neo deactivated none


register(ADAPTER)
