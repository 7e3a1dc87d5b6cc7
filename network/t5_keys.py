"""The layers of a T5 text encoder: Flux's second text encoder, Chroma's only one, SD3.5's
third, and Wan 2.2's umT5 (transformers' `UMT5EncoderModel` is built the same way).

Canonical names are the paths inside transformers' `T5EncoderModel`
(`encoder.block.0.layer.0.SelfAttention.q`, `….layer.1.DenseReluDense.wi_0`), which ComfyUI's
T5 keeps; the names files give them are te_keys.py's.
"""
from __future__ import annotations

from typing import Iterator, Tuple

from torch import nn


def t5_root(root: nn.Module) -> Tuple[str, nn.Module]:
    for path, module in root.named_modules():
        encoder = getattr(module, "encoder", None)
        if isinstance(encoder, nn.Module) and hasattr(encoder, "block") and \
                hasattr(module, "shared"):
            return path, module
    raise ValueError(f"no T5 encoder (encoder.block) found inside {type(root).__name__}")


def t5_layers(root: nn.Module, patchable) -> Iterator[Tuple[str, str, nn.Module]]:
    """(canonical name, path in the component tree, module) of every patchable T5 layer."""
    base, t5 = t5_root(root)
    prefix = base + "." if base else ""
    for rel, module in t5.named_modules():
        if rel.startswith("encoder.block.") and patchable(module):
            yield rel, prefix + rel, module

