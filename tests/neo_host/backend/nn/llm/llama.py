"""backend/nn/llm/llama.py (Neo, after ComfyUI's text_encoders/llama.py): the decoder-only text
encoders Neo builds itself. Qwen3_4B (Z-Image's `qwen3`) and Qwen25_7BVLI (Qwen-Image's
`qwen25_7b`) hold the decoder as `model` (Llama2_: embed_tokens, layers.N, norm) — no
`transformer.` wrapper, no lm_head (the loader drops it); Qwen25_7BVLI holds its vision tower
beside it as `visual`. A layer (TransformerBlock): self_attn.{q,k,v,o}_proj (q/k/v biased on
Qwen2.5, q_norm/k_norm RMSNorms over a head on Qwen3), mlp.{gate,up,down}_proj (SiLU-gated),
input_layernorm, post_attention_layernorm. Neo's configs are its real sizes; `Config` here is
small. The forward is this file's own: rotary positions, grouped-query causal attention;
`forward(ids)` returns (last hidden state after `norm`, the hidden state after layer
`intermediate_output`), as Neo's does."""
from dataclasses import dataclass

import torch
from torch import nn

from . import qwen_vl


@dataclass
class Config:
    vocab_size: int = 128
    hidden_size: int = 24
    intermediate_size: int = 40
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    qk_norm: bool = True  # Qwen3's q_norm/k_norm; Qwen2.5 has none


def rotate(x, theta):
    """Rotary embedding of (batch, heads, tokens, head_dim) by token position."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * freq[None]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        width, inner = config.hidden_size, config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(width, inner, bias=config.qkv_bias)
        self.k_proj = nn.Linear(width, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(width, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner, width, bias=False)
        norm = (lambda: nn.RMSNorm(config.head_dim, eps=config.rms_norm_eps)) \
            if config.qk_norm else (lambda: None)
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t, count):
            return t.view(b, n, count, self.head_dim).transpose(1, 2)
        q = heads(self.q_proj(x), self.heads)
        k = heads(self.k_proj(x), self.kv_heads)
        v = heads(self.v_proj(x), self.kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, self.theta), rotate(k, self.theta)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, config, index):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama2_(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TransformerBlock(config, index=i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, ids, intermediate_output=None):
        x = self.embed_tokens(ids)
        if intermediate_output is not None and intermediate_output < 0:
            intermediate_output += len(self.layers)
        intermediate = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == intermediate_output:
                intermediate = x.clone()
        return self.norm(x), intermediate


class BaseLlama:
    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, *args, **kwargs):
        return self.model(input_ids, *args, **kwargs)


class Qwen3_4B(BaseLlama, nn.Module):
    def __init__(self, config=None):
        super().__init__()
        config = config or Config()
        self.num_layers = config.num_hidden_layers
        self.model = Llama2_(config)


class Qwen25_7BVLI(BaseLlama, nn.Module):
    def __init__(self, config=None):
        super().__init__()
        config = config or Config(qkv_bias=True, qk_norm=False)
        self.num_layers = config.num_hidden_layers
        self.model = Llama2_(config)
        self.visual = qwen_vl.Qwen2VLVisionTransformer(output_hidden_size=config.hidden_size)
