"""modules_forge/main_entry.py (Neo): `checkpoint_change(name, preset, save, refresh)` selects
another checkpoint (opts.sd_model_checkpoint; False when the name is the one selected) and,
with `refresh`, `refresh_model_loading_parameters()`: model_data.forge_loading_parameters from
the selected checkpoint. The model itself is loaded by sd_models.forge_model_reload."""
from modules import sd_models, shared


def refresh_model_loading_parameters(*, refresh=True):
    if not refresh:
        return
    info = sd_models.select_checkpoint()
    if info is not None:
        sd_models.model_data.forge_loading_parameters = dict(
            checkpoint_info=info, additional_modules=[], unet_storage_dtype=None)


def checkpoint_change(ckpt_name, preset=None, save=True, refresh=True):
    new = sd_models.get_closet_checkpoint_match(ckpt_name)
    if new == sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint")):
        return False
    shared.opts.data["sd_model_checkpoint"] = ckpt_name
    refresh_model_loading_parameters(refresh=refresh)
    return True
