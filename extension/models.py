"""Checkpoints for the standalone host, loaded fully offline.

- a diffusers folder (model_index.json): `from_pretrained(local_files_only=True)`;
- a single-file .safetensors: not yet (it needs shipped component configs; see the issue);
- nothing: the default model. Until the embedded demo model exists, a tiny SD1-architecture
  pipeline with fixed random weights (seed 0): it draws noise, but every path runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .tokenizer import clip_tokenizer

TINY_NAME = "netweave-tiny"


@dataclass
class Model:
    pipe: object  # a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline
    arch: str  # sd1, sd2, sdxl
    name: str

    @property
    def vae_scale(self) -> int:
        return getattr(self.pipe, "vae_scale_factor", 8)

    def trees(self) -> dict:
        trees = {"unet": self.pipe.unet, "te1": self.pipe.text_encoder}
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            trees["te2"] = self.pipe.text_encoder_2
        return trees


def load_model(checkpoint: Optional[str] = None) -> Model:
    if checkpoint is None:
        return tiny_model()
    if os.path.isdir(checkpoint):
        return _from_folder(checkpoint)
    if checkpoint.endswith(".safetensors") and os.path.isfile(checkpoint):
        raise ValueError(f"{checkpoint}: single-file checkpoints are not read yet; give a "
                         "diffusers folder (model_index.json)")
    raise ValueError(f"{checkpoint}: not a diffusers folder (model_index.json)")


def tiny_model(seed: int = 0) -> Model:
    """SD1's architecture at toy size: CLIP text encoder with the real 49408-token vocabulary,
    a 3-level cross-attention UNet, an 8× VAE; deterministic random weights."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
        layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=77, projection_dim=32,
                                        bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=49407))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085,
                                       beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, "sd1", TINY_NAME)


def tiny_library(model: Model, root: Optional[str] = None) -> Tuple[str, str]:
    """Networks for the tiny default model, so that every kind of tag runs on a fresh
    machine: `demo_style` (LoRA), `demo_texture` (LoHa) and the checkpoint `demo_blend` for
    `<model:…>`, written once (deterministic) under `root`. Returns (lora folder, model folder)."""
    from ..network.synthetic import write_network

    root = root or os.path.join(os.path.expanduser("~"), ".cache", "netweave", TINY_NAME)
    loras, models = os.path.join(root, "loras"), os.path.join(root, "models")
    os.makedirs(loras, exist_ok=True)
    os.makedirs(models, exist_ok=True)
    trees = model.trees()
    spatial = lambda t: "time_embedding" not in t.name  # noqa: E731  (no grid: not regional)
    for name, fmt, seed in (("demo_style", "lora", 1), ("demo_texture", "loha", 2)):
        path = os.path.join(loras, name + ".safetensors")
        if not os.path.exists(path):
            write_network(path + ".tmp", trees, fmt, "kohya", "sd1", seed=seed, scale=0.3,
                          select=spatial, dtype=torch.float32)
            os.replace(path + ".tmp", path)
    blend = os.path.join(models, "demo_blend")
    weights = os.path.join(blend, "unet", "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        from safetensors.torch import save_file
        gen = torch.Generator().manual_seed(3)
        state = {k: (v + torch.randn(v.shape, generator=gen) * 0.05).contiguous()
                 for k, v in model.pipe.unet.state_dict().items()}
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        save_file(state, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
    return loras, models


def _arch_of_folder(folder: str) -> str:
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    if "text_encoder_2" in index:
        return "sdxl"
    with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as f:
        unet = json.load(f)
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def _from_folder(folder: str) -> Model:
    from diffusers import DiffusionPipeline

    arch = _arch_of_folder(folder)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True,
                                             safety_checker=None, requires_safety_checker=False) \
        if arch != "sdxl" else DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, arch, os.path.basename(os.path.normpath(folder)))
