"""Z-Image (Turbo)'s layers on both trees a host may hold, and every name a file gives them.

Coordinates are the original release's layers (ComfyUI's names): `layers.N` (the 30
single-stream blocks on the joint sequence), `noise_refiner.N` (image tokens only) and
`context_refiner.N` (caption tokens only), each with a fused `attention.qkv` (q, k, v in row
thirds) and `attention.out`; `x_embedder`, `cap_embedder.1`, `t_embedder.mlp.*`,
`final_layer.*`. diffusers' `ZImageTransformer2DModel` splits the qkv (`attention.to_q`, …),
calls `attention.out` `attention.to_out.0` and keys the embedder and final layer by patch
size (`all_x_embedder.2-1`, `all_final_layer.2-1`); every other name is the same.

Files: ai-toolkit/ComfyUI `diffusion_model.layers.0.attention.to_q` (diffusers' names under
ComfyUI's prefix), musubi/kohya `lora_unet_layers_0_attention_to_q`, PEFT/diffusers
`transformer.layers.0.attention.to_q`, SimpleTuner LyCORIS `lycoris_layers_0_attention_to_q`,
and the original fused names (`diffusion_model.layers.0.attention.qkv`).
"""
from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .dit_keys import DIFFUSERS, NATIVE, DitKeys, block_namer
from .tokens import Order, TokenLayout, Tokens

_STACKS = ("layers", "noise_refiner", "context_refiner")
FUSED = {f"{s}.{{}}.attention.qkv": (f"{s}.{{}}.attention.to_q", f"{s}.{{}}.attention.to_k",
                                     f"{s}.{{}}.attention.to_v") for s in _STACKS}
RENAMED = {"x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear",
           "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
           **{f"{s}.{{}}.attention.out": f"{s}.{{}}.attention.to_out.0" for s in _STACKS}}

_BLOCK_LAYER = re.compile(r"(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)$")
_PROJECTIONS = re.compile(r"attention\.(qkv|out)$|feed_forward\.w[123]$")


def tokens_of(layer: str) -> Tokens:
    """The token layout of a canonical layer's input. diffusers embeds the patches of the
    whole batch in one run (rows of every image together): `x_embedder` is FLAT."""
    m = _BLOCK_LAYER.match(layer)
    if m and _PROJECTIONS.search(m.group(3)):
        return {"layers": Tokens.JOINT, "noise_refiner": Tokens.IMAGE,
                "context_refiner": Tokens.TEXT}[m.group(1)]
    if layer == "final_layer.linear":  # run on the whole joint sequence
        return Tokens.JOINT
    if layer == "x_embedder":
        return Tokens.FLAT
    if layer.startswith("cap_embedder"):
        return Tokens.TEXT
    return Tokens.VECTOR


# IN (embedders), NR00–NR01 (noise refiner), CR00–CR01 (context refiner), S00–S29 (the
# main single-stream layers), OUT (the final layer).
block_of = block_namer({"layers": "S", "noise_refiner": "NR", "context_refiner": "CR"},
                       ("x_embedder", "cap_embedder", "t_embedder"), ("final_layer",))


def tree_layout(root: nn.Module) -> Optional[str]:
    children = dict(root.named_children())
    if not {"layers", "noise_refiner", "context_refiner"} <= set(children):
        return None
    if "all_x_embedder" in children:
        return DIFFUSERS
    return NATIVE if "x_embedder" in children else None


# diffusers joins [image, caption], each padded at its end to a multiple of 32 tokens;
# ComfyUI's and Forge Neo's NextDiT (the original tree) join [caption, image], padded alike.
ZIMAGE = DitKeys("zimage", tree_layout, tokens_of, block_of,
                 tokens={DIFFUSERS: TokenLayout(Order.IMAGE_FIRST, padded=True, per_image=True),
                         NATIVE: TokenLayout(Order.TEXT_FIRST, padded=True)},
                 fused=FUSED, renamed=RENAMED, same_names=True,
                 diffusers_prefixes=("transformer.", "diffusion_model.", "model.diffusion_model.",
                                     "base_model.model.", ""))
