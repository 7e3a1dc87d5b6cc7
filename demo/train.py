"""Train the embedded demo from nothing, on 2 CPU cores:

    python -m netweave.demo.train [--out netweave/demo/weights] [--quick]

1. a VAE (diffusers AutoencoderKL, 4× down-sampling, 4 latent channels) on the shape pictures
   of every style, so that it can draw all of them, then its decoder alone on the encoder's
   latent means (`--decoder-only` runs just that stage on a trained demo);
2. the base model, text encoder (transformers' CLIPTextModel with CLIP's real 49408-token
   vocabulary) and cross-attention UNet (diffusers' UNet2DConditionModel, SD1's block layout at
   toy width) together, ε-prediction on SD1's noise schedule, 10 % empty captions for CFG, EMA;
3. networks on the frozen base, each on pictures of one style with the same captions, written in
   kohya's format: `demo_sunset` (LoRA on attention, feed-forward and the text encoder: colour
   shift), `demo_stripes` (LoCon, LoRA on every UNet conv and attention: texture), `demo_boxy`
   (LyCORIS LoHa on attention and feed-forward: every shape a square);
4. `demo_pastel`, the UNet fine-tuned on the pastel palette, for `<model:demo_pastel:…>`.

Weights are written as fp16 safetensors beside their configs. `--quick` runs every stage for a
few steps (the test suite uses it to check that this script still works end to end).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..extension.tokenizer import clip_tokenizer
from ..network.algorithms import loha, lora
from ..network.keymap import KeyMap
from ..network.synthetic import layer_name
from . import shapes

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "weights")
BASE_NAME = "netweave-demo"
# (steps, batch) per stage; --quick divides steps
STEPS = {"vae": (500, 16), "decoder": (800, 16), "base": (1800, 32), "network": (250, 32),
         "pastel": (250, 32)}
NETWORKS = {
    # name: (style, algorithm, rank, which layers, with the text encoder)
    "demo_sunset": ("sunset", "lora", 8, "attention", True),
    "demo_stripes": ("stripes", "lora", 8, "conv", False),
    "demo_boxy": ("boxy", "loha", 4, "attention", False),
}


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
                                       steps_offset=1)
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


def train_vae(vae, steps, batch, seed):
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    started = time.time()
    for step in range(steps):
        style = shapes.STYLES[step % len(shapes.STYLES)]
        pixels, _ = shapes.batch(seed * 100_003 + step, batch, style)
        x = torch.from_numpy(pixels)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + 0.5 * F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _log("vae", step, steps, loss.item(), started)
    vae.eval().requires_grad_(False)


def finetune_decoder(vae, steps, batch, seed, lr=5e-4):
    """The decoder alone, on the encoder's latent means: sharper pictures, and the latent space
    the UNet learned stays exactly as it was (SD's own VAE was improved the same way)."""
    vae.decoder.train().requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    started = time.time()
    for step in range(steps):
        style = shapes.STYLES[step % len(shapes.STYLES)]
        pixels, _ = shapes.batch(seed * 100_019 + step, batch, style)
        x = torch.from_numpy(pixels)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + 0.5 * F.mse_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _log("decoder", step, steps, loss.item(), started)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, seed, count, style):
    """Latents (scaled) and captions of `count` pictures of `style`."""
    latents, captions = [], []
    for start in range(0, count, 256):
        pixels, caps = shapes.batch(seed * 7919 + start, min(256, count - start), style)
        latents.append(vae.encode(torch.from_numpy(pixels)).latent_dist.mean)
        captions += caps
    return torch.cat(latents) * vae.config.scaling_factor, captions


