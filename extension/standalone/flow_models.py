"""Checkpoints of flow-matching transformers for the standalone host, loaded fully offline.

- a diffusers folder whose model_index.json names one of the pipelines of
  extension/flow_families.py (Flux, Chroma, Z-Image, Qwen-Image, SD3/3.5, Wan 2.2 with one or
  two experts);
- a single-file transformer of Z-Image, Qwen-Image, SD3/3.5 or Wan (one expert) in its original
  layout, read by diffusers' single-file converter with the config of the `components`
  folder's transformer;
- a single-file transformer in the original (BFL) layout, optionally under
  `model.diffusion_model.`, as Flux.1 dev/schnell and Chroma are published: diffusers'
  `from_single_file` with a config written here from the published hyper-parameters
  (docs/design.md §5 "The Flux family"; the classes' defaults are those models'),
  the block counts, input widths and guidance layer taken from the file. Such a file holds no
  text encoders, tokenizers or VAE, and none can be downloaded here, so they come from a
  diffusers folder of the same family (`components`);
- `demo-flux`: the embedded Flux-architecture demo (demo/README.md).

Why not our own converter for other widths: diffusers' converter assumes the published width
(3072, heads of 128); a model of another width is run from its diffusers folder instead.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch

from ..flow_families import PIPELINES
from .models import DEMO_ROOT, Model

FLOW_PIPELINES = PIPELINES  # pipeline class name → NetWeave's architecture
DEMO_FLUX_NAME = "demo-flux"
WIDTH, HEAD = 3072, 128  # the published transformer width and head size (diffusers assumes them)
PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# What each tokenizer folder is, for the message when one is missing (they cannot be downloaded)
TOKENIZERS = {("flux", "tokenizer"): "CLIP-L's tokenizer (vocab.json, merges.txt)",
              ("flux", "tokenizer_2"): "T5-XXL's tokenizer (spiece.model or tokenizer.json)",
              ("chroma", "tokenizer"): "T5-XXL's tokenizer (spiece.model or tokenizer.json)",
              ("zimage", "tokenizer"): "Qwen3's tokenizer (tokenizer.json, with its chat template)",
              ("qwenimage", "tokenizer"): "Qwen2.5-VL's tokenizer (vocab.json, merges.txt)",
              ("sd3", "tokenizer"): "CLIP-L's tokenizer (vocab.json, merges.txt)",
              ("sd3", "tokenizer_2"): "CLIP-G's tokenizer (vocab.json, merges.txt)",
              ("sd3", "tokenizer_3"): "T5-XXL's tokenizer (spiece.model or tokenizer.json)",
              ("wan22", "tokenizer"): "umT5-XXL's tokenizer (spiece.model or tokenizer.json)"}


def flow_folder(folder: str, arch: str, dtype: torch.dtype = torch.float32) -> Model:
    """A diffusers folder of a flow family's pipeline; every component must be there."""
    from diffusers import DiffusionPipeline

    check_components(folder, arch)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, arch, os.path.basename(os.path.normpath(folder)))


def check_components(folder: str, arch: str) -> Dict[str, list]:
    """model_index.json's components, each present in `folder`; a ValueError naming the first
    one missing (a tokenizer by what it is), since nothing can be fetched from a hub here."""
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    parts = {k: v for k, v in index.items()
             if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}
    for name in parts:
        path = os.path.join(folder, name)
        files = os.listdir(path) if os.path.isdir(path) else []
        if name.startswith("tokenizer"):
            if not any(f in files for f in ("tokenizer.json", "spiece.model", "vocab.json")):
                what = TOKENIZERS.get((arch, name), "its tokenizer")
                raise ValueError(f"{folder}: {name}/ ({what}) is missing; it cannot be "
                                 "downloaded here: copy it from the model's repository")
        elif not files:
            raise ValueError(f"{folder}: {name}/ is missing; a {index.get('_class_name')} "
                             f"needs every component of its model_index.json")
    return parts


# ---- single-file transformers ------------------------------------------------------------
def file_shapes(path: str) -> Dict[str, tuple]:
    """Each tensor's shape by its BFL name (a `model.diffusion_model.` prefix taken off)."""
    from ...network.files import open_safetensors

    with open_safetensors(path) as f:
        return {unprefixed(k): tuple(f.shape(k)) for k in f.keys()}


