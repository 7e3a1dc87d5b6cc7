"""The Flux family's layers (Flux.1 dev/schnell, Chroma) on both trees a host may hold, and
every name a file gives them.

Coordinates are the original (BFL) layers, whose attention projections are fused:
`double_blocks.N.img_attn.qkv` holds q, k, v (rows 0–h, h–2h, 2h–3h) and
`single_blocks.N.linear1` q, k, v and the MLP input (rows 3h–). The diffusers tree
(`FluxTransformer2DModel`, `ChromaTransformer2DModel`) splits them (`attn.to_q`, …,
`proj_mlp`) and stores `final_layer.adaLN_modulation.1` as `norm_out.linear` with its two halves
swapped (diffusers: scale, shift; BFL: shift, scale). So a host layer is a `Span`: the rows of
canonical layers it holds, in its own row order; a file's layer name is one too. The keymap
intersects the two, row by row, so a fused file reaches split layers and split files a fused
one exactly (docs/design.md §5).

File spellings, per published format: kohya/sd-scripts `lora_unet_double_blocks_0_img_attn_qkv`,
ComfyUI/BFL `diffusion_model.double_blocks.0.img_attn.qkv` (also bare, `transformer.` and fal's
`base_model.model.`), diffusers/PEFT/ai-toolkit `transformer.transformer_blocks.0.attn.to_q`,
OneTrainer `lora_transformer_transformer_blocks_0_attn_to_q`, SimpleTuner LyCORIS
`lycoris_transformer_blocks_0_attn_to_q`, XLabs `double_blocks.0.processor.qkv_lora1` (its
single-block `qkv_lora` holds q, k, v of `linear1` without the MLP rows).
"""
from __future__ import annotations

import re
from typing import Iterator, Optional, Tuple

from torch import nn

from .dit_keys import DIFFUSERS, NATIVE, DitKeys, block_namer, Segment, Span, fill, match, pattern
from .tokens import Order, TokenLayout, Tokens

# Canonical fused layers and the diffusers layers that split them, in row order. A "{}" is
# the block index; the last part of linear1 (the MLP input) takes the rows the others leave.
FUSED = {
    "double_blocks.{}.img_attn.qkv": ("transformer_blocks.{}.attn.to_q",
                                      "transformer_blocks.{}.attn.to_k",
                                      "transformer_blocks.{}.attn.to_v"),
    "double_blocks.{}.txt_attn.qkv": ("transformer_blocks.{}.attn.add_q_proj",
                                      "transformer_blocks.{}.attn.add_k_proj",
                                      "transformer_blocks.{}.attn.add_v_proj"),
    "single_blocks.{}.linear1": ("single_transformer_blocks.{}.attn.to_q",
                                 "single_transformer_blocks.{}.attn.to_k",
                                 "single_transformer_blocks.{}.attn.to_v",
                                 "single_transformer_blocks.{}.proj_mlp"),
}
# One canonical layer, one diffusers layer, the same rows.
RENAMED = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "double_blocks.{}.img_attn.proj": "transformer_blocks.{}.attn.to_out.0",
    "double_blocks.{}.txt_attn.proj": "transformer_blocks.{}.attn.to_add_out",
    "double_blocks.{}.img_mod.lin": "transformer_blocks.{}.norm1.linear",
    "double_blocks.{}.txt_mod.lin": "transformer_blocks.{}.norm1_context.linear",
    "double_blocks.{}.img_mlp.0": "transformer_blocks.{}.ff.net.0.proj",
    "double_blocks.{}.img_mlp.2": "transformer_blocks.{}.ff.net.2",
    "double_blocks.{}.txt_mlp.0": "transformer_blocks.{}.ff_context.net.0.proj",
    "double_blocks.{}.txt_mlp.2": "transformer_blocks.{}.ff_context.net.2",
    "single_blocks.{}.linear2": "single_transformer_blocks.{}.proj_out",
    "single_blocks.{}.modulation.lin": "single_transformer_blocks.{}.norm.linear",
    "final_layer.linear": "proj_out",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
    "distilled_guidance_layer.layers.{}.in_layer": "distilled_guidance_layer.layers.{}.linear_1",
    "distilled_guidance_layer.layers.{}.out_layer": "distilled_guidance_layer.layers.{}.linear_2",
}
# The same layer with its two halves in the other order.
SWAPPED = {"final_layer.adaLN_modulation.1": "norm_out.linear"}
# XLabs names (under double_blocks.N / single_blocks.N .processor.): the canonical layer and,
# for the single block's qkv_lora, how many thirds of the block's width it holds.
XLABS = {
    "double_blocks.{}.processor.qkv_lora1": "double_blocks.{}.img_attn.qkv",
    "double_blocks.{}.processor.qkv_lora2": "double_blocks.{}.txt_attn.qkv",
    "double_blocks.{}.processor.proj_lora1": "double_blocks.{}.img_attn.proj",
    "double_blocks.{}.processor.proj_lora2": "double_blocks.{}.txt_attn.proj",
    "single_blocks.{}.processor.qkv_lora": "single_blocks.{}.linear1",
    "single_blocks.{}.processor.proj_lora": "single_blocks.{}.linear2",
}
XLABS_QKV_ONLY = "single_blocks.{}.linear1"
# The attention's RMSNorms over each head's q and k (QKNorm): `scale` in the original tree,
# `weight` in diffusers'.
NORMS = {
    "double_blocks.{}.img_attn.norm.query_norm": "transformer_blocks.{}.attn.norm_q",
    "double_blocks.{}.img_attn.norm.key_norm": "transformer_blocks.{}.attn.norm_k",
    "double_blocks.{}.txt_attn.norm.query_norm": "transformer_blocks.{}.attn.norm_added_q",
    "double_blocks.{}.txt_attn.norm.key_norm": "transformer_blocks.{}.attn.norm_added_k",
    "single_blocks.{}.norm.query_norm": "single_transformer_blocks.{}.attn.norm_q",
    "single_blocks.{}.norm.key_norm": "single_transformer_blocks.{}.attn.norm_k",
}