class Noise:
    """SD1's training noise schedule (scaled_linear β from 0.00085 to 0.012, 1000 steps)."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
        self.alphas = torch.cumprod(1 - betas, 0)

    def add(self, x0, noise, t):
        a = self.alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def diffusion_loss(unet, text, tokens, noise_schedule, latents, captions, gen, drop=0.1):
    n = latents.shape[0]
    captions = ["" if random.random() < drop else c for c in captions]
    t = torch.randint(0, 1000, (n,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    noisy = noise_schedule.add(latents, noise, t)
    cond = text(tokens(captions))[0]
    return F.mse_loss(unet(noisy, t, cond).sample, noise)


def _sample(data, batch, gen):
    latents, captions = data
    idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
    return latents[idx], [captions[i] for i in idx.tolist()]


def train_base(unet, text, data, steps, batch, seed, lr=1e-3):
    """UNet and text encoder together; returns their EMA copies (what is shipped)."""
    tokens, noise_schedule = Tokens(), Noise()
    gen = torch.Generator().manual_seed(seed)
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)]
    # a frozen text encoder (the pastel stage) is neither optimised nor averaged
    pairs = [(e, p) for e, p in zip(list(ema[0].parameters()) + list(ema[1].parameters()),
                                    list(unet.parameters()) + list(text.parameters()))
             if p.requires_grad]
    ema_params, params = [e for e, _ in pairs], [p for _, p in pairs]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    started = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        loss = diffusion_loss(unet, text, tokens, noise_schedule, *_sample(data, batch, gen), gen)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - decay)
        _log("base", step, steps, loss.item(), started)
    return ema[0].eval(), ema[1].eval()


def _targets(unet, text, layers, with_text):
    """The layers a demo network trains: kohya's usual LoRA set ("attention": attention
    projections and feed-forward, plus the text encoder's) or LoCon's ("conv": that and every
    UNet conv)."""
    chosen = []
    for target in KeyMap({"unet": unet, "te1": text}).targets:
        name, module = target.name, target.module
        if target.component == "te1":
            if with_text and isinstance(module, nn.Linear):
                chosen.append(target)
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


def train_network(unet, text, data, algorithm, rank, layers, with_text, steps, batch, seed,
                  lr=2e-3):
    """Factors for the chosen layers of the frozen base; {kohya layer name: parts}."""
    gen = torch.Generator().manual_seed(seed)
    tokens, noise_schedule = Tokens(), Noise()
    targets = _targets(unet, text, layers, with_text)
    trainables = [Trainable(t, algorithm, rank, gen) for t in targets]
    hooks = [t.module.register_forward_hook(
        lambda module, args, y, tr=tr: y + tr.delta_y(args[0], module).to(y.dtype))
        for t, tr in zip(targets, trainables)]
    params = [p for tr in trainables for p in tr.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    started = time.time()
    try:
        for step in range(steps):
            loss = diffusion_loss(unet, text, tokens, noise_schedule, *_sample(data, batch, gen),
                                  gen, drop=0.0)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            _log(algorithm, step, steps, loss.item(), started)
    finally:
        for h in hooks:
            h.remove()
    return {layer_name(t, "kohya", "sd1"): tr.parts() for t, tr in zip(targets, trainables)}


def _save_network(path, layers, meta):
    tensors = {f"{name}.{part}": v.detach().to(torch.float16).contiguous()
               for name, parts in layers.items() for part, v in parts.items()}
    save_file(tensors, path, metadata={k: str(v) for k, v in meta.items()})


def _save_component(module, folder):
    module.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    module.to(torch.float32)


def decoder_only(out, steps, seed) -> int:
    """The decoder stage alone, on a trained demo's VAE (written back in place)."""
    from diffusers import AutoencoderKL

    folder = os.path.join(out, BASE_NAME, "vae")
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)
    started = time.time()
    finetune_decoder(vae, *steps, seed)
    _save_component(vae, folder)
    record = os.path.join(out, "TRAINED.json")
    with open(record, encoding="utf-8") as f:
        trained = json.load(f)
    trained["steps"]["decoder"] = list(steps)
    trained["decoder_run_after"] = "python -m netweave.demo.train --decoder-only"
    trained["seconds"] += round(time.time() - started)
    with open(record, "w", encoding="utf-8") as f:
        json.dump(trained, f, indent=1)
    print(f"decoder fine-tuned in {time.time() - started:.0f} s")
    return 0


@torch.enable_grad()  # whatever the caller's grad mode (a test before may have turned it off)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netweave.demo.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run)")
    ap.add_argument("--decoder-only", action="store_true",
                    help="only the decoder stage, on the VAE already in --out")
    args = ap.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its fp16-cast notice, once per component
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    steps = {k: (max(2, s // 300) if args.quick else s, b) for k, (s, b) in STEPS.items()}
    if args.decoder_only:
        return decoder_only(args.out, steps["decoder"], args.seed)
    count = 512 if args.quick else 8192
    started = time.time()
    vae, text, unet, scheduler = build()
    train_vae(vae, *steps["vae"], args.seed)
    probe, _ = encode(vae, args.seed + 1, 512 if not args.quick else 64, "base")
    vae.register_to_config(scaling_factor=round(1.0 / probe.std().item(), 5))
    finetune_decoder(vae, *steps["decoder"], args.seed)
    base = encode(vae, args.seed + 2, count, "base")
    unet, text = train_base(unet, text, base, *steps["base"], args.seed)
    unet.requires_grad_(False)
    text.requires_grad_(False)

    out = args.out
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model_dir = os.path.join(tmp, BASE_NAME)
    for name, module in (("vae", vae), ("text_encoder", text), ("unet", unet)):
        _save_component(module, os.path.join(model_dir, name))
    scheduler.save_pretrained(os.path.join(model_dir, "scheduler"))
    os.makedirs(os.path.join(tmp, "loras"))
    for i, (name, (style, algorithm, rank, layers, with_text)) in enumerate(NETWORKS.items()):
        data = encode(vae, args.seed + 10 + i, count // 4, style)
        trained = train_network(unet, text, data, algorithm, rank, layers, with_text,
                                *steps["network"], args.seed + 10 + i)
        _save_network(os.path.join(tmp, "loras", name + ".safetensors"), trained,
                      {"ss_base_model_version": "sd_v1", "ss_network_dim": rank,
                       "ss_network_alpha": rank, "netweave_demo_style": style,
                       "ss_network_module": "networks.lora" if algorithm == "lora"
                       else "lycoris.kohya", "ss_network_args": json.dumps(
                           {"algo": algorithm} if algorithm != "lora" else
                           {"conv_dim": rank} if layers == "conv" else {})})
    pastel = copy.deepcopy(unet).train().requires_grad_(True)
    data = encode(vae, args.seed + 20, count // 4, "pastel")
    pastel, _ = train_base(pastel, text.requires_grad_(False), data, *steps["pastel"],
                           args.seed + 20, lr=2e-4)
    _save_component(pastel, os.path.join(tmp, "models", "demo_pastel", "unet"))
    with open(os.path.join(tmp, "TRAINED.json"), "w", encoding="utf-8") as f:
        json.dump({"command": "python -m netweave.demo.train" + (" --quick" if args.quick else ""),
                   "seed": args.seed, "steps": steps, "pictures": count,
                   "torch": torch.__version__, "seconds": round(time.time() - started)}, f,
                  indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
