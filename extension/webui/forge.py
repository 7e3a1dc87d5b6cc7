"""Forge 2 (lllyasviel/stable-diffusion-webui-forge, `backend/`) host adapter: A1111's script
and extra-network API on Forge's own model objects (docs/design.md §6).

What differs from A1111 (the rest is ldm.py):
- Trees: `sd_model.forge_objects.unet.model.diffusion_model` (LDM names) and
  `forge_objects.clip.cond_stage_model.clip_l` (+ `clip_g` on SDXL), Hugging Face CLIP.
  Forge builds them from its own layer classes (`backend/operations.py`): its Linear is a
  plain Module holding `weight`, which network/keymap.py recognises by structure.
- Forge's own LoRA (`sd_forge_lora`) merges through the patchers' shared `LoraLoader` when a
  model is loaded for sampling. In `process` its registry entry is taken, it is told to load
  nothing (`networks.load_networks([], [], [], [])`: the patchers' patch lists emptied) and
  the loader puts back the weights it merged now, before NetWeave copies them. Its `activate`
  is never called: it would append the "sd_lora" setting's tag to every prompt.
- Rows: Forge's sampling function runs the UNet in chunks of the whole image batch, unconds
  first, as many per call as memory allows; `transformer_options['cond_or_uncond']` (0 cond,
  1 uncond) says which, so a pre-hook on the diffusion model describes every call's rows.
- A blended step repeats the UNet's batch (network/blend.py); Forge's per-call
  transformer_options describe it by chunk, so they are repeated Forge's way
  (`repeat_transformer_options`), for Forge's patches that read them inside the UNet.
- Scaled low-precision weights (`scale_weight`): a merge stores (W·scale + ΔW) / scale.
  Quantized weights (NF4, GGUF) take no merge: the engine leaves those layers out and says so.
- The hires pass samples a larger latent: as in A1111, each denoiser call gives the engine
  its latent size for regions (ldm.py).
- `Lora hashes`: Forge's hashes.py takes the SHA-256 of the whole file even where A1111 takes
  the tensor data's, so NetWeave writes Forge's.
- Forge samples inside torch.inference_mode() and its LoRA loader creates parameters there;
  the engine writes such inference tensors in that mode.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from modules import scripts, shared  # the host's own

from ...network.files import FileHash
from .ldm import Adapter, LdmScript, register


class ForgeAdapter(Adapter):
    file_hash = FileHash.WHOLE_FILE  # Forge's hashes.py hashes every byte, addnet or not

    def __init__(self):
        super().__init__()
        self._rows_hook = None  # (diffusion model, hook handle)

    def engine_for(self, sd_model):
        engine = super().engine_for(sd_model)
        engine.blender.repeat_with("transformer_options", repeat_transformer_options)
        return engine

    @staticmethod
    def trees(sd_model) -> dict:
        objects = sd_model.forge_objects
        text = objects.clip.cond_stage_model
        trees = {"unet": objects.unet.model.diffusion_model, "te1": text.clip_l}
        if getattr(sd_model, "is_sdxl", False):
            trees["te2"] = text.clip_g
        return trees

    def engine_options(self) -> dict:
        return {"weight_scale": scale_weight}

    def take_names(self, p) -> None:
        self.names.take(p, quiet=lambda handler, p: None)
        release_forge_lora(shared.sd_model)
        self.hook_rows(self.trees(shared.sd_model)["unet"])

    def off(self) -> None:
        super().off()
        self.unhook_rows()

    # ---- the UNet's batch rows ---------------------------------------------------------
    def describe_rows(self, n: int, per: int) -> None:
        pass  # each UNet call says its own rows (rows_from_options)

    def hook_rows(self, unet) -> None:
        if self._rows_hook is not None and self._rows_hook[0] is unet:
            return
        self.unhook_rows()
        handle = unet.register_forward_pre_hook(self.rows_from_options, with_kwargs=True,
                                                prepend=True)  # before anything reads them
        self._rows_hook = (unet, handle)

    def unhook_rows(self) -> None:
        if self._rows_hook is not None:
            self._rows_hook[1].remove()
            self._rows_hook = None

    def rows_from_options(self, module, args, kwargs):
        """diffusion_model(x, t, context=…, transformer_options={'cond_or_uncond': [1, 0]}):
        x (chunks · B, C, H, W), chunk i the whole batch of B images, in prompt order."""
        if self.run is None or self.engine is None or self.engine.plan is None:
            return None
        marks = (kwargs.get("transformer_options") or {}).get("cond_or_uncond")
        x = args[0] if args else kwargs.get("x")
        if not marks or x is None:
            return None
        per_chunk, n = x.shape[0] // len(marks), len(self.run.plans)
        self.engine.set_rows([j % n for _ in marks for j in range(per_chunk)],
                             [m == 1 for m in marks for _ in range(per_chunk)])
        return None


def repeat_transformer_options(options, copies: int):
    """Forge's transformer_options for the UNet batch repeated `copies` times (a blended
    step, network/blend.py), as Forge's sampling function (backend/sampling/
    sampling_function.py, calc_cond_uncond_batch) would make them for that many chunks: the
    chunks' marks `cond_or_uncond` repeat, and the per-row `cond_mark`, `cond_indices` and
    `uncond_indices` made from them; `sigmas` is one chunk's (its rows are the images, not
    the chunks) and stays. Everything else is shared by the rows and passed as it is."""
    if not isinstance(options, dict) or "cond_or_uncond" not in options:
        return options
    out = dict(options)  # the host's dict stays as it was: the UNet writes into this one
    out["cond_or_uncond"] = list(options["cond_or_uncond"]) * copies
    if isinstance(options.get("cond_mark"), torch.Tensor):
        out["cond_mark"] = torch.cat([options["cond_mark"]] * copies)
    rows = len(options.get("cond_indices", ())) + len(options.get("uncond_indices", ()))
    for key in ("cond_indices", "uncond_indices"):
        if key in options:
            out[key] = [i + c * rows for c in range(copies) for i in options[key]]
    return out


def scale_weight(module) -> Optional[object]:
    """Forge's scaled fp8 layers compute with weight · scale_weight."""
    return getattr(module, "scale_weight", None)


def release_forge_lora(sd_model) -> None:
    """Forge's LoRA loads nothing from now on, and the weights it merged are put back now
    (its loader would do so at the next model load, after NetWeave took its pristine copies)."""
    builtin = sys.modules.get("networks")  # extensions-builtin/sd_forge_lora/networks.py
    load = getattr(builtin, "load_networks", None)
    if load is not None:
        load([], [], [], [])  # forge_objects' unet and clip back to the un-patched originals
    objects = sd_model.forge_objects
    for patcher in (objects.unet, objects.clip.patcher):
        patcher.refresh_loras()  # no patches: the loader restores its backups


ADAPTER = ForgeAdapter()


class NetWeaveScript(LdmScript, scripts.Script):
    adapter = ADAPTER


register(ADAPTER)
