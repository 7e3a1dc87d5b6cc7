"""backend/patcher/base.py (Neo, the ComfyUI-style ModelPatcher that sd_forge_lora_schedule
and operations_int8 need): what NetWeave meets of it.

- `add_patches(patches, strength_patch, strength_model, *, filename, online_mode)`: keys the
  model has; merged mode appends (strength, adapter, strength_model, offset, function) to
  `patches[key]`, online mode adds an `OnlineLoRAPatch(filename, key, [...])` weight wrapper;
  `patches_uuid` renewed. `has_online_lora()`: any weight wrapper.
- `clone()`: patches lists copied, weight wrappers shallow-copied, `model_options` deep-copied,
  `backup` shared by every clone.
- `load()`: for every layer, its `weight_function`/`bias_function` wiped and refilled from the
  weight wrappers; every patched key merged: the current Parameter backed up, a new one set
  (`set_attr`). `unpatch_model()`: the backups set back, the uuid forgotten; `detach()`
  (a loaded model's unload) unpatches it.
- `set_model_unet_function_wrapper(fn)`: `model_options["model_function_wrapper"]`.
- `dynamic_loras`: read by the built-in LoRA schedule (its current control.py iterates it;
  no stored base.py has it yet, so here it is an empty dict)."""
import copy
import uuid

import torch

from .lora import merge_lora_to_weight


class OnlineLoRAPatch:
    """A weight wrapper: the patch merged into the weight the layer computes with, at every
    forward. `patch[0][0]` is the strength (the built-in schedule writes it per step)."""

    def __init__(self, name, key, patch):
        self.name, self.key, self.patch = name, key, [patch]

    def __call__(self, weight):
        return merge_lora_to_weight(self.patch, weight, self.key, computation_dtype=weight.dtype)


def _parent(model, key):
    path, name = key.rsplit(".", 1)
    return model.get_submodule(path), name


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=torch.device("cpu"), size=0, *,
                 current_device=None, weight_inplace_update=False):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.patches, self.backup = {}, {}
        self.weight_wrapper_patches = {}
        self.dynamic_loras = {}
        self.model_options = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()
        for name, value in (("model_loaded_weight_memory", 0),
                            ("current_weight_patches_uuid", None)):
            if not hasattr(model, name):
                setattr(model, name, value)

    def has_online_lora(self):
        return len(self.weight_wrapper_patches) > 0

    def clone(self):
        n = self.__class__.__new__(self.__class__)
        n.__dict__.update(self.__dict__)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.dynamic_loras = self.dynamic_loras.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.parent = self
        return n

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def add_weight_wrapper(self, name, function):
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None,
                    online_mode=None):
        have = dict(self.model.named_parameters())
        kept = []
        for key, adapter in patches.items():
            if key not in have:
                continue
            kept.append(key)
            entry = [strength_patch, adapter, strength_model, None, None]
            if online_mode:
                self.add_weight_wrapper(key, OnlineLoRAPatch(filename, key, entry))
            else:
                self.patches[key] = self.patches.pop(key, []) + [tuple(entry)]
        self.patches_uuid = uuid.uuid4()
        return kept

    @torch.inference_mode()
    def patch_weight_to_device(self, key):
        parent, name = _parent(self.model, key)
        weight = getattr(parent, name)
        if key not in self.patches:
            return weight
        self.backup.setdefault(key, weight)
        merged = merge_lora_to_weight(self.patches[key], weight.to(torch.float32), key)
        setattr(parent, name, torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False))

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False,
             full_load=False):
        for n, m in self.model.named_modules():
            if hasattr(m, "parameters_manual_cast"):
                m.weight_function, m.bias_function = [], []  # wipe_lowvram_weight
                m.weight_function.extend(self.weight_wrapper_patches.get(f"{n}.weight", []))
                m.bias_function.extend(self.weight_wrapper_patches.get(f"{n}.bias", []))
        for key in list(self.patches):
            self.patch_weight_to_device(key)
        self.model.model_loaded_weight_memory = 1
        self.model.current_weight_patches_uuid = self.patches_uuid

    def detach(self, unpatch_all=True):
        """LoadedModel.model_unload: the backups put back, the model to the offload device
        (here it stays where it is); the next load loads it again."""
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if not unpatch_weights:
            return
        for key, weight in list(self.backup.items()):
            parent, name = _parent(self.model, key)
            setattr(parent, name, weight)
        self.backup.clear()
        self.model.current_weight_patches_uuid = None
        self.model.model_loaded_weight_memory = 0

    def memory_required(self, input_shape):
        """KModel.memory_required: grows with the UNet batch (tests set free memory)."""
        return input_shape[0] * 1e6
