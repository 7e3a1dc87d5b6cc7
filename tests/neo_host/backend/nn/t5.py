"""backend/nn/t5.py (Neo, after ComfyUI's T5): the T5 and umT5 encoders Neo builds itself —
Flux's and Chroma's `t5xxl`, Wan's `umt5xxl`. IntegratedT5 holds the encoder as `transformer`
(T5: `shared` embedding, `encoder` = T5Stack: block.N, final_layer_norm) and a `logit_scale`.
A block (T5Block) is `layer.0` (T5LayerSelfAttention: SelfAttention.{q,k,v,o} without bias
and a relative_attention_bias table, layer_norm) and `layer.1` (T5LayerFF: DenseReluDense.
{wi_0, wi_1, wo}, gated GELU, layer_norm). T5 keeps the position bias in block 0 only, umT5
(config model_type "umt5") in every block. transformers' T5EncoderModel has the same paths
inside `transformer`. Small config; the forward is this file's own."""
import torch
from torch import nn


class T5LayerNorm(nn.Module):
    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class T5Attention(nn.Module):
    def __init__(self, width, inner, heads, relative_attention_bias, buckets=8):
        super().__init__()
        self.q = nn.Linear(width, inner, bias=False)
        self.k = nn.Linear(width, inner, bias=False)
        self.v = nn.Linear(width, inner, bias=False)
        self.o = nn.Linear(inner, width, bias=False)
        self.heads, self.buckets = heads, buckets
        self.relative_attention_bias = nn.Embedding(buckets, heads) \
            if relative_attention_bias else None

    def bias(self, n):
        """(1, heads, n, n): each relative offset clipped into the table."""
        offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        bucket = offset.clamp(-(self.buckets // 2), self.buckets // 2 - 1) + self.buckets // 2
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def forward(self, x, past_bias=None):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, self.heads, -1).transpose(1, 2)
        if self.relative_attention_bias is not None:
            past_bias = self.bias(n)
        scores = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) + past_bias
        out = scores.softmax(-1) @ heads(self.v(x))
        return self.o(out.transpose(1, 2).reshape(b, n, -1)), past_bias


class T5LayerSelfAttention(nn.Module):
    def __init__(self, width, inner, heads, relative_attention_bias):
        super().__init__()
        self.SelfAttention = T5Attention(width, inner, heads, relative_attention_bias)
        self.layer_norm = T5LayerNorm(width)

    def forward(self, x, past_bias=None):
        out, past_bias = self.SelfAttention(self.layer_norm(x), past_bias)
        return x + out, past_bias


class T5DenseGatedActDense(nn.Module):
    def __init__(self, width, ff):
        super().__init__()
        self.wi_0 = nn.Linear(width, ff, bias=False)
        self.wi_1 = nn.Linear(width, ff, bias=False)
        self.wo = nn.Linear(ff, width, bias=False)

    def forward(self, x):
        gate = nn.functional.gelu(self.wi_0(x), approximate="tanh")
        return self.wo(gate * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, width, ff):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(width, ff)
        self.layer_norm = T5LayerNorm(width)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, width, ff, heads, relative_attention_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(width, width, heads,
                                                         relative_attention_bias),
                                    T5LayerFF(width, ff)])

    def forward(self, x, past_bias=None):
        x, past_bias = self.layer[0](x, past_bias)
        return self.layer[1](x), past_bias


class T5Stack(nn.Module):
    def __init__(self, layers, width, ff, heads, relative_everywhere):
        super().__init__()
        self.block = nn.ModuleList([T5Block(width, ff, heads, relative_everywhere or i == 0)
                                    for i in range(layers)])
        self.final_layer_norm = T5LayerNorm(width)

    def forward(self, x):
        past_bias = None
        for block in self.block:
            x, past_bias = block(x, past_bias)
        return self.final_layer_norm(x)


class T5(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        width = config["d_model"]
        self.encoder = T5Stack(config["num_layers"], width, config["d_ff"], config["num_heads"],
                               config["model_type"] == "umt5")
        self.shared = nn.Embedding(config["vocab_size"], width)

    def forward(self, input_ids):
        return self.encoder(self.shared(input_ids))


class IntegratedT5(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = T5(config)
        self.logit_scale = nn.Parameter(torch.tensor(4.6055))
