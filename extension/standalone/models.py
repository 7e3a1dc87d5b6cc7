"""Checkpoints for the standalone host, loaded fully offline.

- a diffusers folder (model_index.json): `from_pretrained(local_files_only=True)`;
- a single-file SD1/SDXL .safetensors (A1111's format): diffusers' single-file loader, with a
  config folder written here from the published SD 1.5 / SDXL 1.0 configs (network/reference.py
  and the VAE and scheduler below) and the tokenizer built offline (tokenizer.py);
- a diffusers folder of a flow-matching transformer family (Flux, Chroma, Z-Image, Qwen-Image,
  SD3/3.5, Wan 2.2 with one or two experts: extension/flow_families.py), or a single-file
  Flux/Chroma transformer with a folder for the rest (flow_models.py);
- nothing: the embedded demo (`demo/weights`, trained by `python -m netweave.demo.train`): a
  small SD1-architecture model that draws coloured shapes, with LoRAs whose effects are visible;
  `demo-flux` (DEMO_FLUX_NAME): its small Flux-architecture sibling (flow_models.py).

`tiny_model` is an even smaller SD1-architecture pipeline with fixed random weights (seed 0),
for tests of the mechanics: it draws noise, but every path runs in milliseconds.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..flow_families import FAMILIES, Family
from ..tokenizer import clip_tokenizer

TINY_NAME = "netweave-tiny"
DEMO_NAME = "netweave-demo"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
DEMO_ROOT = os.path.join(ROOT, "demo",
                         "weights")


FLOW_ARCHS = tuple(FAMILIES)  # flow-matching transformers (extension/flow_families.py)


@dataclass
class Model:
    pipe: object  # a diffusers StableDiffusion(XL)Pipeline or a flow family's pipeline
    arch: str  # sd1, sd2, sdxl, or a flow family's (flux, chroma, zimage, qwenimage, sd3, wan22)
    name: str
    cfg: Optional[float] = None  # the CFG field's default, where the model says its own

    @property
    def flow(self) -> bool:
        return self.arch in FLOW_ARCHS

    @property
    def family(self) -> Optional[Family]:
        return FAMILIES.get(self.arch)

    @property
    def vae_factor(self) -> int:
        """Pixels per VAE latent cell (WanPipeline names it vae_scale_factor_spatial)."""
        return int(getattr(self.pipe, "vae_scale_factor", None)
                   or getattr(self.pipe, "vae_scale_factor_spatial", 8))

    @property
    def distilled(self) -> bool:
        """Guidance-distilled (Flux.1 dev): the CFG field is the guidance the transformer
        embeds, and there are no negative rows."""
        return self.arch == "flux" and bool(self.pipe.transformer.config.guidance_embeds)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell, and the step picture sizes come in: a Flux-family latent
        is packed in 2×2 patches, so its pictures go by twice the VAE's factor."""
        return 2 * self.vae_factor if self.flow else self.vae_factor

    @property
    def size(self) -> int:
        """The picture size the model was trained at (512 for SD1, 1024 for SDXL and Flux, 64
        for the demos): a flow pipeline's default_sample_size, else its family's default."""
        if self.flow:
            sample = getattr(self.pipe, "default_sample_size", None)
            return int(sample) * self.vae_factor if sample else self.family.size
        return int(self.pipe.unet.config.sample_size) * self.vae_scale

    def latent(self, height: int, width: int) -> Tuple[int, int]:
        """The VAE latent (h, w) the pipeline samples for a picture (the engine's grid; a
        Flux pipeline rounds a size down to whole 2×2 patches)."""
        if self.flow:
            return (2 * (height // self.vae_scale), 2 * (width // self.vae_scale))
        return (height // self.vae_scale, width // self.vae_scale)

    @property
    def default_cfg(self) -> float:
        """The CFG field's default: the model's own, else its pipeline's for the argument the
        field becomes (Flux dev's guidance 3.5, Chroma's 5, Qwen-Image's true_cfg_scale 4; 1 —
        no negative pass — for a Flux without distilled guidance, as schnell), else A1111's
        7."""
        if self.cfg is not None:
            return self.cfg
        if self.flow:
            import inspect
            name, = self.family.guidance_args(1.0, True, self.distilled)
            return float(inspect.signature(type(self.pipe).__call__).parameters[name].default)
        return 7.0

    def trees(self) -> dict:
        """The engine's components: "unet" is the denoiser (a transformer too: the first
        expert of two); a flow family's text encoders by its table (flow_families.py)."""
        if self.flow:
            return self.family.trees(self.pipe)
        trees = {"unet": self.pipe.unet, "te1": self.pipe.text_encoder}
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            trees["te2"] = self.pipe.text_encoder_2
        return trees


def load_model(checkpoint: Optional[str] = None, components: Optional[str] = None) -> Model:
    """`checkpoint`: a diffusers folder, a single-file .safetensors, `demo-flux`, or None (the
    demo); `components`: for a single-file Flux/Chroma transformer, the diffusers folder its
    VAE, text encoders, tokenizers and scheduler come from."""
    from . import flow_models

    if checkpoint is None:
        return demo_model()
    if checkpoint == flow_models.DEMO_FLUX_NAME and not os.path.exists(checkpoint):
        return flow_models.demo_flux_model()
    if os.path.isdir(checkpoint):
        return _from_folder(checkpoint)
    if checkpoint.endswith(".safetensors") and os.path.isfile(checkpoint):
        return load_single_file(checkpoint, components=components)
    raise ValueError(f"{checkpoint}: neither a .safetensors checkpoint nor a diffusers folder "
                     f"(nor {flow_models.DEMO_FLUX_NAME}, the embedded Flux demo)")


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


def demo_model(root: str = DEMO_ROOT) -> Model:
    """The embedded demo model (fp16 files, run in fp32)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel

    folder = os.path.join(root, DEMO_NAME)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the demo model is missing from {folder}; "
                                "remake it with `python -m netweave.demo.train`")
    part = lambda name: os.path.join(folder, name)  # noqa: E731
    kw = dict(torch_dtype=torch.float32, local_files_only=True)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(part("vae"), **kw),
        text_encoder=CLIPTextModel.from_pretrained(part("text_encoder"), **kw),
        tokenizer=clip_tokenizer(), unet=UNet2DConditionModel.from_pretrained(part("unet"), **kw),
        scheduler=EulerDiscreteScheduler.from_pretrained(part("scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, "sd1", DEMO_NAME)


def demo_library(root: str = DEMO_ROOT) -> Tuple[str, str]:
    """The demo's (lora folder, model folder): demo_sunset, demo_stripes, demo_boxy and
    the checkpoint demo_pastel."""
    return os.path.join(root, "loras"), os.path.join(root, "models")


def tiny_library(model: Model, root: Optional[str] = None) -> Tuple[str, str]:
    """Networks for the tiny random model, so that tests run every kind of tag in
    milliseconds: `demo_style` (LoRA), `demo_texture` (LoHa) and the checkpoint `demo_blend`
    for `<model:…>`, written once (deterministic) under `root`. Returns (lora folder, model
    folder)."""
    from ...devtools.synthetic import write_network

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
    from .flow_models import FLOW_PIPELINES

    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    kind = index.get("_class_name")
    if kind in FLOW_PIPELINES:
        return FLOW_PIPELINES[kind]
    if kind not in (None, "StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ValueError(f"{folder}: a {kind}; NetWeave runs StableDiffusionPipeline, "
                         "StableDiffusionXLPipeline, " + ", ".join(FLOW_PIPELINES))
    if "text_encoder_2" in index:
        return "sdxl"
    with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as f:
        unet = json.load(f)
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def _from_folder(folder: str) -> Model:
    from diffusers import DiffusionPipeline

    arch = _arch_of_folder(folder)
    if arch in FLOW_ARCHS:
        from .flow_models import flow_folder
        return flow_folder(folder, arch)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True,
                                             safety_checker=None, requires_safety_checker=False) \
        if arch != "sdxl" else DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, arch, os.path.basename(os.path.normpath(folder)))


# The published VAE and scheduler settings of SD 1.5 and SDXL 1.0 base (diffusers layout).
VAE = {"sd1": dict(sample_size=512, scaling_factor=0.18215),
       "sdxl": dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True)}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")


def load_single_file(path: str, config: Optional[str] = None, arch: Optional[str] = None,
                     components: Optional[str] = None) -> Model:
    """An A1111-format checkpoint; `config`: a diffusers config folder (default: the published
    one of the detected architecture, written by `reference_config`). A Flux or Chroma
    transformer file takes the rest of its pipeline from the diffusers folder `components`
    (flow_models.py)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from ...network.detect import detect_architecture
    from ...network.files import base_architecture, open_safetensors

    if arch is None:
        with open_safetensors(path) as f:
            arch, reasons = detect_architecture(f.keys(), f.shape, base_architecture(f.metadata))
        if arch in FLOW_ARCHS:
            from .flow_models import flow_single_file
            return flow_single_file(path, arch, components)
        if arch not in ("sd1", "sdxl"):
            raise ValueError(f"{path}: single-file checkpoints are read for SD1, SDXL and the "
                             "transformers of flow_families.py; this one is "
                             f"{arch or 'not recognised'} "
                             f"({'; '.join(reasons) or 'no signal'})")
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    extra = {} if arch == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_single_file(path, config=config or reference_config(arch),
                                local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, arch, os.path.splitext(os.path.basename(path))[0])


def reference_config(arch: str) -> str:
    """A diffusers config folder (no weights) for SD 1.5 or SDXL 1.0, written once."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from ...network.reference import TEXT, UNET

    folder = os.path.join(tempfile.gettempdir(), f"netweave-{arch}-config")
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    with torch.device("meta"):
        unet = UNet2DConditionModel(layers_per_block=2, sample_size=VAE[arch]["sample_size"] // 8,
                                    **UNET[arch])
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                            **VAE[arch])
    texts = {("text_encoder" if c == "te1" else "text_encoder_2"):
             CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=1 if c == "te1" else 0, **cfg)
             for c, cfg in TEXT[arch].items()}
    write_config_folder(folder, arch, unet, vae, texts, EulerDiscreteScheduler(**SCHEDULER))
    return folder


def write_config_folder(folder: str, arch: str, unet, vae, texts: dict, scheduler) -> str:
    """model_index.json and every component's config (and tokenizer files): what diffusers'
    single-file loader reads instead of asking the hub."""
    xl = arch == "sdxl"
    tmp = tempfile.mkdtemp(prefix="netweave-config-", dir=os.path.dirname(folder) or None)
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", type(scheduler).__name__],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    if xl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None],
                     requires_safety_checker=False)
    with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
    unet.save_config(os.path.join(tmp, "unet"))
    vae.save_config(os.path.join(tmp, "vae"))
    scheduler.save_config(os.path.join(tmp, "scheduler"))
    for name, config in texts.items():
        config.architectures = ["CLIPTextModelWithProjection" if name.endswith("_2") else "CLIPTextModel"]
        config.save_pretrained(os.path.join(tmp, name))
    clip_tokenizer().save_pretrained(os.path.join(tmp, "tokenizer"))
    if xl:
        clip_tokenizer("!").save_pretrained(os.path.join(tmp, "tokenizer_2"))
    if os.path.exists(folder):  # another process wrote it first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)
    return folder
