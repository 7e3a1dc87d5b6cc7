"""The Flux-architecture demo's stages of `python -m netweave.demo.train` (demo/README.md):

- `flux_base`: a small diffusers FluxTransformer2DModel and a tiny T5 encoder trained together
  by flow matching on the same pictures, through the SD demo's VAE (4 latent channels, packed
  2×2 into 16 inputs) with the SD demo's CLIP text encoder (frozen) for the pooled vector;
  10 % empty captions for CFG, EMA;
- networks on the frozen base, as the SD demo's are trained (NetWeave's own `lora.bypass`):
  `flux_sunset` (kohya sd-scripts' Flux format: BFL layer names, fused q/k/v and linear1, for
  `region=`: trained with its change masked on the image tokens as NetWeave masks a regional
  network), `flux_stripes` (diffusers/PEFT format: `transformer.…lora_A/lora_B`, every
  attention and MLP layer of the double and single blocks).

Why not guidance-distilled (Flux.1 dev): distilling guidance needs a model that does CFG
first and a second training on its guided outputs, twice the budget; this one runs true CFG
(FluxPipeline's negative pass, whose rows `neg=` acts on) as schnell-sized Flux models without
a guidance embedding do, on the same 10 % empty captions the SD demo learnt CFG from.
"""
from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..extension.tokenizer import t5_tokenizer
from ..network.algorithms import lora
from ..network.flux_keys import Tokens, host_layers, tokens_of
from ..network.keymap import patchable
from . import shapes

FLUX_NAME = "netweave-demo-flux"
FLUX_LORAS = "flux-loras"  # apart from the SD demo's networks: each folder fits its own model
T5_LENGTH = 16  # tokens per caption ("an orange triangle on a white background" is 8)
WORDS = ("a", "an", "on", "background", *shapes.COLOURS, *shapes.SHAPES)
SHIFT = dict(base_image_seq_len=64, max_image_seq_len=1024, base_shift=0.5, max_shift=1.15)
CFG = 4.0  # the demo's default CFG scale (true CFG: a negative pass)
SEQ = (shapes.SIZE // 8) ** 2  # packed 2×2 patches of the 16 × 16 latent


@dataclass(frozen=True)
class FluxNetworkSpec:
    style: str
    format: str  # "kohya" (BFL names, fused) or "peft" (diffusers names, lora_A/lora_B)
    rank: int
    regional: bool  # image-stream and joint layers, change masked on the image tokens
    lr: float


FLUX_NETWORKS = {
    "flux_sunset": FluxNetworkSpec("sunset", "kohya", 8, True, 2e-3),
    "flux_stripes": FluxNetworkSpec("stripes", "peft", 8, False, 2e-3),
}
# stage: (steps, batch), after the SD demo's stages
FLUX_STAGES = {"flux_base": (2000, 32), "flux_sunset": (250, 16), "flux_stripes": (250, 32)}


def build_flux():
    """(transformer, T5 encoder, T5 tokenizer, scheduler) of the Flux demo, random weights:
    2 double and 4 single blocks 96 wide (2 heads of 48), T5 64 wide, 2 layers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer(WORDS, T5_LENGTH)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=48,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
        guidance_embeds=False, axes_dims_rope=(8, 20, 20))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=32, d_ff=128,
                                 num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False, dropout_rate=0.0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, **SHIFT)
    return transformer, t5, tokenizer, scheduler


class FluxText:
    """A caption's text inputs as FluxPipeline makes them: T5 ids padded to T5_LENGTH (no
    attention mask), CLIP-L's pooled vector from the 77-token ids (frozen: cached)."""

    def __init__(self, clip, tokenizer):
        from .train import Tokens as ClipTokens
        self.clip, self.tokenizer, self.clip_ids = clip, tokenizer, ClipTokens()
        self.pooled, self.ids = {}, {}

    @torch.no_grad()
    def _fill(self, captions):
        missing = [c for c in set(captions) if c not in self.ids]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=T5_LENGTH,
                                 truncation=True, return_tensors="pt").input_ids
            pooled = self.clip(self.clip_ids(missing)).pooler_output
            self.ids.update(zip(missing, ids))
            self.pooled.update(zip(missing, pooled))

    def __call__(self, captions):
        self._fill(captions)
        return (torch.stack([self.ids[c] for c in captions]),
                torch.stack([self.pooled[c] for c in captions]))


