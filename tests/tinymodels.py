"""Tiny Stable Diffusion module trees of each architecture, in both layouts a host may run:
LDM (A1111, Forge: PyPI `stable-diffusion-sdkit`'s `ldm` UNetModel) and diffusers
(SD.Next, standalone: `UNet2DConditionModel`, transformers CLIP). Same shapes in both layouts,
so a key that fits one fits the other.

OpenCLIP (A1111's SD2 and SDXL-G text encoders): the `open_clip` package imports torchvision,
which cannot be installed beside the CPU torch 2.13.0 build this project uses, so
`OpenCLIPText` mirrors open_clip's text tower module for module (names, nn.MultiheadAttention
with a fused in_proj_weight) with torch's own layers.
"""
import torch
from torch import nn

TE1_WIDTH, TE2_WIDTH = 32, 48  # CLIP-L-like and OpenCLIP-like widths
CONTEXT = {"sd1": TE1_WIDTH, "sd2": TE2_WIDTH, "sdxl": TE1_WIDTH + TE2_WIDTH}
LEVELS = (32, 64, 64)


def ldm_unet(arch):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    torch.manual_seed(0)
    attention = (2, 4) if arch == "sdxl" else (1, 2)  # SDXL: no attention at the first level
    return UNetModel(image_size=8, in_channels=4, model_channels=LEVELS[0], out_channels=4,
                     num_res_blocks=2, attention_resolutions=attention, channel_mult=(1, 2, 2),
                     num_head_channels=8, use_spatial_transformer=True, transformer_depth=1,
                     context_dim=CONTEXT[arch], legacy=False,
                     use_linear_in_transformer=arch != "sd1")


def diffusers_unet(arch):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    if arch == "sdxl":
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=TE2_WIDTH + 6 * 8)
    else:
        down = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
        extra = {}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                block_out_channels=LEVELS, layers_per_block=2,
                                down_block_types=down, up_block_types=up,
                                cross_attention_dim=CONTEXT[arch], attention_head_dim=8,
                                use_linear_projection=arch != "sd1", **extra)


def clip_config(width):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=1000, hidden_size=width, intermediate_size=width * 2,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                          projection_dim=width, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def hf_text(width=TE1_WIDTH, projection=False):
    """transformers 5: CLIPTextModel has no `text_model.` level; WithProjection still has it."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(clip_config(width))


class _MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(width, width * 2), nn.GELU(), \
            nn.Linear(width * 2, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _MLP(width)

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualAttentionBlock(width, heads) for _ in range(layers))


class OpenCLIPText(nn.Module):
    """open_clip's CLIP text tower: token_embedding, positional_embedding, transformer.resblocks,
    ln_final, text_projection."""

    def __init__(self, width=TE2_WIDTH, layers=2, heads=4, vocab=1000, context=16):
        super().__init__()
        torch.manual_seed(2)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, width) * 0.01)

    def encode(self, ids):
        """(penultimate layer's hidden states [N, T, W], pooled [N, W]) as SDXL's second text
        encoder gives them: the pooled row is the end token's (the highest id), projected."""
        n, t = ids.shape
        x = (self.token_embedding(ids) + self.positional_embedding[:t]).permute(1, 0, 2)
        causal = torch.full((t, t), float("-inf")).triu(1)
        states = []
        for block in self.transformer.resblocks:
            x = block(x, causal)
            states.append(x.permute(1, 0, 2))
        last = self.ln_final(states[-1])
        return states[-2], last[torch.arange(n), ids.argmax(-1)] @ self.text_projection


class Wrapper(nn.Module):
    """A host's wrapper around a text model (A1111's FrozenCLIPEmbedder keeps it as
    `.transformer`, FrozenOpenCLIPEmbedder as `.model`)."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def ldm_trees(arch):
    """Component roots as an A1111/Forge adapter hands them over."""
    trees = {"unet": ldm_unet(arch)}
    if arch == "sd1":
        trees["te1"] = Wrapper(transformer=hf_text(TE1_WIDTH))
    elif arch == "sd2":
        trees["te1"] = Wrapper(model=OpenCLIPText(TE2_WIDTH))
    else:
        trees["te1"] = Wrapper(transformer=hf_text(TE1_WIDTH))
        trees["te2"] = Wrapper(model=OpenCLIPText(TE2_WIDTH))
    return trees


def diffusers_trees(arch):
    """Component roots as a diffusers pipeline holds them."""
    trees = {"unet": diffusers_unet(arch)}
    if arch == "sd1":
        trees["te1"] = hf_text(TE1_WIDTH)
    elif arch == "sd2":
        trees["te1"] = hf_text(TE2_WIDTH)
    else:
        trees["te1"] = hf_text(TE1_WIDTH)
        trees["te2"] = hf_text(TE2_WIDTH, projection=True)
    return trees


TREES = {"ldm": ldm_trees, "diffusers": diffusers_trees}
ARCHS = ("sd1", "sd2", "sdxl")


# ---- the Flux family ----------------------------------------------------------------------
FLUX_HIDDEN, FLUX_CONTEXT, FLUX_POOLED = 16, 24, TE1_WIDTH  # 2 heads × 8; T5 width; CLIP pooled
FLUX_DOUBLE, FLUX_SINGLE = 2, 2


def flux_transformer(arch="flux"):
    """A tiny FluxTransformer2DModel (guidance-distilled, as Flux.1-dev) or
    ChromaTransformer2DModel; 16 latent channels packed 2×2 → 64 inputs, as the real ones."""
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
    torch.manual_seed(3)
    common = dict(patch_size=1, in_channels=64, num_layers=FLUX_DOUBLE,
                  num_single_layers=FLUX_SINGLE, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=FLUX_CONTEXT, axes_dims_rope=(2, 2, 4))
    if arch == "chroma":
        model = ChromaTransformer2DModel(approximator_num_channels=8, approximator_hidden_dim=16,
                                         approximator_layers=2, **common)
    else:
        model = FluxTransformer2DModel(pooled_projection_dim=FLUX_POOLED, guidance_embeds=True,
                                       **common)
    return no_zero_outputs(model)


def no_zero_outputs(model):
    """A fresh model's zero-initialised output layers would hide every change."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and float(p.abs().max()) == 0.0:
                p.normal_(0, 0.05)
    return model


def t5_text():
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(4)
    return T5EncoderModel(T5Config(vocab_size=100, d_model=FLUX_CONTEXT, d_kv=8, d_ff=32,
                                   num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
                                   is_encoder_decoder=False))


def flux_trees(arch="flux", layout="diffusers"):
    """{"unet": the transformer, "te1": CLIP-L (Flux only), "te2": T5}; layout "bfl" holds the
    transformer in the original layout (tests/flux_bfl.py) with the same weights."""
    model = flux_transformer(arch)
    if layout == "bfl":
        from flux_bfl import from_diffusers
        model = from_diffusers(model)
    trees = {"unet": model, "te2": t5_text()}
    if arch == "flux":
        trees["te1"] = hf_text(TE1_WIDTH)
    return trees
