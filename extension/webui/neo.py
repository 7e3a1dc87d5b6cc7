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
  (an SDXL refiner, Wan 2.2's second expert): Neo swaps the weights inside the denoiser and
  re-applies its own LoRA to them (`NeoAdapter.aside`).
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
from typing import Optional

from modules import scripts, shared  # the host's own

from .common import write_report
from .forge import ForgeAdapter
from .ldm import LdmScript, register

# Neo's diffusion-engine class → NetWeave's architecture (backend/diffusion_engine/*.py)
# (Neo has no SD2 engine; its SDXL refiner, Flux.2, Lumina 2, Anima, … are not mapped)
FAMILIES = {"StableDiffusion": "sd1", "StableDiffusionXL": "sdxl", "Flux": "flux",
            "Chroma": "chroma", "ZImage": "zimage", "QwenImage": "qwenimage", "Wan": "wan22"}
# NetWeave's text-encoder component → Neo's JointTextEncoder entry, per architecture
TEXT = {"sd1": {"te1": "clip_l"}, "sdxl": {"te1": "clip_l", "te2": "clip_g"},
        "flux": {"te1": "clip_l", "te2": "t5xxl"}, "chroma": {"te2": "t5xxl"},
        "zimage": {"te1": "qwen3"}, "qwenimage": {"te1": "qwen25_7b"}, "wan22": {"te1": "umt5xxl"}}
SCHEDULE_TITLE = "LoRA Control Integrated"  # Neo's sd_forge_lora_schedule script


class NeoAdapter(ForgeAdapter):
    def __init__(self):
        super().__init__()
        self._said = set()

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
        return {"negative_rows": not math.isclose(float(p.cfg_scale), 1.0)}

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
        """Why NetWeave leaves this generation to Neo, or None. Neo's refiner (an SDXL
        refiner, Wan 2.2's low-noise expert) swaps the diffusion model's weights inside the
        denoiser, before any callback (sd_samplers_common.apply_refiner: loaded into the same
        modules, or a whole other model) and re-applies Neo's LoRA for it: NetWeave's merges
        and pristine copies would be the first model's."""
        if self.arch(model) is None:
            return f"Neo's {type(model).__name__} model is not one NetWeave maps"
        if getattr(p, "refiner_checkpoint_info", None) is not None and \
                getattr(p, "refiner_switch_at", None):
            return "this generation switches to a refiner model while sampling"
        return None

    def start_batch(self, p, prompts, inline, problems) -> None:
        if self.aside(p, p.sd_model) is None:
            super().start_batch(p, prompts, inline, problems)

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


def release_neo_lora(sd_model) -> None:
    """Neo's LoRA loads nothing from now on, and the weights it merged are put back now."""
    builtin = sys.modules.get("networks")  # extensions-builtin/sd_forge_lora/networks.py
    load = getattr(builtin, "load_networks", None)
    if load is not None:
        load([], [], [])  # forge_objects' unet and clip back to the originals, no patches
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


register(ADAPTER)
