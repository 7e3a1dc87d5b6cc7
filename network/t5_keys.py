"""The T5 text encoder's layers (Flux's second text encoder, Chroma's only one) and the names
files give them.

Canonical names are the paths inside transformers' `T5EncoderModel`
(`encoder.block.0.layer.0.SelfAttention.q`, `….layer.1.DenseReluDense.wi_0`). Files: kohya
`lora_te3_…` (sd-scripts trains T5 as its third encoder), OneTrainer `lora_te2_…`, ComfyUI
`text_encoders.t5xxl.transformer.…`, diffusers `text_encoder_2.…`, and bare names.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

from torch import nn


def is_t5(root: nn.Module) -> bool:
    try:
        _t5_root(root)
    except ValueError:
        return False
    return True


def _t5_root(root: nn.Module) -> Tuple[str, nn.Module]:
    for path, module in root.named_modules():
        encoder = getattr(module, "encoder", None)
        if isinstance(encoder, nn.Module) and hasattr(encoder, "block") and \
                hasattr(module, "shared"):
            return path, module
    raise ValueError(f"no T5 encoder (encoder.block) found inside {type(root).__name__}")


def t5_layers(root: nn.Module, patchable) -> Iterator[Tuple[str, str, nn.Module]]:
    """(canonical name, path in the component tree, module) of every patchable T5 layer."""
    base, t5 = _t5_root(root)
    prefix = base + "." if base else ""
    for rel, module in t5.named_modules():
        if rel.startswith("encoder.block.") and patchable(module):
            yield rel, prefix + rel, module


def t5_spellings(name: str) -> List[str]:
    us = name.replace(".", "_")
    return ["lora_te3_" + us, "lora_te2_" + us, "lycoris_te3_" + us,
            "text_encoders.t5xxl.transformer." + name, "text_encoder_2." + name, name]
