"""backend/patcher/lora.py at Forge dfdcbab: `LoraLoader`, one per model, shared by every
clone of its patchers. `refresh(lora_patches, offload_device, force_refresh=False)` runs inside
torch.inference_mode(): nothing when str(list(keys)) equals the loaded hash; else it puts every
backed-up parameter back (set as the module's attribute), then for each patched key backs up
the current Parameter and sets a new Parameter holding the merged weight (fp32 merge)."""
import torch


def _parent(model, key):
    path, name = key.rsplit(".", 1)
    return model.get_submodule(path), name


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])
        self.refreshes = 0  # how many times it changed weights (tests read it)

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        all_patches = {}
        for _, patches in lora_patches.items():
            for key, current in patches.items():
                all_patches[key] = all_patches.get(key, []) + current
        for key, w in self.backup.items():
            parent, name = _parent(self.model, key)
            setattr(parent, name, w)
        self.backup = {}
        for key, current in all_patches.items():
            parent, name = _parent(self.model, key)
            weight = getattr(parent, name)
            self.backup.setdefault(key, weight.to(device=offload_device))
            merged = weight.float()
            for strength, diff in current:  # the "diff" patch type: W + strength · diff
                merged = merged + strength * diff.float()
            setattr(parent, name, torch.nn.Parameter(merged.to(weight.dtype), requires_grad=False))
        self.loaded_hash = hashes
