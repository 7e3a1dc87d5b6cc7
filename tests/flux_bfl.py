"""Flux in the original (BFL) layout, as Forge's and Forge Neo's `backend/nn/flux.py` and
ComfyUI hold it: fused `img_attn.qkv` / `txt_attn.qkv`, single blocks with one `linear1`
(q, k, v and the MLP input) and one `linear2`, `final_layer.adaLN_modulation.1` with shift
before scale. No registry package ships this tree, so it is written here from the published
layer layout (docs/design.md §5), module for module, with the forward the BFL code runs.

`from_diffusers` builds it with the weights of a diffusers `FluxTransformer2DModel` (or
Chroma's trunk), converted by `bfl_state_dict`; tests check the conversion against diffusers'
own single-file converter and the two forwards against each other.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos, dim, theta):
    scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    omega = 1.0 / theta ** scale
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def apply_rope(xq, xk, freqs):
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs[..., 0] * xq_[..., 0] + freqs[..., 1] * xq_[..., 1]
    xk_out = freqs[..., 0] * xk_[..., 0] + freqs[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.permute(0, 2, 1, 3).flatten(2)


class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids):
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta)
                         for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


def split_heads(qkv, heads):
    """B L (K H D) -> K B H L D"""
    b, length, _ = qkv.shape
    return qkv.reshape(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return out[:3], (out[3:] if self.multiplier == 6 else None)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        mlp = int(hidden * mlp_ratio)
        self.num_heads = heads
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden, double=True))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(hidden, heads))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", nn.Sequential(nn.Linear(hidden, mlp, bias=True),
                                                       nn.GELU(approximate="tanh"),
                                                       nn.Linear(mlp, hidden, bias=True)))

    def forward(self, img, txt, vec, pe):
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        qkv = {}
        for side, x, mod in (("img", img, img_mod1), ("txt", txt, txt_mod1)):
            attn = getattr(self, f"{side}_attn")
            modulated = (1 + mod[1]) * getattr(self, f"{side}_norm1")(x) + mod[0]
            q, k, v = split_heads(attn.qkv(modulated), self.num_heads)
            q, k = attn.norm(q, k, v)
            qkv[side] = (q, k, v)
        q, k, v = (torch.cat((qkv["txt"][i], qkv["img"][i]), dim=2) for i in range(3))
        out = attention(q, k, v, pe)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]
        img = img + img_mod1[2] * self.img_attn.proj(img_out)
        img = img + img_mod2[2] * self.img_mlp((1 + img_mod2[1]) * self.img_norm2(img) + img_mod2[0])
        txt = txt + txt_mod1[2] * self.txt_attn.proj(txt_out)
        txt = txt + txt_mod2[2] * self.txt_mlp((1 + txt_mod2[1]) * self.txt_norm2(txt) + txt_mod2[0])
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.hidden, self.num_heads = hidden, heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe):
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod[1]) * self.pre_norm(x) + mod[0]
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), 2))
        return x + mod[2] * out


class LastLayer(nn.Module):
    def __init__(self, hidden, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


class Flux(nn.Module):
    """BFL's Flux: img_in, time_in, [guidance_in], vector_in, txt_in, double_blocks,
    single_blocks, final_layer."""

    def __init__(self, in_channels, hidden, heads, depth, depth_single, context_dim, vec_dim,
                 axes_dim, guidance_embed, mlp_ratio=4.0, theta=10000):
        super().__init__()
        self.hidden = hidden
        self.pe_embedder = EmbedND(hidden // heads, theta, list(axes_dim))
        self.img_in = nn.Linear(in_channels, hidden, bias=True)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(vec_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, heads, mlp_ratio)
                                           for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, heads, mlp_ratio)
                                           for _ in range(depth_single))
        self.final_layer = LastLayer(hidden, in_channels)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if isinstance(self.guidance_in, MLPEmbedder):
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def bfl_state_dict(diffusers_sd, num_double, num_single):
    """A diffusers Flux state dict in BFL names (fused q, k, v; swapped final modulation)."""
    sd, d = {}, dict(diffusers_sd)

    def take(name):
        return d.pop(name)

    renames = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
               "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    for src, dst in renames.items():
        for p in ("weight", "bias"):
            if f"{src}.{p}" in d:
                sd[f"{dst}.{p}"] = take(f"{src}.{p}")
    for p in ("weight", "bias"):
        scale, shift = take(f"norm_out.linear.{p}").chunk(2)
        sd[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    for i in range(num_double):
        s, t = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            sd[t + f"img_attn.qkv.{p}"] = torch.cat([take(s + f"attn.to_{x}.{p}") for x in "qkv"])
            sd[t + f"txt_attn.qkv.{p}"] = torch.cat([take(s + f"attn.add_{x}_proj.{p}") for x in "qkv"])
            for a, b in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                         ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
                sd[t + f"{b}.{p}"] = take(s + f"{a}.{p}")
        for a, b in (("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                     ("attn.norm_added_q", "txt_attn.norm.query_norm"),
                     ("attn.norm_added_k", "txt_attn.norm.key_norm")):
            sd[t + f"{b}.scale"] = take(s + f"{a}.weight")
    for i in range(num_single):
        s, t = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            sd[t + f"linear1.{p}"] = torch.cat([take(s + f"attn.to_{x}.{p}") for x in "qkv"]
                                               + [take(s + f"proj_mlp.{p}")])
            sd[t + f"linear2.{p}"] = take(s + f"proj_out.{p}")
            sd[t + f"modulation.lin.{p}"] = take(s + f"norm.linear.{p}")
        sd[t + "norm.query_norm.scale"] = take(s + "attn.norm_q.weight")
        sd[t + "norm.key_norm.scale"] = take(s + "attn.norm_k.weight")
    assert not d, f"unconverted: {sorted(d)}"
    return sd


def from_diffusers(model):
    """The BFL tree with a diffusers FluxTransformer2DModel's weights."""
    c = model.config
    hidden = c.num_attention_heads * c.attention_head_dim
    bfl = Flux(c.in_channels, hidden, c.num_attention_heads, c.num_layers, c.num_single_layers,
               c.joint_attention_dim, c.pooled_projection_dim, c.axes_dims_rope, c.guidance_embeds,
               mlp_ratio=model.transformer_blocks[0].ff.net[0].proj.out_features / hidden)
    bfl.load_state_dict(bfl_state_dict(model.state_dict(), c.num_layers, c.num_single_layers))
    return bfl