_pattern, _match, _fill = pattern, match, fill  # the names tests/test_flux.py reads


def tokens_of(layer: str) -> Tokens:
    """The token layout of a canonical layer's input."""
    if re.match(r"single_blocks\.\d+\.linear[12]$", layer):
        return Tokens.JOINT
    if layer in ("img_in", "final_layer.linear") or \
            re.match(r"double_blocks\.\d+\.img_(attn\.(qkv|proj)|mlp\.\d+)$", layer):
        return Tokens.IMAGE
    if layer == "txt_in" or re.match(r"double_blocks\.\d+\.txt_(attn\.(qkv|proj)|mlp\.\d+)$", layer):
        return Tokens.TEXT
    return Tokens.VECTOR


def tree_layout(root: nn.Module) -> Optional[str]:
    """NATIVE (double_blocks, single_blocks: BFL, ComfyUI, Forge Neo), DIFFUSERS
    (transformer_blocks, single_transformer_blocks) or None when `root` is no Flux-family
    transformer."""
    children = dict(root.named_children())
    if "double_blocks" in children and "single_blocks" in children:
        return NATIVE
    if "transformer_blocks" in children and "single_transformer_blocks" in children and \
            "x_embedder" in children and "context_embedder" in children:
        return DIFFUSERS
    return None


# The blocks of blocks.FLUX_BLOCKS.
block_of = block_namer({"double_blocks": "D", "single_blocks": "S"},
                       ("img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                        "distilled_guidance_layer"), ("final_layer",))


def part_rows(fused: str, rows: int, width: int) -> Tuple[int, ...]:
    """Rows of each split part of a fused canonical layer with `rows` rows and input `width`:
    thirds for a qkv, the block width three times and the MLP rest for linear1."""
    if fused.endswith("linear1"):
        return (width, width, width, rows - 3 * width)
    return (rows // 3,) * 3


def _xlabs_names(layer: str, rows: int, width: int) -> Iterator[Tuple[str, Span]]:
    for x, canonical in XLABS.items():
        m = _pattern(canonical).match(layer)
        if m:
            held = 3 * width if canonical == XLABS_QKV_ONLY else rows
            for prefix in ("", "diffusion_model."):
                yield prefix + _fill(x, m.group(1)), (Segment(layer, 0, 0, held),)


# Text first in the joint sequence, on both trees (BFL and diffusers alike).
FLUX = DitKeys("flux", tree_layout, tokens_of, block_of,
               tokens={NATIVE: TokenLayout(Order.TEXT_FIRST), DIFFUSERS: TokenLayout(Order.TEXT_FIRST)},
               fused=FUSED, renamed=RENAMED, swapped=SWAPPED, part_rows=part_rows,
               extra_names=_xlabs_names, norms=NORMS)
host_layers, file_spellings = FLUX.host_layers, FLUX.file_spellings