def unprefixed(key: str) -> str:
    """A tensor's name with a `model.diffusion_model.` or `diffusion_model.` prefix taken off."""
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def transformer_config(shapes: Dict[str, tuple], arch: str, where: str) -> Dict[str, object]:
    """The diffusers config of a BFL-layout transformer: the published Flux.1 / Chroma config
    (the classes' defaults) with the block counts, input widths and guidance layer its tensors
    say; ValueError for a width diffusers' converter cannot read."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

    if "img_in.weight" not in shapes or "txt_in.weight" not in shapes:
        raise ValueError(f"{where}: no img_in/txt_in weights: not a Flux-family transformer in "
                         "the original (BFL) layout; a diffusers transformer is read from its "
                         "pipeline folder")
    width, in_channels = shapes["img_in.weight"]
    head = shapes.get("double_blocks.0.img_attn.norm.query_norm.scale", (0,))[0]
    mlp = shapes.get("double_blocks.0.img_mlp.0.weight", (0,))[0]
    if (width, head, mlp) != (WIDTH, HEAD, 4 * WIDTH):
        raise ValueError(
            f"{where}: a {arch} transformer {width} wide with heads of {head} and an MLP of "
            f"{mlp}; single files are read at the published width ({WIDTH}, heads of {HEAD}, "
            f"MLP {4 * WIDTH}: Flux.1 dev/schnell, Chroma), which diffusers' converter "
            "assumes; save this model as a diffusers folder instead")
    config = dict(in_channels=in_channels, num_layers=count("double_blocks."),
                  num_single_layers=count("single_blocks."),
                  joint_attention_dim=shapes["txt_in.weight"][1])
    if arch == "flux":
        config.update(guidance_embeds="guidance_in.in_layer.weight" in shapes,
                      pooled_projection_dim=shapes.get("vector_in.in_layer.weight",
                                                       (0, 768))[1])
    elif "distilled_guidance_layer.in_proj.weight" in shapes:
        rows, cols = shapes["distilled_guidance_layer.in_proj.weight"]
        config.update(approximator_num_channels=cols, approximator_hidden_dim=rows,
                      approximator_layers=count("distilled_guidance_layer.layers."))
    return config


def config_folder(arch: str, config: Dict[str, object]) -> str:
    """A folder with transformer/config.json for `from_single_file` (written once per
    config)."""
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    cls = FluxTransformer2DModel if arch == "flux" else ChromaTransformer2DModel
    key = "-".join(f"{v}" for _, v in sorted(config.items()))
    folder = os.path.join(tempfile.gettempdir(), f"netweave-{arch}-{key}")
    target = os.path.join(folder, "transformer")
    if not os.path.exists(os.path.join(target, "config.json")):
        with torch.device("meta"):  # the config only: no memory for the weights
            model = cls(**config)
        tmp = tempfile.mkdtemp(prefix="netweave-config-", dir=tempfile.gettempdir())
        model.save_config(tmp)
        os.makedirs(folder, exist_ok=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


ENCODERS = {"flux": "CLIP-L and T5-XXL", "chroma": "T5-XXL", "zimage": "Qwen3",
            "qwenimage": "Qwen2.5-VL", "sd3": "CLIP-L, CLIP-G and T5-XXL", "wan22": "umT5-XXL"}


def flow_single_file(path: str, arch: str, components: Optional[str],
                     dtype: torch.dtype = torch.float32) -> Model:
    """A single-file transformer of a flow family with the rest of its pipeline from the
    diffusers folder `components` (whose own transformer is not loaded). Flux/Chroma: the
    config written from the published one and the file's shapes; the other families: the
    components folder's own transformer config (the file must be that model's size), read by
    diffusers' single-file converter for the class (Qwen-Image's, which takes the names as
    they are, gets them without ComfyUI's prefix); a file that leaves some of the transformer's
    tensors unloaded, or an SD3 file of another layout than the folder's, is a ValueError."""
    import diffusers

    from ...network.blocks import ARCH_TITLES
    family = ARCH_TITLES[arch]
    if components is None:
        raise ValueError(
            f"{path} holds a {family} transformer only: its text encoders ({ENCODERS[arch]}), "
            "their tokenizers and the VAE are not in it and cannot be downloaded here; give a "
            f"{family} diffusers folder for them with --components FOLDER")
    if not os.path.isfile(os.path.join(components, "model_index.json")):
        raise ValueError(f"--components {components}: not a diffusers folder (no "
                         "model_index.json)")
    from .models import _arch_of_folder
    if _arch_of_folder(components) != arch:
        raise ValueError(f"--components {components}: not a {family} pipeline folder")
    parts = check_components(components, arch)
    if "transformer_2" in parts:
        raise ValueError(f"--components {components}: a model of two experts (Wan 2.2 A14B), "
                         "published as two files; run its diffusers folder")
    cls = getattr(diffusers, parts["transformer"][1])
    if arch in ("flux", "chroma"):
        config = config_folder(arch, transformer_config(file_shapes(path), arch, path))
    else:
        if arch == "sd3":
            check_sd3_layout(path, components)
        config = components
    try:
        transformer = cls.from_single_file(file_weights(path) if arch == "qwenimage" else path,
                                           config=config, subfolder="transformer",
                                           local_files_only=True, dtype=dtype)
    except NotImplementedError as exc:  # a tensor the converted file lacks is left on "meta"
        if "meta tensor" not in str(exc):
            raise
        raise ValueError(f"{path}: it lacks weights of the {family} transformer of --components "
                         f"{components}: not a {family} transformer in its published layout, "
                         "or not that model's size; run a diffusers folder of it "
                         "instead") from None
    with open(os.path.join(components, "model_index.json"), encoding="utf-8") as f:
        pipeline = getattr(diffusers, json.load(f)["_class_name"])
    pipe = pipeline.from_pretrained(components, transformer=transformer, local_files_only=True,
                                    dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, arch, os.path.splitext(os.path.basename(path))[0])


