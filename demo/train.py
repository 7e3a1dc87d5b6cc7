"""Train the embedded demo from nothing, on 2 CPU cores, in stages that each write their result:

    python -m netweave.demo.train [--out netweave/demo/weights] [--stages vae,base,…] [--quick]

1. `vae`: a VAE (diffusers AutoencoderKL, 4× down-sampling, 4 latent channels) on random
   32-px crops of every style's pictures, so that it can draw all of them;
2. `base`: the text encoder (transformers' CLIPTextModel with CLIP's real 49408-token
   vocabulary) and cross-attention UNet (diffusers' UNet2DConditionModel, SD1's block layout at
   toy width) together, v-prediction on SD1's noise schedule with min-SNR weighting, 10 % empty
   captions for CFG, EMA;
3. networks on the frozen base, each on pictures of one style with the same captions (10 %
   empty), written in kohya's format:
   - `demo_sunset`: LoCon on the UNet (resnet convs, attention and feed-forward), a colour
     shift, trained for `region=`: each picture has the shift inside a random mask and its
     change is masked on every layer exactly as NetWeave masks a regional network;
   - `demo_stripes`: LoCon (every resnet conv, attention and feed-forward), a texture;
   - `demo_boxy`: LyCORIS LoHa on attention, feed-forward and the text encoder, every shape a
     square;
4. `demo_pastel`: the UNet fine-tuned on the pastel palette, for `<model:demo_pastel:…>`;
5. `flux_base`, `flux_sunset`, `flux_stripes`: the Flux-architecture demo on the same VAE and
   CLIP (train_flux.py).

A stage reads what the earlier ones wrote to `--out`, so one can be redone alone (the later
ones then no longer match it: redo them too). Weights are written as fp16 safetensors beside
their configs; TRAINED.json records each stage's steps, seconds and command. `--quick` runs
every stage for a few steps (the test suite uses it to check that this script still works).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..extension.tokenizer import clip_tokenizer
from ..network.algorithms import loha, lora
from ..network.keymap import KeyMap
from ..devtools.synthetic import layer_name
from . import shapes
from .train_flux import FLUX_STAGES, run_flux_stage

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "weights")
BASE_NAME = "netweave-demo"
LATENT = shapes.SIZE // 4


@dataclass(frozen=True)
class NetworkSpec:
    style: str  # the shapes.py variant it learns
    algorithm: str  # "lora" or "loha"
    rank: int
    layers: str  # "attention" (kohya's usual set) or "conv" (LoCon's: resnet convs too)
    with_text: bool  # the text encoder's layers too
    regional: bool  # trained with masked changes, for region=
    lr: float


NETWORKS = {
    "demo_sunset": NetworkSpec("sunset", "lora", 8, "conv", False, True, 2e-3),
    "demo_stripes": NetworkSpec("stripes", "lora", 8, "conv", False, False, 2e-3),
    "demo_boxy": NetworkSpec("boxy", "loha", 8, "attention", True, False, 4e-3),
}
# stage: (steps, batch), in the order they run; --quick divides the steps
# (batches of 16 halve a network's time and keep its effect, except the stripes': a texture
# needs the pictures — at 16 its stripe measure was 6.1, at 32 it is 28.8)
STAGES = {"vae": (2000, 16), "base": (1600, 32), "demo_sunset": (250, 16),
          "demo_stripes": (200, 32), "demo_boxy": (300, 16), "demo_pastel": (200, 16),
          **FLUX_STAGES}  # the Flux-architecture demo (train_flux.py), on the VAE and CLIP


def build(scaling_factor: float = 1.0):
    """The demo's architecture: (vae, text encoder, unet, scheduler), random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(16, 32, 64), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=shapes.SIZE,
                        scaling_factor=scaling_factor)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128,
                                        num_hidden_layers=3, num_attention_heads=4,
                                        max_position_embeddings=77, projection_dim=32,
                                        bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE // 4, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=2,  # diffusers reads this as the number of heads: 2 keeps CPU fast
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085,
                                       beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, prediction_type="v_prediction")
    return vae, text, unet, scheduler


