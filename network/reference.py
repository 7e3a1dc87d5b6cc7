"""The real SD1, SD2 and SDXL module trees, built on the meta device (shapes, no memory), so
a file can be checked layer by layer without loading any model: `inspect` uses them.
Configs are the published ones of SD 1.5, SD 2.1 and SDXL 1.0 base (diffusers layout)."""
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


@functools.lru_cache(maxsize=3)
def reference_trees(arch: str) -> Dict[str, nn.Module]:
    """{"unet", "te1"[, "te2"]} of `arch` on the meta device."""
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
