"""extensions-builtin/sd_forge_lora/networks.py at Forge dfdcbab: `load_networks(names,
te_multipliers=None, unet_multipliers=None, dyn_dims=None)`. Builds [[file, unet, te, online]]
per name; returns at once when its str() equals `current_sd.current_lora_hash`; else sets
forge_objects' unet and clip back to `forge_objects_original`'s, adds each file's patches to
clones of them, and stores `forge_objects_after_applying_lora`. The weights change later, when
the sampler loads the model (memory_management → refresh_loras). Stand-in patches: a fixed
"diff" on two layers (`PATCHED`), so what Forge's own LoRA did is visible in the weights."""
import os

import torch

from modules import sd_models, shared

loaded_networks = []
calls = []  # every call's names (tests read it)
PATCHED = {"unet": "diffusion_model.input_blocks.1.1.proj_in.weight",
           "clip": "clip_l.transformer.encoder.layers.0.mlp.fc1.weight"}


def _diff(model, key):
    shape = dict(model.named_parameters())[key].shape
    return torch.full(shape, 0.01)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = sd_models.model_data.get_sd_model()
    if current_sd is None:
        return
    calls.append(list(names))
    loaded_networks.clear()
    files = [os.path.join(shared.cmd_opts.lora_dir, name + ".safetensors") for name in names]
    loaded_networks.extend(f for f in files if os.path.exists(f))
    targets = [[f, u, t, False] for f, u, t in zip(files, unet_multipliers, te_multipliers)
               if os.path.exists(f)]
    if current_sd.current_lora_hash == str(targets):
        return
    current_sd.current_lora_hash = str(targets)
    objects = current_sd.forge_objects
    objects.unet = current_sd.forge_objects_original.unet
    objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, online_mode in targets:
        unet, clip = objects.unet.clone(), objects.clip.clone()
        unet.add_patches(filename=filename, strength_patch=strength_model,
                         patches={PATCHED["unet"]: _diff(unet.model, PATCHED["unet"])})
        clip.patcher.add_patches(filename=filename, strength_patch=strength_clip,
                                 patches={PATCHED["clip"]: _diff(clip.cond_stage_model,
                                                                 PATCHED["clip"])})
        objects.unet, objects.clip = unet, clip
    current_sd.forge_objects_after_applying_lora = objects.shallow_copy()
