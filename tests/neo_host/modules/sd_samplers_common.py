"""modules/sd_samplers_common.py (Neo), the refiner's part: `apply_refiner(cfg_denoiser, x,
sigma)`, which CFGDenoiser.forward calls first at every denoiser call. False until the switch
point (sigma ≤ p.refiner_switch_at, or with opts.refiner_use_steps step / total_steps ≥ it),
while ORIGINAL_CHECKPOINT is set (one switch per generation), without a refiner, when the
refiner is the loaded checkpoint, and with hires fix (an error line). Else it notes the refiner
in the infotext and switches:
- opts.refiner_fast_sd ("Reload state_dict only"): the UNet patcher unloaded, the refiner
  file's diffusion-model state dict loaded into the same modules, ORIGINAL_CHECKPOINT set to
  the loaded checkpoint's file, `current_lora_hash` reset, the extra networks activated again
  with the "lora" ones renamed (apply_lora_for_refiner), the UNet loaded for sampling;
- otherwise a checkpoint change: the refiner selected, a new model loaded
  (sd_models.forge_model_reload, a new shared.sd_model), the original selected again for
  later, the renamed extra networks activated, the conds made again (p.setup_conds) and
  handed to the sampler (cfg_denoiser.update_inner_model), the UNet loaded for sampling.
True after a switch: the denoiser takes the sampler's conds again."""
from backend import memory_management
from modules import extra_networks, shared
from modules.shared import opts

ORIGINAL_CHECKPOINT = None


def _parse_replacements():
    """opts.refiner_lora_replacement: one `before=after` a line."""
    pairs = []
    for line in opts.refiner_lora_replacement.split("\n"):
        before, after = line.split("=", 1)
        pairs.append((before.strip(), after.strip()))
    return pairs


def apply_lora_for_refiner(loras):
    """Each "lora" params' name (items[0], changed in place) with every replacement applied
    in turn (str.replace), as new ExtraNetworkParams."""
    if not loras:
        return []
    pairs = _parse_replacements()
    out = []
    for lora in loras:
        for before, after in pairs:
            lora.items[0] = lora.items[0].replace(before, after)
        out.append(extra_networks.ExtraNetworkParams(lora.items))
    return out


def sampling_prepare(unet, x):
    memory_management.load_models_gpu([unet])


def _activate_for_refiner(p):
    if not p.disable_extra_networks:
        loras = p.extra_network_data.pop("lora", None)
        p.extra_network_data["lora"] = apply_lora_for_refiner(loras)
        extra_networks.activate(p, p.extra_network_data)


def apply_refiner(cfg_denoiser, x, sigma):
    global ORIGINAL_CHECKPOINT
    p = cfg_denoiser.p
    switch_at = p.refiner_switch_at
    if not switch_at:
        return False
    if opts.refiner_use_steps:
        if switch_at > cfg_denoiser.step / cfg_denoiser.total_steps:
            return False
    elif float(sigma) > switch_at:
        return False
    if ORIGINAL_CHECKPOINT is not None:
        return False
    info = p.refiner_checkpoint_info
    if info is None or shared.sd_model.sd_checkpoint_info == info:
        return False
    if getattr(p, "enable_hr", False):
        print("\n\n[Error]Refiner does not support Hires. fix\n\n")
        return False
    p.extra_generation_params["Refiner"] = info.short_title
    p.extra_generation_params["Refiner switch at"] = switch_at

    if opts.refiner_fast_sd:
        from backend.loader import unet_state_dict
        from backend.state_dict import load_state_dict
        sd_model = shared.sd_model
        sd_model.forge_objects.unet.detach()  # current_loaded_models' entry: model_unload
        sd = unet_state_dict(info.filename)
        ORIGINAL_CHECKPOINT = sd_model.sd_checkpoint_info.filename
        load_state_dict(sd_model.forge_objects.unet.model.diffusion_model, sd)
        sd_model.current_lora_hash = str([])
        _activate_for_refiner(p)
        sampling_prepare(sd_model.forge_objects.unet, x)
        sd_model.current_lora_hash = str([])
        return True

    from modules import sd_models
    from modules_forge import main_entry
    original = shared.opts.data.get("sd_model_checkpoint")
    if not main_entry.checkpoint_change(info.short_title, preset=None, save=False, refresh=False):
        return False
    cfg_denoiser.model_wrap = None
    try:
        main_entry.refresh_model_loading_parameters()
        sd_models.forge_model_reload()
    finally:
        main_entry.checkpoint_change(original, preset=None, save=False, refresh=True)
    _activate_for_refiner(p)
    p.setup_conds()
    cfg_denoiser.update_inner_model()
    sampling_prepare(shared.sd_model.forge_objects.unet, x)
    return True
