"""backend/patcher/base.py at Forge dfdcbab: `ModelPatcher` (and backend/patcher/unet.py's
`UnetPatcher`, backend/patcher/clip.py's `CLIP`): `lora_patches` {(filename, strength_patch,
strength_model, online_mode): {param key: [patch, ...]}}, shallow-copied by `clone()`;
`add_patches` keeps keys the model has; `refresh_loras()` hands them to the shared loader."""
from .lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device="cpu"):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.lora_patches = {}
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = type(self).__new__(type(self))
        n.__dict__.update(self.__dict__)
        n.lora_patches = self.lora_patches.copy()
        n.model_options = {"transformer_options": dict(self.model_options["transformer_options"])}
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0,
                    online_mode=False):
        names = dict(self.model.named_parameters())
        kept = {k: [(strength_patch, v)] for k, v in patches.items() if k in names}
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = kept
        return list(kept)

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def memory_required(self, input_shape):
        """backend/patcher/unet.py: grows with the UNet batch (tests set free memory)."""
        return input_shape[0] * 1e6


class CLIP:
    """backend/patcher/clip.py: `cond_stage_model` a JointTextEncoder ModuleDict (clip_l,
    clip_g), `patcher` a ModelPatcher on it."""

    def __init__(self, cond_stage_model):
        self.cond_stage_model = cond_stage_model
        self.patcher = ModelPatcher(cond_stage_model)

    def clone(self):
        n = CLIP.__new__(CLIP)
        n.cond_stage_model, n.patcher = self.cond_stage_model, self.patcher.clone()
        return n


class ForgeObjects:
    """backend/diffusion_engine/base.py."""

    def __init__(self, unet, clip, vae=None, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)
