"""backend/patcher/clip.py (Neo): `CLIP` holds `cond_stage_model` (a JointTextEncoder
ModuleDict: clip_l, clip_g, t5xxl, qwen3, … by model) and a ModelPatcher on it; `clone()`
clones the patcher and shares the modules; `add_patches` goes to the patcher."""
import torch

from .base import ModelPatcher


class ModuleDict(torch.nn.Module):
    """backend/nn/base.py: a plain Module whose entries are children (attributes); not
    torch's ModuleDict (no `in`, no indexing)."""

    def __init__(self, module_dict):
        super().__init__()
        for name, module in module_dict.items():
            self.add_module(name, module)


class JointTextEncoder(ModuleDict):
    pass


class CLIP:
    def __init__(self, model_dict=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = JointTextEncoder(model_dict or {})
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