def sd3_layout(shapes: Dict[str, tuple]) -> Tuple[int, int, bool, Tuple[int, ...]]:
    """(blocks, width, qk norms, blocks with a second image attention) of an SD3-family
    transformer in the original names (SD3 Medium: no qk norms, no second attention; SD3.5
    Large: qk norms; SD3.5 Medium: both)."""
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")}
    width = shapes.get("joint_blocks.0.x_block.attn.qkv.weight", (0, 0))[1]
    dual = sorted({int(k.split(".")[1]) for k in shapes
                   if k.startswith("joint_blocks.") and ".x_block.attn2." in k})
    return len(blocks), width, any(".ln_q." in k for k in shapes), tuple(dual)


def _describe_sd3(layout: Tuple[int, int, bool, Tuple[int, ...]]) -> str:
    blocks, width, qk, dual = layout
    second = f"a second image attention in blocks {list(dual)}" if dual else \
        "no second image attention"
    return f"{blocks} blocks {width} wide, {'' if qk else 'no '}qk norms, {second}"


def check_sd3_layout(path: str, components: str) -> None:
    """SD3 Medium, SD3.5 Medium and SD3.5 Large share their text encoders and VAE, so any
    SD3 folder looks like components for any SD3 file; but the transformer is built from
    the folder's config: a file of another layout (size, qk norms, second attention) is a
    ValueError naming both (diffusers would fail on a shape, or drop the norms unsaid)."""
    with open(os.path.join(components, "transformer", "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    theirs = (config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"],
              config.get("qk_norm") is not None, tuple(config.get("dual_attention_layers") or ()))
    mine = sd3_layout(file_shapes(path))
    if mine != theirs:
        raise ValueError(f"{path}: its SD3 transformer has {_describe_sd3(mine)}; that of "
                         f"--components {components} has {_describe_sd3(theirs)}: give the "
                         "diffusers folder of the file's own model (SD3 Medium, SD3.5 Medium "
                         "or Large) for its components")


def file_weights(path: str) -> Dict[str, torch.Tensor]:
    """A single file's tensors with a `model.diffusion_model.` prefix taken off: diffusers'
    Qwen-Image converter takes the names as they are, and ComfyUI saves them under it."""
    from safetensors.torch import load_file

    return {unprefixed(k): v for k, v in load_file(path).items()}


# ---- the embedded Flux demo ------------------------------------------------------------
def demo_flux_model(root: str = DEMO_ROOT) -> Model:
    """The embedded Flux-architecture demo (demo/README.md): its transformer and T5 encoder,
    with the SD demo's VAE and CLIP text encoder (fp16 files, run in fp32). Its T5 tokenizer
    is built here (lower-casing, as CLIP's does; saved and read back, transformers 5 rebuilds
    a Unigram tokenizer from its vocabulary alone and would lose that)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextModel, T5EncoderModel

    from ...demo.train_flux import CFG, FLUX_NAME, T5_LENGTH, WORDS
    from ..tokenizer import clip_tokenizer, t5_tokenizer
    from .models import DEMO_NAME

    folder, base = os.path.join(root, FLUX_NAME), os.path.join(root, DEMO_NAME)
    if not os.path.isdir(os.path.join(folder, "transformer")):
        raise FileNotFoundError(f"the Flux demo model is missing from {folder}; remake it "
                                "with `python -m netweave.demo.train --stages flux_base`")
    kw = dict(dtype=torch.float32, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(os.path.join(base, "vae"), **kw)
    vae.register_to_config(shift_factor=0.0)  # an SD VAE: FluxPipeline adds the shift back
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler")),
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"), **kw),
        tokenizer=clip_tokenizer(),
        text_encoder_2=T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder_2"), **kw),
        tokenizer_2=t5_tokenizer(WORDS, T5_LENGTH),
        transformer=FluxTransformer2DModel.from_pretrained(os.path.join(folder, "transformer"), **kw))
    pipe.default_sample_size = vae.config.sample_size // pipe.vae_scale_factor  # 64 px
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe, "flux", DEMO_FLUX_NAME, cfg=CFG)


def demo_flux_library(root: str = DEMO_ROOT) -> str:
    """The Flux demo's network folder: flux_sunset (kohya), flux_stripes (diffusers/PEFT)."""
    from ...demo.train_flux import FLUX_LORAS
    return os.path.join(root, FLUX_LORAS)
