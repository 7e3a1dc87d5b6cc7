"""The decoder layers of a language-model text encoder: Z-Image's Qwen3 (transformers
`Qwen3Model` / `Qwen3ForCausalLM`) and the language model of Qwen-Image's Qwen2.5-VL
(`Qwen2_5_VLForConditionalGeneration`), or any host class built the same way (ComfyUI's and
Forge Neo's `Llama2_`, under their `Qwen3_4B`/`Qwen25_7BVLI` as `model`).

Canonical names are the paths inside the decoder stack's owner — the module holding
`embed_tokens` and `layers` — `layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`, … The
wrappers around it differ by class and library version (`model.` in a causal LM and in
ComfyUI, `model.language_model.` in Qwen2.5-VL since transformers 4.52, `model.` before), so
files write any of them before the canonical name (te_keys.py says which). The vision tower
of Qwen2.5-VL is not mapped: text-to-image encodes no image.
"""
from __future__ import annotations

from typing import Iterator, Tuple

from torch import nn

# What files put between their prefix and the canonical name (te_keys.py): the decoder's
# owner itself, a causal LM's or ComfyUI's `model.`, Qwen2.5-VL's `model.language_model.`
# (transformers 4.52 and later; `language_model.` in a bare Qwen2_5_VLModel) and
# `language_model.model.` (older VL wrappers).
WRAPPERS = ("", "model.", "model.language_model.", "language_model.", "language_model.model.")


def _is_decoder_stack(module: nn.Module) -> bool:
    layers = getattr(module, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or \
            not isinstance(getattr(module, "embed_tokens", None), nn.Module):
        return False
    first = layers[0]
    return hasattr(first, "self_attn") and hasattr(first, "mlp")


def lm_root(root: nn.Module) -> Tuple[str, nn.Module]:
    """(path, module) of the decoder stack's owner inside a text-encoder tree."""
    for path, module in root.named_modules():
        if _is_decoder_stack(module):
            return path, module
    raise ValueError(f"no language model (embed_tokens and layers.N.self_attn/mlp) found inside "
                     f"{type(root).__name__}")


def lm_layers(root: nn.Module, patchable) -> Iterator[Tuple[str, str, nn.Module]]:
    """(canonical name, path in the component tree, module) of every patchable decoder layer:
    the attention and MLP projections (the RMSNorms hold no layer a file changes)."""
    base, lm = lm_root(root)
    prefix = base + "." if base else ""
    for rel, module in lm.named_modules():
        if rel.startswith("layers.") and patchable(module):
            yield rel, prefix + rel, module
