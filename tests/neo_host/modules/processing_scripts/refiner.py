"""modules/processing_scripts/refiner.py (Neo): the built-in "Refiner" script. Its UI (enable,
checkpoint, switch at) sets p.refiner_checkpoint and p.refiner_switch_at in `setup`; here the
test sets them on p, as the API does. `postprocess`, after the whole generation: when
ORIGINAL_CHECKPOINT is set (apply_refiner loaded a refiner's state dict into the model's
modules), the UNet patcher is unloaded, the original checkpoint's diffusion-model state dict
is loaded into the same modules, and ORIGINAL_CHECKPOINT is cleared."""
import torch

from modules import scripts


class ScriptRefiner(scripts.Script):
    def title(self):
        return "Refiner"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return None

    @torch.inference_mode()
    def postprocess(self, *args, **kwargs):
        from backend.loader import unet_state_dict
        from backend.state_dict import load_state_dict
        from modules import sd_samplers_common, shared
        if sd_samplers_common.ORIGINAL_CHECKPOINT is None:
            return
        unet = shared.sd_model.forge_objects.unet
        unet.detach()  # current_loaded_models' entry for it: model_unload
        load_state_dict(unet.model.diffusion_model,
                        unet_state_dict(sd_samplers_common.ORIGINAL_CHECKPOINT))
        sd_samplers_common.ORIGINAL_CHECKPOINT = None
