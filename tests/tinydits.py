"""Tiny configurations of the real diffusers transformers of Z-Image, Qwen-Image, SD3/3.5 (its
three published layouts) and Wan (the classes' code, small widths), and their trees in the
original (ComfyUI) names built from the same weights, written here from the published layouts
(docs/design.md §5)."""
import re

import torch
from torch import nn

from tinymodels import no_zero_outputs

ZIMAGE_DIM, ZIMAGE_CAP = 32, 24  # 2 heads × 16; caption feature width
QWEN_DIM, QWEN_TEXT = 32, 24  # 2 heads × 16; text width
SD3_DIM, SD3_TEXT, SD3_POOLED = 16, 24, 12  # 2 heads × 8


def zimage_transformer():
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(3)
    return no_zero_outputs(ZImageTransformer2DModel(
        in_channels=4, dim=ZIMAGE_DIM, n_layers=2, n_refiner_layers=2, n_heads=2, n_kv_heads=2,
        cap_feat_dim=ZIMAGE_CAP, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]))


def qwen_transformer():
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(3)
    return no_zero_outputs(QwenImageTransformer2DModel(
        in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=QWEN_TEXT, axes_dims_rope=(4, 6, 6)))


# The published SD3 layouts (the config entries that differ): SD3 Medium has no qk norms and
# no second image attention, SD3.5 Large qk RMS norms only, SD3.5 Medium both (attn2 in its
# first 13 blocks: here the first).
SD3_LAYOUTS = {"sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0,)),
               "sd3-medium": dict(qk_norm=None, dual_attention_layers=()),
               "sd3.5-large": dict(qk_norm="rms_norm", dual_attention_layers=())}


def sd3_transformer(layout="sd3.5-medium"):
    """One of SD3_LAYOUTS in small (SD3.5 Medium's by default), with a last block whose text
    stream ends after its qkv."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(3)
    return no_zero_outputs(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=SD3_TEXT,
        caption_projection_dim=SD3_DIM, pooled_projection_dim=SD3_POOLED, pos_embed_max_size=16,
        **SD3_LAYOUTS[layout]))


class Tree(nn.Module):
    """A module tree holding layers at dotted paths (the original names), weights only."""

    def __init__(self, layers):
        super().__init__()
        for path, layer in layers.items():
            parent = self
            *heads, leaf = path.split(".")
            for h in heads:
                if not hasattr(parent, h):
                    parent.add_module(h, nn.Module())
                parent = getattr(parent, h)
            parent.add_module(leaf, layer)


def linear(weight, bias):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def native_tree(model, to_native, extra_children=()):
    """The original tree of a diffusers transformer: `to_native(diffusers path)` gives
    (original path, part index, part count, swapped) — q, k, v fused in that order — or None
    for a layer the original tree holds under the same name."""
    fused, layers = {}, {}
    for path, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or w is None:
            continue
        b = m.bias.detach() if m.bias is not None else None
        hit = to_native(path)
        name, i, n, swapped = hit if hit else (path, 0, 1, False)
        if swapped:
            w, b = torch.cat(w.detach().chunk(2)[::-1]), torch.cat(b.chunk(2)[::-1])
        fused.setdefault(name, [None] * n)[i] = (w.detach(), b)
        layers[name] = m
    out = {}
    for name, parts in fused.items():
        w = torch.cat([p[0] for p in parts])
        b = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        if isinstance(layers[name], nn.Conv2d):
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], bias=b is not None)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            out[name] = conv
        else:
            out[name] = linear(w, b)
    tree = Tree(out)
    for c in extra_children:
        tree.add_module(c, nn.Module())
    return tree


def zimage_to_native(path):
    """ComfyUI's Z-Image names: fused attention.qkv, attention.out, x_embedder, final_layer."""
    m = re.match(r"(.+\.attention)\.to_([qkv])$", path)
    if m:
        return f"{m.group(1)}.qkv", "qkv".index(m.group(2)), 3, False
    m = re.match(r"(.+\.attention)\.to_out\.0$", path)
    if m:
        return f"{m.group(1)}.out", 0, 1, False
    m = re.match(r"all_(x_embedder|final_layer)\.2-1(.*)$", path)
    return (m.group(1) + m.group(2), 0, 1, False) if m else None


def zimage_native(model):
    return native_tree(model, zimage_to_native)


SD3_LAST = 1  # the tiny model's last block, whose text stream ends after its qkv
_SD3_RENAMED = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
                "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1",
                "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
                "ff_context.net.2": "context_block.mlp.fc2", "norm1.linear": "x_block.adaLN_modulation.1",
                "norm1_context.linear": "context_block.adaLN_modulation.1"}
_SD3_TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
            "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}


def sd3_to_native(path):
    """(original path, part, parts, swapped) of a diffusers SD3 layer (ComfyUI's
    mmdit_to_diffusers, read the other way)."""
    if path in _SD3_TOP:
        return _SD3_TOP[path], 0, 1, path == "norm_out.linear"
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", path)
    if not m:
        return None
    head, rest = f"joint_blocks.{m.group(1)}.", m.group(2)
    q = re.match(r"(attn2?\.)(to|add)_([qkv])(_proj)?$", rest)
    if q:
        fused = ("x_block." if q.group(2) == "to" else "context_block.") + q.group(1) + "qkv"
        return head + fused, "qkv".index(q.group(3)), 3, False
    swapped = rest == "norm1_context.linear" and int(m.group(1)) == SD3_LAST
    return head + _SD3_RENAMED[rest], 0, 1, swapped


def sd3_native(model):
    return native_tree(model, sd3_to_native)


WAN_TEXT = 16


def wan_transformer():
    """One Wan 2.2 expert in small (the A14B experts are Wan 2.1 14B transformers)."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(3)
    return no_zero_outputs(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=WAN_TEXT, freq_dim=16, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32))


_WAN_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
_WAN_TOP = {"condition_embedder.text_embedder.linear_1": "text_embedding.0",
            "condition_embedder.text_embedder.linear_2": "text_embedding.2",
            "condition_embedder.time_embedder.linear_1": "time_embedding.0",
            "condition_embedder.time_embedder.linear_2": "time_embedding.2",
            "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head"}


def wan_to_native(path):
    """The original (ComfyUI) names of a diffusers Wan layer (diffusers' single-file
    converter, read the other way)."""
    if path in _WAN_TOP:
        return _WAN_TOP[path], 0, 1, False
    m = re.match(r"blocks\.(\d+)\.(attn[12])\.(to_q|to_k|to_v|to_out\.0)$", path)
    if m:
        kind = "self_attn" if m.group(2) == "attn1" else "cross_attn"
        return f"blocks.{m.group(1)}.{kind}.{_WAN_ATTN[m.group(3)]}", 0, 1, False
    m = re.match(r"blocks\.(\d+)\.ffn\.net\.(0\.proj|2)$", path)
    if m:
        return f"blocks.{m.group(1)}.ffn.{m.group(2)[0]}", 0, 1, False
    return None


def wan_native(model):
    """The original tree (no patch embedder: a 3-D convolution NetWeave leaves alone)."""
    tree = native_tree(model, wan_to_native)
    tree.add_module("patch_embedding", nn.Conv3d(4, 4, (1, 2, 2)))
    return tree