def pack(latents):
    """(N, C, H, W) → (N, H/2·W/2, 4C) and the image ids, as FluxPipeline packs them."""
    from diffusers import FluxPipeline
    n, c, h, w = latents.shape
    return (FluxPipeline._pack_latents(latents, n, c, h, w),
            FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, latents.device,
                                                   latents.dtype))


def sample_t(n, gen):
    """Noise levels the sampler visits: uniform in time, shifted as the demo's schedule shifts
    its 64 tokens (mu = base_shift: exp(0.5))."""
    import math
    shift = math.exp(SHIFT["base_shift"])
    u = torch.rand(n, generator=gen)
    return shift * u / (1 + (shift - 1) * u)


def flow_loss(transformer, t5, text, batch, gen, drop=0.1):
    """Rectified flow: x_t = (1 − t)·x0 + t·ε, the transformer predicts ε − x0 (what
    FlowMatchEulerDiscreteScheduler integrates)."""
    latents, captions, _ = batch
    n = latents.shape[0]
    captions = ["" if random.random() < drop else c for c in captions]
    x0, img_ids = pack(latents)
    noise = torch.randn(x0.shape, generator=gen)
    t = sample_t(n, gen)
    xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    ids, pooled = text(captions)
    states = t5(ids)[0]
    pred = transformer(hidden_states=xt, timestep=t, pooled_projections=pooled,
                       encoder_hidden_states=states, txt_ids=torch.zeros(ids.shape[1], 3),
                       img_ids=img_ids, return_dict=False)[0]
    return F.mse_loss(pred, noise - x0)


def train_flux_base(transformer, t5, text, data, steps, batch, seed, lr=1e-3):
    """Transformer and T5 together (the CLIP of `text` stays frozen); returns EMA copies."""
    from .train import _sample, train_with_ema
    gen = torch.Generator().manual_seed(seed)
    return train_with_ema(
        [transformer, t5], lambda step: flow_loss(transformer, t5, text,
                                                  _sample(data, batch, gen), gen),
        steps, lr, "flux_base")


# ---- networks -----------------------------------------------------------------------------
def network_layers(transformer, regional):
    """[(diffusers path, module, span)] a demo network trains: the attention and MLP layers of
    the double and single blocks; a regional one only those whose rows are image tokens (the
    image stream, the single blocks' joint tokens), which is where NetWeave's regions act."""
    chosen = []
    for path, module, span in host_layers(transformer, patchable):
        tokens = tokens_of(span[0].layer)
        if not path.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        if tokens is Tokens.VECTOR or (regional and tokens is Tokens.TEXT):
            continue
        chosen.append((path, module, span, tokens))
    return chosen


class Factors(nn.Module):
    """One layer's LoRA factors (kohya's initialisation: down random, up zero)."""

    def __init__(self, module, rank, gen):
        super().__init__()
        out, fan_in = module.weight.shape
        self.down = nn.Parameter(torch.randn((rank, fan_in), generator=gen) / fan_in ** 0.5)
        self.up = nn.Parameter(torch.zeros((out, rank)))


