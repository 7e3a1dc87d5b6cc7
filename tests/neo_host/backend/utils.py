"""backend/utils.py (Neo): `load_torch_file(path)`, a checkpoint's tensors (safetensors here)."""
from safetensors.torch import load_file


def load_torch_file(ckpt, safe_load=False, device=None):
    return load_file(ckpt)
