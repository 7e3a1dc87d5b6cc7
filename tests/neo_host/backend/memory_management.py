"""backend/memory_management.py (Neo): `load_models_gpu(models)` builds a LoadedModel per
patcher; a clone of an already loaded model replaces it (`detach(unpatch_all=False)`: the
weights stay as they are), and `model_load` → `partially_load`: when the model's
`current_weight_patches_uuid` is set and differs from this patcher's `patches_uuid`, the
backups are put back first (`unpatch_model`), then `load()` merges this patcher's patches and
hangs its weight wrappers on the layers. The free memory decides how many cond/uncond chunks
one UNet call takes (sampling_function)."""
import torch

free_memory = float("inf")  # bytes; tests lower it to split the UNet batch
signal_empty_cache = False
loads = []  # every patcher load_models_gpu loaded (tests read it)


def get_free_memory(device=None):
    return free_memory


def lora_compute_dtype(device=None):
    return torch.float32


def load_models_gpu(models, memory_required=0, force_patch_weights=False,
                    minimum_memory_required=None, force_full_load=False):
    for patcher in models:
        model = patcher.model
        current = getattr(model, "current_weight_patches_uuid", None)
        if current is not None and current != patcher.patches_uuid:
            patcher.unpatch_model()
        if not model.model_loaded_weight_memory:  # partially_load: a loaded model stays
            patcher.load()
        loads.append(patcher)


def load_model_gpu(model):
    return load_models_gpu([model])


def soft_empty_cache():
    pass
