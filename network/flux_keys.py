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
from dataclasses import dataclass
from enum import Enum
from typing import Dict, Iterator, List, Optional, Tuple

from torch import nn

from .quantized import logical_shape


@dataclass(frozen=True)
class Segment:
    """`length` rows of a canonical layer from row `start`, at row `offset` of the weight
    (a host layer's or a file layer's) that holds them."""

    layer: str
    start: int
    offset: int
    length: int


Span = Tuple[Segment, ...]

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


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def _match(table, name: str) -> Optional[Tuple[str, str]]:
    """(template key, its index or "") of the table entry `name` fills."""
    for template in table:
        m = _pattern(template).match(name)
        if m:
            return template, (m.group(1) if m.groups() else "")
    return None


_SPLIT_PARTS = {d: (fused, i) for fused, parts in FUSED.items() for i, d in enumerate(parts)}
_RENAMED_BACK = {d: c for c, d in RENAMED.items()}
_SWAPPED_BACK = {d: c for c, d in SWAPPED.items()}


class Tokens(Enum):
    """What the rows of a Flux-family layer's input are: where a region can act."""

    IMAGE = "image"  # the latent's 2×2 patches, row by row: a region's mask on that grid
    TEXT = "text"  # the text stream: a regional network leaves it alone
    JOINT = "joint"  # the single blocks: the text tokens, then the image tokens
    VECTOR = "vector"  # one row per image (embedders, modulations): no place to mask


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
    """"bfl" (double_blocks, single_blocks: BFL, ComfyUI, Forge Neo), "diffusers"
    (transformer_blocks, single_transformer_blocks) or None when `root` is no Flux-family
    transformer."""
    children = dict(root.named_children())
    if "double_blocks" in children and "single_blocks" in children:
        return "bfl"
    if "transformer_blocks" in children and "single_transformer_blocks" in children and \
            "x_embedder" in children and "context_embedder" in children:
        return "diffusers"
    return None


def block_of(layer: str) -> Optional[str]:
    """The block (blocks.FLUX_BLOCKS) of a canonical layer."""
    m = re.match(r"(double|single)_blocks\.(\d+)\.", layer)
    if m:
        return f"{'D' if m.group(1) == 'double' else 'S'}{int(m.group(2)):02d}"
    if layer.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in",
                         "distilled_guidance_layer")):
        return "IN"
    if layer.startswith("final_layer"):
        return "OUT"
    return None


def part_rows(fused: str, rows: int, width: int) -> Tuple[int, ...]:
    """Rows of each split part of a fused canonical layer with `rows` rows and input `width`:
    thirds for a qkv, the block width three times and the MLP rest for linear1."""
    if fused.endswith("linear1"):
        return (width, width, width, rows - 3 * width)
    return (rows // 3,) * 3


def _fill(template: str, index: str) -> str:
    return template.replace("{}", index)


def host_layers(root: nn.Module, patchable) -> Iterator[Tuple[str, nn.Module, Span]]:
    """(path, module, span) of every patchable layer of a Flux-family transformer."""
    layout = tree_layout(root)
    if layout is None:
        raise ValueError(f"{type(root).__name__} is no Flux-family transformer")
    modules = dict(root.named_modules())
    for path, module in modules.items():
        if not patchable(module) or getattr(module, "weight", None) is None or \
                len(logical_shape(module)) != 2:
            continue  # the family's layers are all Linear; norms without affine have no weight
        rows = logical_shape(module)[0]
        if layout == "bfl":
            yield path, module, (Segment(path, 0, 0, rows),)
            continue
        span = _diffusers_span(path, rows, modules)
        if span is not None:
            yield path, module, span


def _diffusers_span(path: str, rows: int, modules) -> Optional[Span]:
    hit = _match(_SPLIT_PARTS, path)
    if hit:
        fused, i = _SPLIT_PARTS[hit[0]]
        siblings = [modules.get(_fill(p, hit[1])) for p in FUSED[fused]]
        if any(s is None for s in siblings):
            return None
        start = sum(logical_shape(s)[0] for s in siblings[:i])
        return (Segment(_fill(fused, hit[1]), start, 0, rows),)
    hit = _match(_SWAPPED_BACK, path)
    if hit:
        half = rows // 2
        layer = _fill(_SWAPPED_BACK[hit[0]], hit[1])
        return (Segment(layer, half, 0, half), Segment(layer, 0, half, half))
    hit = _match(_RENAMED_BACK, path)
    if hit:
        return (Segment(_fill(_RENAMED_BACK[hit[0]], hit[1]), 0, 0, rows),)
    return None


def _us(path: str) -> str:
    return path.replace(".", "_")


BFL_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "transformer.", "base_model.model.", "")
DIFFUSERS_PREFIXES = ("transformer.", "")


def file_spellings(layers: Dict[str, Tuple[int, int]]) -> Iterator[Tuple[str, Span]]:
    """(name, span) of every layer name a file may use, for canonical layers
    {name: (rows, input width)}."""
    for layer, (rows, width) in layers.items():
        whole = (Segment(layer, 0, 0, rows),)
        names = [p + layer for p in BFL_PREFIXES] + ["lora_unet_" + _us(layer),
                                                     "lycoris_" + _us(layer)]
        for name in names:
            yield name, whole
        for d, span in _diffusers_names(layer, rows, width):
            for name in [p + d for p in DIFFUSERS_PREFIXES] + [
                    "lora_transformer_" + _us(d), "lycoris_" + _us(d), "lora_unet_" + _us(d)]:
                yield name, span
        for x, span in _xlabs_names(layer, rows, width):
            for prefix in ("", "diffusion_model."):
                yield prefix + x, span


def _diffusers_names(layer: str, rows: int, width: int) -> Iterator[Tuple[str, Span]]:
    hit = _match(FUSED, layer)
    if hit:
        start = 0
        for part, n in zip(FUSED[hit[0]], part_rows(layer, rows, width)):
            yield _fill(part, hit[1]), (Segment(layer, start, 0, n),)
            start += n
        return
    hit = _match(SWAPPED, layer)
    if hit:
        half = rows // 2
        yield _fill(SWAPPED[hit[0]], hit[1]), (Segment(layer, half, 0, half),
                                              Segment(layer, 0, half, half))
        return
    hit = _match(RENAMED, layer)
    if hit:
        yield _fill(RENAMED[hit[0]], hit[1]), (Segment(layer, 0, 0, rows),)


def _xlabs_names(layer: str, rows: int, width: int) -> Iterator[Tuple[str, Span]]:
    for x, canonical in XLABS.items():
        m = _pattern(canonical).match(layer)
        if m:
            held = 3 * width if canonical == XLABS_QKV_ONLY else rows
            yield _fill(x, m.group(1)), (Segment(layer, 0, 0, held),)