def token_mask(mask, tokens, n):
    """A region mask [N, 1, 64, 64] on a layer's n tokens [N, n, 1]: area-resampled to the
    packed 2×2 patch grid (as NetWeave's region maps are), after zeros for the text tokens of
    the single blocks' joint rows."""
    grid = F.interpolate(mask, size=(shapes.SIZE // 8,) * 2, mode="area").flatten(1)
    text = n - grid.shape[1]
    if tokens is Tokens.JOINT and text > 0:
        grid = torch.cat([grid.new_zeros(grid.shape[0], text), grid], dim=1)
    return grid.unsqueeze(-1)


def train_flux_network(transformer, t5, text, data, spec, steps, batch, seed):
    """Factors of the chosen layers on the frozen base: {diffusers path: (down, up, span)}."""
    from .train import _sample, optimise
    gen = torch.Generator().manual_seed(seed)
    regional = data[2] is not None
    layers = network_layers(transformer, regional)
    factors = [Factors(m, spec.rank, gen) for _, m, _, _ in layers]
    region = {}

    def hook(module, args, y, f, tokens):
        delta = lora.bypass(args[0], module, f.down, f.up).to(y.dtype)
        if regional:
            delta = delta * token_mask(region["mask"], tokens, delta.shape[1])
        return y + delta

    hooks = [m.register_forward_hook(functools.partial(hook, f=f, tokens=tokens))
             for (_, m, _, tokens), f in zip(layers, factors)]

    def loss(step):
        batch_data = _sample(data, batch, gen)
        region["mask"] = batch_data[2]
        return flow_loss(transformer, t5, text, batch_data, gen)  # 10 % empty: CFG's rows too
    try:
        optimise([p for f in factors for p in f.parameters()], loss, steps, spec.lr, spec.style)
    finally:
        for h in hooks:
            h.remove()
    return {path: (f.down.detach(), f.up.detach(), span)
            for (path, _, span, _), f in zip(layers, factors)}


def kohya_tensors(trained, rank):
    """kohya sd-scripts' Flux names on the BFL layers: a fused layer (q, k, v; linear1's MLP
    rows too) gets its parts' downs stacked and their ups block-diagonal, as sd-scripts saves
    split q/k/v (`split_qkv`): the same ΔW, rank × parts, alpha = that rank."""
    fused = {}
    for path, (down, up, span) in trained.items():
        (seg,) = span
        fused.setdefault(seg.layer, []).append((seg.start, down, up))
    tensors = {}
    for layer, parts in fused.items():
        parts.sort(key=lambda p: p[0])
        rows = max(start + up.shape[0] for start, _, up in parts)
        r = rank * len(parts)
        big_up = torch.zeros(rows, r)
        for i, (start, _, up) in enumerate(parts):
            big_up[start:start + up.shape[0], i * rank:(i + 1) * rank] = up
        name = "lora_unet_" + layer.replace(".", "_")
        tensors.update({f"{name}.lora_down.weight": torch.cat([d for _, d, _ in parts]),
                        f"{name}.lora_up.weight": big_up, f"{name}.alpha": torch.tensor(float(r))})
    return tensors


def peft_tensors(trained):
    """diffusers/PEFT names (`transformer.` + the diffusers path, lora_A = down, lora_B = up);
    alpha = rank, so nothing is baked in."""
    tensors = {}
    for path, (down, up, _) in trained.items():
        tensors[f"transformer.{path}.lora_A.weight"] = down
        tensors[f"transformer.{path}.lora_B.weight"] = up
    return tensors


# ---- the stages -----------------------------------------------------------------------------
def _load_flux(out):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel
    folder = os.path.join(out, FLUX_NAME)
    if not os.path.isdir(os.path.join(folder, "transformer")):
        raise SystemExit(f"{folder}/transformer is missing: run the stage that writes it first "
                         "(flux_base)")
    kw = dict(torch_dtype=torch.float32)
    return (FluxTransformer2DModel.from_pretrained(os.path.join(folder, "transformer"), **kw)
            .eval().requires_grad_(False),
            T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder_2"), **kw)
            .eval().requires_grad_(False))


def run_flux_stage(name, out, steps, batch, seed, count):
    """One Flux stage from what the earlier ones wrote to `out` (the SD demo's VAE and text
    encoder first), its result written there."""
    from .train import _load, _save_component, _save_tensors, _write_dir, encode

    vae, clip = _load(out, "vae", "text_encoder")
    _, _, tokenizer, scheduler = build_flux()
    text = FluxText(clip, tokenizer)
    folder = os.path.join(out, FLUX_NAME)
    if name == "flux_base":
        transformer, t5, _, _ = build_flux()
        transformer, t5 = train_flux_base(transformer, t5, text,
                                          encode(vae, seed + 2, count, "base"), steps, batch, seed)
        _save_component(transformer, os.path.join(folder, "transformer"))
        _save_component(t5, os.path.join(folder, "text_encoder_2"))
        _write_dir(os.path.join(folder, "tokenizer_2"), tokenizer.save_pretrained)
        _write_dir(os.path.join(folder, "scheduler"), scheduler.save_pretrained)
        return
    spec = FLUX_NETWORKS[name]
    transformer, t5 = _load_flux(out)
    data = encode(vae, seed + 30 + list(FLUX_NETWORKS).index(name), count // 4, spec.style,
                  regional=spec.regional)
    trained = train_flux_network(transformer, t5, text, data, spec, steps, batch, seed + 30)
    if spec.format == "kohya":
        tensors = kohya_tensors(trained, spec.rank)
        meta = {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux",
                "ss_network_dim": spec.rank, "ss_network_alpha": spec.rank}
    else:
        tensors = peft_tensors(trained)
        meta = {"format": "pt"}
    meta.update(netweave_demo_style=spec.style, netweave_demo_regional=spec.regional)
    _save_tensors(os.path.join(out, FLUX_LORAS, name + ".safetensors"), tensors, meta)
