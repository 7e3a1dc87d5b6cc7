"""Qwen-Image's layers and every name a file gives them.

The original release is in diffusers' names, and ComfyUI holds the same tree: 60
double-stream `transformer_blocks.N` (image `attn.to_q/to_k/to_v/to_out.0`, `img_mlp.net.*`,
`img_mod.1`; text `attn.add_q_proj/…/to_add_out`, `txt_mlp.net.*`, `txt_mod.1`), `img_in`,
`txt_in`, `time_text_embed.*`, `norm_out.linear`, `proj_out`. No layer is fused, so every
host layer is its own canonical layer.

Files: ai-toolkit/ComfyUI `diffusion_model.transformer_blocks.0.attn.to_q`, musubi/kohya
`lora_unet_transformer_blocks_0_attn_to_q`, PEFT/diffusers `transformer.…`, bare names,
OneTrainer `lora_transformer_…`, SimpleTuner LyCORIS `lycoris_…`.
"""
from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .dit_keys import NATIVE, DitKeys, block_namer
from .tokens import Order, TokenLayout, Tokens

_IMAGE = re.compile(r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\..+)$")
_TEXT = re.compile(r"transformer_blocks\.\d+\.(attn\.(add_[qkv]_proj|to_add_out)|txt_mlp\..+)$")


def tokens_of(layer: str) -> Tokens:
    if layer in ("img_in", "proj_out") or _IMAGE.match(layer):
        return Tokens.IMAGE
    if layer == "txt_in" or _TEXT.match(layer):
        return Tokens.TEXT
    return Tokens.VECTOR  # time embedder, img_mod/txt_mod, norm_out


# IN (img_in, txt_in, the time embedder), D00–D59, OUT (norm_out, proj_out).
block_of = block_namer({"transformer_blocks": "D"}, ("img_in", "txt_in", "time_text_embed"),
                       ("norm_out", "proj_out"))


def tree_layout(root: nn.Module) -> Optional[str]:
    children = dict(root.named_children())
    return NATIVE if {"transformer_blocks", "img_in", "txt_in", "txt_norm"} <= set(children) \
        else None


# Text first in the joint attention; its projections are per stream, so no layer is joint.
QWENIMAGE = DitKeys("qwenimage", tree_layout, tokens_of, block_of,
                    tokens={NATIVE: TokenLayout(Order.TEXT_FIRST, text=1024)},
                    native_underscored=("lora_unet_", "lycoris_", "lora_transformer_"))
