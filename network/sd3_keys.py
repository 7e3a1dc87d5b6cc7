"""SD3/SD3.5's layers (MMDiT) on both trees a host may hold, and every name a file gives them.

Coordinates are Stability's original names, which ComfyUI keeps: `joint_blocks.N.x_block`
(the image stream) and `.context_block` (the text stream), each with a fused `attn.qkv`
(q, k, v in row thirds), `attn.proj`, `mlp.fc1/fc2` and `adaLN_modulation.1`; SD3.5 Medium's
second image self-attention `x_block.attn2.qkv/proj`; `x_embedder.proj` (the 2×2 patch
convolution), `context_embedder`, `t_embedder.mlp.0/2`, `y_embedder.mlp.0/2` (the pooled
text), `final_layer.linear`, `final_layer.adaLN_modulation.1`. diffusers'
`SD3Transformer2DModel` splits the qkvs (`attn.to_q`, `attn.add_q_proj`, `attn2.to_q`, …),
renames the rest, and stores a modulation that gives two chunks — the final layer's and
the last block's text stream, which ends after its qkv — with its halves swapped
(diffusers: scale, shift; the original: shift, scale).

Files: kohya `lora_unet_joint_blocks_0_x_block_attn_qkv`, ComfyUI `diffusion_model.joint_blocks.…`,
diffusers/PEFT `transformer.transformer_blocks.0.attn.to_q` (also fal's `base_model.model.`),
OneTrainer `lora_transformer_transformer_blocks_0_attn_to_q`, SimpleTuner `lycoris_…`; text
encoders as SDXL's (`lora_te1_` CLIP-L, `lora_te2_` CLIP-G).
"""
from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .dit_keys import DIFFUSERS, NATIVE, DitKeys, block_namer
from .tokens import Order, TokenLayout, Tokens

_B, _D = "joint_blocks.{}.", "transformer_blocks.{}."
FUSED = {
    _B + "x_block.attn.qkv": (_D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v"),
    _B + "context_block.attn.qkv": (_D + "attn.add_q_proj", _D + "attn.add_k_proj",
                                    _D + "attn.add_v_proj"),
    _B + "x_block.attn2.qkv": (_D + "attn2.to_q", _D + "attn2.to_k", _D + "attn2.to_v"),
}
RENAMED = {
    _B + "x_block.attn.proj": _D + "attn.to_out.0",
    _B + "context_block.attn.proj": _D + "attn.to_add_out",
    _B + "x_block.attn2.proj": _D + "attn2.to_out.0",
    _B + "x_block.mlp.fc1": _D + "ff.net.0.proj",
    _B + "x_block.mlp.fc2": _D + "ff.net.2",
    _B + "context_block.mlp.fc1": _D + "ff_context.net.0.proj",
    _B + "context_block.mlp.fc2": _D + "ff_context.net.2",
    _B + "x_block.adaLN_modulation.1": _D + "norm1.linear",
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# Two chunks (shift, scale) where the original has them; six or nine in a full block's.
SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear",
           _B + "context_block.adaLN_modulation.1": _D + "norm1_context.linear"}


def _two_chunks(rows: int, width: int) -> bool:
    return rows == 2 * width


def tokens_of(layer: str) -> Tokens:
    m = re.match(r"joint_blocks\.\d+\.(x_block|context_block)\.(.+)$", layer)
    if m:
        if m.group(2).startswith("adaLN"):
            return Tokens.VECTOR
        return Tokens.IMAGE if m.group(1) == "x_block" else Tokens.TEXT
    if layer == "final_layer.linear":
        return Tokens.IMAGE
    if layer == "x_embedder.proj":
        return Tokens.FLAT
    if layer == "context_embedder":
        return Tokens.TEXT
    return Tokens.VECTOR


# IN (the patch, caption, time and pooled-text embedders), D00–D37 (the joint blocks), OUT.
block_of = block_namer({"joint_blocks": "D"},
                       ("x_embedder", "context_embedder", "t_embedder", "y_embedder"),
                       ("final_layer",))


def tree_layout(root: nn.Module) -> Optional[str]:
    children = dict(root.named_children())
    if "joint_blocks" in children:
        return NATIVE
    if {"transformer_blocks", "pos_embed", "context_embedder"} <= set(children) and \
            "single_transformer_blocks" not in children:
        return DIFFUSERS
    return None


# Each stream has its own projections, so no layer sees a joint sequence: the order (text
# first in the original, image first in diffusers) does not matter here.
SD3 = DitKeys("sd3", tree_layout, tokens_of, block_of,
              tokens={NATIVE: TokenLayout(Order.TEXT_FIRST, text=333),
                      DIFFUSERS: TokenLayout(Order.IMAGE_FIRST, text=333)},
              fused=FUSED, renamed=RENAMED, swapped=SWAPPED, swap_when=_two_chunks,
              diffusers_prefixes=("transformer.", "base_model.model.", ""))