class Tokens:
    """Token ids of captions, padded to 77 as the pipeline pads them (cached per caption)."""

    def __init__(self):
        self.tokenizer, self.cache = clip_tokenizer(), {}

    def __call__(self, captions):
        missing = [c for c in set(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            self.cache.update(zip(missing, ids))
        return torch.stack([self.cache[c] for c in captions])


def _log(stage, step, steps, loss, started):
    if step % 100 == 0 or step == steps - 1:
        print(f"{stage}: step {step + 1}/{steps} loss {loss:.4f} ({time.time() - started:.0f} s)",
              flush=True)


def train_vae(vae, steps, batch, seed, crop=32, lr=2e-3):
    """Reconstruction (L1 + ½ MSE, a whisper of KL) on random crops of every style's pictures:
    the VAE is convolutional, so 32-px crops teach it what whole pictures would at a quarter of
    the cost, and far more steps fit (colours need them: 500 whole-picture steps confused red
    with yellow). One-cycle learning rate."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                   pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    cells = (shapes.SIZE - crop) // 4 + 1  # crops on the latent grid
    started = time.time()
    for step in range(steps):
        style = shapes.STYLES[step % len(shapes.STYLES)]
        pixels, _ = shapes.batch(seed * 100_003 + step, batch, style)
        top, left = (torch.randint(0, cells, (2,), generator=gen) * 4).tolist()
        x = torch.from_numpy(pixels)[:, :, top:top + crop, left:left + crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + 0.5 * F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        _log("vae", step, steps, loss.item(), started)
    vae.eval().requires_grad_(False)


def region_masks(seed: int, count: int) -> torch.Tensor:
    """Hard masks [N, 1, 64, 64] for a regional network's training pictures, edges on the
    latent grid: everywhere (a quarter), one half (left, right, top or bottom: half) or a
    rectangle at least 16 px a side (a quarter)."""
    rng = random.Random(seed)
    masks = torch.zeros(count, 1, shapes.SIZE, shapes.SIZE)
    half, cell = shapes.SIZE // 2, 4
    for m in masks:
        kind = rng.random()
        if kind < 0.25:
            m[:] = 1
        elif kind < 0.75:
            side = rng.choice(("left", "right", "top", "bottom"))
            view = m[0] if side in ("top", "bottom") else m[0].T
            view[:half] = 1 if side in ("left", "top") else 0
            view[half:] = 0 if side in ("left", "top") else 1
        else:
            h, w = (rng.randrange(16, shapes.SIZE + 1, cell) for _ in range(2))
            top, left = (rng.randrange(0, shapes.SIZE - s + 1, cell) for s in (h, w))
            m[0, top:top + h, left:left + w] = 1
    return masks


@torch.no_grad()
def encode(vae, seed, count, style, regional=False):
    """(latents (scaled), captions, masks at latent size or None) of `count` pictures of
    `style`; `regional`: each picture has `style` only inside a random region mask and the
    base style outside, and that mask comes with it."""
    latents, captions, masks = [], [], []
    for start in range(0, count, 256):
        n = min(256, count - start)
        pixels, caps = shapes.batch(seed * 7919 + start, n, style)
        pixels = torch.from_numpy(pixels)
        if regional:
            plain, _ = shapes.batch(seed * 7919 + start, n, "base")  # the same scenes
            m = region_masks(seed * 7919 + start, n)
            pixels = m * pixels + (1 - m) * torch.from_numpy(plain)
            masks.append(F.avg_pool2d(m, shapes.SIZE // LATENT))
        latents.append(vae.encode(pixels).latent_dist.mean)
        captions += caps
    return (torch.cat(latents) * vae.config.scaling_factor, captions,
            torch.cat(masks) if regional else None)


class Noise:
    """SD1's training noise schedule (scaled_linear β from 0.00085 to 0.012, 1000 steps), with
    v-prediction (SD2's): at high noise the target is nearly the picture itself, so the model
    must say from the caption alone what the picture holds, and it learns to read the caption
    in a few hundred steps where ε-prediction (whose loss barely depends on the picture there)
    had not after 1800."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        self.alphas = torch.cumprod(1 - betas, 0)

    def _a(self, t):
        return self.alphas[t].view(-1, 1, 1, 1)

    def add(self, x0, noise, t):
        a = self._a(t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0, noise, t):
        a = self._a(t)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def min_snr_weight(self, t, gamma=5.0):
        """Min-SNR-γ loss weights for v-prediction (Hang et al. 2023): the nearly clean steps,
        which teach little, count less."""
        snr = self.alphas[t] / (1 - self.alphas[t])
        return snr.clamp(max=gamma) / (snr + 1)


def diffusion_loss(unet, text, tokens, noise_schedule, batch, gen, drop=0.1):
    latents, captions, _ = batch
    n = latents.shape[0]
    captions = ["" if random.random() < drop else c for c in captions]
    t = torch.randint(0, 1000, (n,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    noisy = noise_schedule.add(latents, noise, t)
    cond = text(tokens(captions))[0]
    target = noise_schedule.target(latents, noise, t)
    error = (unet(noisy, t, cond).sample - target).pow(2).mean(dim=(1, 2, 3))
    return (noise_schedule.min_snr_weight(t) * error).mean()


def _sample(data, batch, gen):
    latents, captions, masks = data
    idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
    return (latents[idx], [captions[i] for i in idx.tolist()],
            None if masks is None else masks[idx])


def optimise(params, loss_fn, steps, lr, label, warmup=0, ema=None):
    """AdamW (no weight decay) on `params`, `loss_fn(step)` each step, gradients clipped to
    norm 1, the learning rate warmed up over `warmup` steps; `ema`: averaged copies of
    `params`, moved toward them after each step (what the base stages ship)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        if warmup:
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = loss_fn(step)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            decay = min(0.998, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p, 1 - decay)
        _log(label, step, steps, loss.item(), started)


def train_with_ema(modules, loss_fn, steps, lr, label):
    """Every trainable parameter of `modules` together; returns their EMA copies (a frozen
    module, as the pastel stage's text encoder, is neither optimised nor averaged)."""
    copies = [copy.deepcopy(m).requires_grad_(False) for m in modules]
    pairs = [(e, p) for c, m in zip(copies, modules)
             for e, p in zip(c.parameters(), m.parameters()) if p.requires_grad]
    optimise([p for _, p in pairs], loss_fn, steps, lr, label, warmup=100,
             ema=[e for e, _ in pairs])
    return [c.eval() for c in copies]


def train_base(unet, text, data, steps, batch, seed, lr=1e-3):
    """UNet and text encoder together; returns their EMA copies (what is shipped)."""
    tokens, noise_schedule = Tokens(), Noise()
    gen = torch.Generator().manual_seed(seed)
    return train_with_ema(
        [unet, text], lambda step: diffusion_loss(unet, text, tokens, noise_schedule,
                                                  _sample(data, batch, gen), gen),
        steps, lr, "base")


def _targets(unet, text, layers, with_text, per_token):
    """The layers a demo network trains: kohya's usual LoRA set ("attention": attention
    projections and feed-forward, plus the text encoder's when `with_text`) or LoCon's ("conv":
    that and every UNet resnet conv). `per_token` leaves out the cross-attention keys and
    values (they read the text, not the picture), so that every layer's change is one per
    latent pixel: what a regional network's training masks."""
    chosen = []
    for target in KeyMap({"unet": unet, "te1": text}).targets:
        name, module = target.name, target.module
        if target.component == "te1":
            if with_text and isinstance(module, nn.Linear):
                chosen.append(target)
        elif per_token and (name.endswith("attn2.to_k") or name.endswith("attn2.to_v")):
            continue
        elif ".attentions." in name and isinstance(module, (nn.Linear, nn.Conv2d)):
            chosen.append(target)
        elif layers == "conv" and isinstance(module, nn.Conv2d) and ".resnets." in name:
            chosen.append(target)
    return chosen


class Trainable(nn.Module):
    """The factors of one layer, run through the algorithm's own `bypass` (so training uses
    exactly the math that applies them)."""

    def __init__(self, target, algorithm, rank, gen):
        super().__init__()
        shape = tuple(target.weight.shape)
        out, fan_in, kernel = shape[0], shape[1], shape[2:]
        self.algorithm, self.rank = algorithm, rank
        flat = fan_in * (int(torch.tensor(kernel).prod()) if kernel else 1)
        if algorithm == "lora":
            # kohya's initialisation: down random, up zero, so training starts at the base
            self.down = nn.Parameter(torch.randn((rank, fan_in, *kernel), generator=gen) / flat ** 0.5)
            self.up = nn.Parameter(torch.zeros((out, rank, *(1,) * len(kernel))))
        else:
            # LyCORIS' LoHa initialisation: one Hadamard factor starts at zero
            self.w1a = nn.Parameter(torch.randn((out, rank), generator=gen) * 0.1)
            self.w1b = nn.Parameter(torch.randn((rank, flat), generator=gen) / flat ** 0.5)
            self.w2a = nn.Parameter(torch.zeros((out, rank)))
            self.w2b = nn.Parameter(torch.randn((rank, flat), generator=gen) / flat ** 0.5)

    def delta_y(self, x, module):
        if self.algorithm == "lora":
            return lora.bypass(x, module, self.down, self.up)
        return loha.bypass(x, module, self.w1a, self.w1b, self.w2a, self.w2b)

    def parts(self):
        """kohya / LyCORIS parts; alpha = rank, so the file's scale is 1 as trained."""
        alpha = {"alpha": torch.tensor(float(self.rank))}
        if self.algorithm == "lora":
            return {"lora_down.weight": self.down, "lora_up.weight": self.up, **alpha}
        return {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a,
                "hada_w2_b": self.w2b, **alpha}


def on_grid(delta, mask):
    """`delta` of one UNet layer kept inside `mask` [N, 1, h, w] (latent size), area-resampled
    to the layer's grid as NetWeave's regions are: delta [N, C, H, W] (a conv) or [N, H·W, C]
    (an attention projection on square latents)."""
    if delta.dim() == 4:
        return delta * F.interpolate(mask, size=delta.shape[-2:], mode="area")
    side = round(delta.shape[1] ** 0.5)
    return delta * F.interpolate(mask, size=(side, side), mode="area").flatten(2).transpose(1, 2)


def train_network(unet, text, data, spec, steps, batch, seed):
    """Factors for the chosen layers of the frozen base; {kohya layer name: parts}. A regional
    network learns with its change masked on every layer, as NetWeave applies `region=`."""
    gen = torch.Generator().manual_seed(seed)
    tokens, noise_schedule = Tokens(), Noise()
    regional = data[2] is not None
    targets = _targets(unet, text, spec.layers, spec.with_text, per_token=regional)
    trainables = [Trainable(t, spec.algorithm, spec.rank, gen) for t in targets]
    region = {}  # the batch's masks, for the hooks

    def hook(module, args, y, tr, masked):
        delta = tr.delta_y(args[0], module).to(y.dtype)
        return y + (on_grid(delta, region["mask"]) if masked else delta)

    hooks = [t.module.register_forward_hook(
        functools.partial(hook, tr=tr, masked=regional and t.component == "unet"))
        for t, tr in zip(targets, trainables)]

    def loss(step):
        batch_data = _sample(data, batch, gen)
        region["mask"] = batch_data[2]
        # empty captions too: the network acts on the unconditional rows as well, and if it
        # had never learnt them there, CFG (cond − uncond, × 7) would cancel a UNet-only
        # network's effect (measured: a sunset trained without them tinted at CFG 1, not 7)
        return diffusion_loss(unet, text, tokens, noise_schedule, batch_data, gen)
    try:
        optimise([p for tr in trainables for p in tr.parameters()], loss, steps, spec.lr,
                 spec.algorithm)
    finally:
        for h in hooks:
            h.remove()
    return {layer_name(t, "kohya", "sd1"): tr.parts() for t, tr in zip(targets, trainables)}


def _write_dir(folder, write):
    """`write(tmp)` fills a temporary folder that then replaces `folder` whole, so a stopped
    run never leaves half a component."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    os.replace(tmp, folder)


def _save_component(module, folder):
    _write_dir(folder, lambda tmp: module.to(torch.float16).save_pretrained(
        tmp, safe_serialization=True))
    module.to(torch.float32)


def _save_network(path, layers, meta):
    _save_tensors(path, {f"{name}.{part}": v for name, parts in layers.items()
                         for part, v in parts.items()}, meta)


def _save_tensors(path, tensors, meta):
    """A network file in fp16 with its metadata, written whole or not at all."""
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def _load(out, *names):
    """Components of the demo in `out` written by earlier stages, in fp32 (their fp16 values:
    what inference runs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "unet": UNet2DConditionModel}
    loaded = []
    for name in names:
        folder = os.path.join(out, BASE_NAME, name)
        if not os.path.isdir(folder):
            raise SystemExit(f"{folder} is missing: run the stage that writes it first "
                             f"(stages in order: {', '.join(STAGES)})")
        loaded.append(classes[name].from_pretrained(folder, torch_dtype=torch.float32)
                      .eval().requires_grad_(False))
    return loaded


def run_stage(name, out, steps, batch, seed, count):
    """Train one stage from what the earlier ones wrote to `out`, and write its result."""
    model_dir = os.path.join(out, BASE_NAME)
    if name == "vae":
        vae = build()[0]
        train_vae(vae, steps, batch, seed)
        probe, _, _ = encode(vae, seed + 1, min(512, count), "base")
        vae.register_to_config(scaling_factor=round(1.0 / probe.std().item(), 5))
        _save_component(vae, os.path.join(model_dir, "vae"))
    elif name == "base":
        (vae,) = _load(out, "vae")
        _, text, unet, scheduler = build()
        unet, text = train_base(unet, text, encode(vae, seed + 2, count, "base"), steps, batch,
                                seed)
        _save_component(text, os.path.join(model_dir, "text_encoder"))
        _save_component(unet, os.path.join(model_dir, "unet"))
        _write_dir(os.path.join(model_dir, "scheduler"), scheduler.save_pretrained)
    elif name in NETWORKS:
        spec = NETWORKS[name]
        vae, text, unet = _load(out, "vae", "text_encoder", "unet")
        data = encode(vae, seed + 10 + list(NETWORKS).index(name), count // 4, spec.style,
                      regional=spec.regional)
        trained = train_network(unet, text, data, spec, steps, batch, seed + 10)
        _save_network(os.path.join(out, "loras", name + ".safetensors"), trained,
                      {"ss_base_model_version": "sd_v1", "ss_network_dim": spec.rank,
                       "ss_network_alpha": spec.rank, "netweave_demo_style": spec.style,
                       "netweave_demo_regional": spec.regional,
                       "ss_network_module": "networks.lora" if spec.algorithm == "lora"
                       else "lycoris.kohya", "ss_network_args": json.dumps(
                           {"algo": spec.algorithm} if spec.algorithm != "lora" else
                           {"conv_dim": spec.rank} if spec.layers == "conv" else {})})
    elif name in FLUX_STAGES:
        run_flux_stage(name, out, steps, batch, seed, count)
    elif name == "demo_pastel":
        vae, text, unet = _load(out, "vae", "text_encoder", "unet")
        data = encode(vae, seed + 20, count // 4, "pastel")
        pastel, _ = train_base(unet.train().requires_grad_(True), text, data, steps, batch,
                               seed + 20, lr=2e-4)
        _save_component(pastel, os.path.join(out, "models", "demo_pastel", "unet"))
    else:
        raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


def _record(out, name, steps, batch, seconds, command, seed, count):
    """TRAINED.json: how each stage in `out` was made."""
    path = os.path.join(out, "TRAINED.json")
    trained = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            trained = json.load(f)
    if "stages" not in trained:  # an older layout, or none: start afresh
        trained = {"command": "python -m netweave.demo.train", "stages": {}}
    trained["stages"][name] = {"steps": steps, "batch": batch, "seconds": round(seconds),
                               "seed": seed, "pictures": count, "command": command,
                               "torch": torch.__version__}
    trained["seconds"] = sum(s["seconds"] for s in trained["stages"].values())
    with open(path, "w", encoding="utf-8") as f:
        json.dump(trained, f, indent=1)


@torch.enable_grad()  # whatever the caller's grad mode (a test before may have turned it off)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netweave.demo.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run)")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma-separated stages to run, in order; each reads what the "
                         f"earlier ones wrote to --out (default: all: {','.join(STAGES)})")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch's CPU threads (default: torch's own; on 2 cores shared with "
                         "other work, 1 trained the Flux demo 4× faster than 2)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stages {unknown}; stages: {', '.join(STAGES)}")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its fp16-cast notice, once per component
    count = 512 if args.quick else 8192
    command = "python -m netweave.demo.train" + (" --quick" if args.quick else "") + \
        ("" if stages == list(STAGES) else f" --stages {','.join(stages)}") + \
        (f" --threads {args.threads}" if args.threads else "")
    started = time.time()
    for name in sorted(stages, key=list(STAGES).index):
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        steps, batch = STAGES[name]
        steps = max(2, steps // 300) if args.quick else steps
        began = time.time()
        run_stage(name, args.out, steps, batch, args.seed, count)
        _record(args.out, name, steps, batch, time.time() - began, command, args.seed, count)
        print(f"{name}: written to {args.out} in {time.time() - began:.0f} s", flush=True)
    print(f"done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
