"""extensions-builtin/sd_forge_lora/networks.py (Neo @ 19cc8799): `load_networks(names,
te_multipliers, unet_multipliers)`. Names resolve through `available_network_aliases` (a file
in the Lora folder, by its base name); `online_mode` is `dynamic_args.online_lora`, forced off
when the model's storage dtype is fp32/fp16/bf16 or the ops are "Mixed…"; the targets
[[file, unet, te, online]] are compared as text with `current_lora_hash` (equal: nothing
happens); else forge_objects' unet and clip go back to `forge_objects_original`'s and each
file's patches go onto clones (`add_patches(..., online_mode=…)`), stored as
`forge_objects_after_applying_lora`. Stand-in patches: a fixed "diff" on one UNet layer and one
text-encoder layer (`PATCHED`, per model family), so what Neo's own LoRA does is visible."""
import os

import torch

from backend.args import dynamic_args
from modules import sd_models, shared

loaded_networks = []
calls = []  # every call's names (tests read it)
PATCHED = {"unet": {"sd1": "diffusion_model.input_blocks.1.1.proj_in.weight",
                    "flux": "diffusion_model.double_blocks.0.img_attn.qkv.weight",
                    "qwen": "diffusion_model.transformer_blocks.0.attn.to_q.weight",
                    "wan": "diffusion_model.blocks.0.self_attn.q.weight"},
           "clip": "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"}


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.alias, self.filename = name, name, filename


available_networks = {}
available_network_aliases = {}


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    folder = shared.cmd_opts.lora_dir
    for f in sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else ():
        name, ext = os.path.splitext(f)
        if ext == ".safetensors":
            available_networks[name] = available_network_aliases[name] = \
                NetworkOnDisk(name, os.path.join(folder, f))


def family(sd_model):
    return {"Flux": "flux", "QwenImage": "qwen", "Wan": "wan"}.get(type(sd_model).__name__, "sd1")


def _diff(model, key):
    return ("diff", (torch.full(dict(model.named_parameters())[key].shape, 0.01),))


def load_networks(names, te_multipliers=None, unet_multipliers=None):
    current_sd = sd_models.model_data.get_sd_model()
    if current_sd is None:
        return
    calls.append(list(names))
    list_available_networks()
    found = [available_network_aliases.get(name) for name in names]
    loaded_networks[:] = [n for n in found if n is not None]
    online_mode = bool(dynamic_args.online_lora)
    if current_sd.forge_objects.unet.model.storage_dtype in (torch.float32, torch.float16,
                                                               torch.bfloat16):
        online_mode = False
    if dynamic_args.ops.startswith("Mixed"):
        online_mode = False
    targets = [[n.filename, u, t, online_mode]
               for n, u, t in zip(found, unet_multipliers, te_multipliers) if n is not None]
    key = str(targets)
    if current_sd.current_lora_hash != key:
        current_sd.current_lora_hash = key
        _patch(current_sd, targets)


def _patch(current_sd, targets):
    """Clones of the original patchers, each file's patches added, become forge_objects'."""
    original = current_sd.forge_objects_original
    unet, clip = original.unet, original.clip
    unet_key, clip_key = PATCHED["unet"][family(current_sd)], PATCHED["clip"]
    for filename, strength_model, strength_clip, online in targets:
        unet = unet.clone()
        unet.add_patches({unet_key: _diff(unet.model, unet_key)}, strength_model,
                         filename=filename, online_mode=online)
        if clip_key in dict(clip.cond_stage_model.named_parameters()):
            clip = clip.clone()
            clip.add_patches({clip_key: _diff(clip.cond_stage_model, clip_key)}, strength_clip,
                             filename=filename, online_mode=online)
    objects = current_sd.forge_objects
    objects.unet, objects.clip = unet, clip
    current_sd.forge_objects_after_applying_lora = objects.shallow_copy()
