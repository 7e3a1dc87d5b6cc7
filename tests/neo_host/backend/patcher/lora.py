"""backend/patcher/lora.py (Neo, ComfyUI generation): `merge_lora_to_weight(patches, weight,
key, computation_dtype)`. A patch is (strength, adapter, strength_model, offset, function);
the stand-in knows the "diff" adapter only: W·strength_model + strength·diff, in the
computation dtype, cast back to the weight's dtype."""
import torch


def merge_lora_to_weight(patches, weight, key, computation_dtype=torch.float32):
    dtype = weight.dtype
    out = weight.to(computation_dtype)
    for strength, adapter, strength_model, offset, function in patches:
        if strength_model != 1.0:
            out = out * strength_model
        kind, (diff,) = adapter
        assert kind == "diff", kind
        out = out + strength * diff.to(out)
    return out.to(dtype)
