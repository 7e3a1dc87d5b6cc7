"""The real SD1, SD2, SDXL, Flux, Chroma, Z-Image, Qwen-Image, SD3.5 and Wan 2.2 module trees,
built on the meta device (shapes, no memory), so a file can be checked layer by layer without
loading any model: `inspect` uses them. Configs are the published ones of SD 1.5, SD 2.1, SDXL
1.0 base, Flux.1-dev, Chroma, Z-Image Turbo, Qwen-Image and Wan 2.2 A14B (diffusers layout; the
classes' defaults are those models'), SD3.5 Large (38 joint blocks of 64 per head;
docs/design.md §5), with CLIP-L, OpenCLIP-G and T5-XXL v1.1, and each newer model's own text
encoder: Z-Image's Qwen3-4B, Qwen-Image's Qwen2.5-VL-7B, SD3.5's T5-XXL, Wan's umT5-XXL."""
from __future__ import annotations

import functools
from typing import Dict

import torch
from torch import nn

UNET = {
    "sd1": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                attention_head_dim=8),
    "sd2": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu")
TEXT = {
    "sd1": {"te1": CLIP_L},
    "sd2": {"te1": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                        num_attention_heads=16, hidden_act="gelu")},
    "sdxl": {"te1": CLIP_L,
             "te2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=20, hidden_act="gelu", projection_dim=1280)},
}


T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
FLUX_TEXT = {"flux": {"te1": CLIP_L, "te2": T5_XXL}, "chroma": {"te2": T5_XXL}}


@functools.lru_cache(maxsize=10)
def reference_trees(arch: str) -> Dict[str, nn.Module]:
    """{"unet", "te1"[, "te2"]} of `arch` on the meta device ("unet": the denoiser)."""
    if arch in FLUX_TEXT:
        return _flux_trees(arch)
    if arch in ("zimage", "qwenimage", "sd3", "sd3-medium", "wan22"):
        return _dit_trees(arch)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        trees = {"unet": UNet2DConditionModel(layers_per_block=2, **UNET[arch])}
        for component, config in TEXT[arch].items():
            cls = CLIPTextModelWithProjection if component == "te2" else CLIPTextModel
            trees[component] = cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                  bos_token_id=49406, eos_token_id=49407,
                                                  **config))
    return trees


def _flux_trees(arch: str) -> Dict[str, nn.Module]:
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        trees = {"unet": FluxTransformer2DModel(guidance_embeds=True) if arch == "flux"
                 else ChromaTransformer2DModel()}
        for component, config in FLUX_TEXT[arch].items():
            if config is T5_XXL:
                trees[component] = T5EncoderModel(T5Config(**config))
            else:
                trees[component] = CLIPTextModel(CLIPTextConfig(
                    vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                    eos_token_id=49407, **config))
    return trees


SD3_LARGE = dict(num_layers=38, attention_head_dim=64, num_attention_heads=38,
                 caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm",
                 sample_size=128, joint_attention_dim=4096, pooled_projection_dim=2048,
                 out_channels=16)
# SD3.5 Medium (MMDiT-X): 24 blocks of 1536, a second image attention in its first 13 blocks.
SD3_MEDIUM = dict(SD3_LARGE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                  pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))
# Sizes of one architecture a file may be for, tried in turn (inspect.py): {arch: trees}.
VARIANTS = {"sd3": ("sd3", "sd3-medium")}


def variants(arch: str):
    """The reference trees' names for an architecture: itself, or each of its sizes."""
    return VARIANTS.get(arch, (arch,))


def _dit_trees(arch: str) -> Dict[str, nn.Module]:
    from diffusers import (QwenImageTransformer2DModel, SD3Transformer2DModel,
                           WanTransformer3DModel, ZImageTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        if arch == "zimage":
            return {"unet": ZImageTransformer2DModel(), "te1": _language_model(arch)}
        if arch == "qwenimage":
            return {"unet": QwenImageTransformer2DModel(), "te1": _language_model(arch)}
        if arch == "wan22":  # one expert of A14B (both have this shape)
            from transformers import UMT5Config, UMT5EncoderModel
            return {"unet": WanTransformer3DModel(),
                    "te1": UMT5EncoderModel(UMT5Config(**UMT5_XXL))}
        trees = {"unet": SD3Transformer2DModel(**(SD3_MEDIUM if arch == "sd3-medium" else SD3_LARGE))}
        for component, config in (("te1", CLIP_L), ("te2", TEXT["sdxl"]["te2"])):
            trees[component] = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                eos_token_id=49407, **{"projection_dim": 768, **config}))
        trees["te3"] = T5EncoderModel(T5Config(**T5_XXL))
    return trees


# The published text encoders of the newer transformers (docs/design.md §5): Wan's umT5-XXL
# (T5-XXL's shapes, a larger vocabulary), Z-Image's Qwen3-4B and Qwen-Image's Qwen2.5-VL-7B.
UMT5_XXL = dict(T5_XXL, vocab_size=256384)
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
QWEN25_VL_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                        out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])


def _language_model(arch: str) -> nn.Module:
    """The text encoder as diffusers' pipelines load it (call on the meta device)."""
    if arch == "zimage":
        from transformers import Qwen3Config, Qwen3ForCausalLM
        return Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=QWEN25_VL_7B, vision_config=QWEN25_VL_VISION))
