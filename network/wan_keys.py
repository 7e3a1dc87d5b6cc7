"""Wan 2.2 A14B's layers (each of its two experts is a Wan 2.1 14B transformer) on both trees
a host may hold, and every name a file gives them.

Coordinates are the original release's names, which ComfyUI keeps: `blocks.N.self_attn.q/k/v/o`,
`blocks.N.cross_attn.q/k/v/o` (attention to the umT5 text), `blocks.N.ffn.0/2`,
`text_embedding.0/2`, `time_embedding.0/2`, `time_projection.1`, `head.head`. diffusers'
`WanTransformer3DModel` renames them (`attn1.to_q`, `attn2.to_out.0`, `ffn.net.0.proj`,
`condition_embedder.*`, `proj_out`); nothing is fused. The patch embedder is a 3-D
convolution, which no file's LoRA targets and NetWeave leaves alone.

Files: musubi-tuner `lora_unet_blocks_0_self_attn_q` (Wan-Fun's with a doubled underscore,
`lora_unet__blocks_…`), ComfyUI `diffusion_model.blocks.0.self_attn.q`, diffusers/PEFT
`transformer.blocks.0.attn1.to_q`, SimpleTuner `lycoris_blocks_0_attn1_to_q`.
"""
from __future__ import annotations

import re
from typing import Optional

from torch import nn

from .dit_keys import DIFFUSERS, NATIVE, DitKeys, block_namer
from .tokens import Order, TokenLayout, Tokens

_B, _D = "blocks.{}.", "blocks.{}."
RENAMED = {
    **{_B + f"{o}_attn.{p}": _D + f"attn{i}.{d}" for o, i in (("self", 1), ("cross", 2))
       for p, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
    _B + "cross_attn.k_img": _D + "attn2.add_k_proj",
    _B + "cross_attn.v_img": _D + "attn2.add_v_proj",
    _B + "ffn.0": _D + "ffn.net.0.proj",
    _B + "ffn.2": _D + "ffn.net.2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}

_TEXT_SIDE = re.compile(r"blocks\.\d+\.cross_attn\.(k|v|k_img|v_img)$")


def tokens_of(layer: str) -> Tokens:
    """The video's patches (frame by frame) everywhere in a block but where cross-attention
    projects the text (its keys and values)."""
    if _TEXT_SIDE.match(layer) or layer.startswith("text_embedding"):
        return Tokens.TEXT
    if re.match(r"blocks\.\d+\.", layer) or layer == "head.head":
        return Tokens.IMAGE
    return Tokens.VECTOR


# IN (the text and time embedders), B00–B39 (the blocks), OUT (the head).
block_of = block_namer({"blocks": "B"}, ("text_embedding", "time_embedding", "time_projection"),
                       ("head",))


def tree_layout(root: nn.Module) -> Optional[str]:
    children = dict(root.named_children())
    if "blocks" not in children or "patch_embedding" not in children:
        return None
    if "condition_embedder" in children:
        return DIFFUSERS
    return NATIVE if "head" in children else None


# No joint sequence: the text enters through cross-attention only.
WAN = DitKeys("wan22", tree_layout, tokens_of, block_of,
              tokens={NATIVE: TokenLayout(Order.TEXT_FIRST, text=512, frames=True),
                      DIFFUSERS: TokenLayout(Order.TEXT_FIRST, text=512, frames=True)},
              renamed=RENAMED, native_underscored=("lora_unet_", "lora_unet__", "lycoris_"))
