"""backend/patcher/unet.py (Neo): `UnetPatcher(ModelPatcher)` with the sampler's extras
(`controlnet_linked_list`, `extra_concat_condition`, the models and memory kept during
sampling)."""
from .base import ModelPatcher


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_concat_condition = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
