"""backend/memory_management.py at Forge dfdcbab: loading a patcher's model for sampling or
text encoding runs `LoadedModel.model_load`, which calls `model.refresh_loras()`; the free
memory decides how many cond/uncond chunks one UNet call takes (sampling_function)."""
free_memory = float("inf")  # bytes; tests lower it to split the UNet batch
signal_empty_cache = False


def get_free_memory(device=None):
    return free_memory


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for patcher in models:
        patcher.refresh_loras()  # LoadedModel.model_load


def load_model_gpu(model):
    return load_models_gpu([model])
