"""Engine benchmark: the same UNet and networks under every strategy, timed side by side in one
run, so the ratios compare like with like (`python -m netweave bench [--quick] [--json]`).

Workloads: the bare UNet; three static rank-32 LoRAs (one on the attention, one on the
feed-forward, one on the conv layers) merged by the engine; the same with 4 keyframes each
(the engine's cost model picks merge or bypass per layer); and two baselines — "restore and
re-merge every patched layer on every change" (A1111, loractl) and "bypass every network every
step" (PEFT unfused), the engine held to one strategy. Regions: two LoRAs on the left and right
halves plus one global, in one forward, against the peers' way — one UNet pass per region, each
with its own networks merged, blended by the masks (Regional Prompter's latent mode, ComfyUI's
per-region conditioning). Plus: what changing one network's strength between two generations
costs, and the bytes of pristine copies.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from typing import Dict

import torch

from .engine import Engine
from .plan import CompileContext, compile_prompt
from .reference import UNET
from .synthetic import write_network

STATIC = "<lora:net0:0.8> <lora:net1:0.6> <lora:net2:0.4>"
# What each network covers: attention, feed-forward, convolutions.
COVERS = (lambda t: ".attn" in t.name or "proj_in" in t.name or "proj_out" in t.name,
          lambda t: ".ff." in t.name,
          lambda t: isinstance(t.module, torch.nn.Conv2d))
SCHEDULED = ("<lora:net0:0.2@0,0.5@0.25,0.8@0.5,1@0.75> <lora:net1:1@0,0.6@0.25,0.3@0.5,0@0.75> "
             "<lora:net2:0.4@0,0.1@0.25,0.4@0.5,0.7@0.75>")
CHANGED = "<lora:net0:0.8> <lora:net1:0.5> <lora:net2:0.4>"
REGIONAL = "<lora:net0:0.8:region=left> <lora:net1:0.6:region=right> <lora:net2:0.4>"
PER_REGION = ("<lora:net0:0.8> <lora:net2:0.4>", "<lora:net1:0.6> <lora:net2:0.4>")


def _per_region_passes(engine: Engine, unet, plans, steps: int, latent: int, batch: int) -> float:
    """Baseline: per step, one UNet pass per region with that region's networks merged (only
    the layers that differ re-merge between passes), outputs blended by the half masks."""
    dev, dtype = unet.device, unet.dtype
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=gen).to(dev, dtype)
    ctx = torch.randn(batch, 77, 768, generator=gen).to(dev, dtype)
    left = torch.zeros(latent, latent, device=dev, dtype=dtype)
    left[:, : latent // 2] = 1
    _sync(dev)
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(steps):
            outs = []
            for p in plans:
                engine.activate(p)
                engine.set_step(k)
                outs.append(unet(x, 999 - k * 999 // steps, encoder_hidden_states=ctx).sample)
            outs[0] * left + outs[1] * (1 - left)
    _sync(dev)
    return time.perf_counter() - start


class RemergeEverything(Engine):
    """Baseline (A1111's lazy re-merge, loractl): whenever any strength changes, every patched
    layer is restored and re-merged."""

    def set_step(self, k: int, phase: str = "base") -> None:
        if self.plan is not None and self._changes[phase].get(k):
            for slot in self._slots.values():
                slot.applied = ("stale",)
        super().set_step(k, phase)


def _unet(quick: bool, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    config = dict(UNET["sd1"])
    if quick:
        config.update(block_out_channels=(64, 128, 128, 128))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(layers_per_block=2, **config).eval()
    return unet.to(device=device, dtype=dtype)


def _steps(unet, steps: int, latent: int, batch: int, on_step=None) -> float:
    """Seconds for `steps` UNet calls (cond and uncond rows in one batch, as WebUIs run)."""
    dev, dtype = unet.device, unet.dtype
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, latent, latent, generator=gen).to(dev, dtype)
    ctx = torch.randn(batch, 77, 768, generator=gen).to(dev, dtype)
    _sync(dev)
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(steps):
            if on_step is not None:
                on_step(k)
            unet(x, 999 - k * 999 // steps, encoder_hidden_states=ctx)
    _sync(dev)
    return time.perf_counter() - start


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(quick: bool = False, device: str = "cpu", steps: int = 20, latent: int = 32,
        batch: int = 2, rank: int = 32, repeats: int = 2) -> dict:
    """Each workload `repeats` times, interleaved; the best run of each counts."""
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    unet = _unet(quick, device, dtype)
    ctx = CompileContext(arch="sd1", steps=steps)
    best: Dict[str, float] = {}
    extra: dict = {}

    def timed(name, seconds):
        best[name] = min(best.get(name, float("inf")), seconds)

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, covers in enumerate(COVERS):
            paths[f"net{i}"] = os.path.join(tmp, f"net{i}.safetensors")
            write_network(paths[f"net{i}"], {"unet": unet}, "lora", "kohya", "sd1", rank=rank,
                          seed=i, components=("unet",), scale=0.02, select=covers)
        engines = {name: cls({"unet": unet}, "sd1", lambda kind, n: paths[n],
                             latent=(latent, latent), batch=batch, strategy=strategy)
                   for name, cls, strategy in (("static", Engine, "auto"),
                                               ("scheduled", Engine, "auto"),
                                               ("remerge_every_change", RemergeEverything, "merge"),
                                               ("bypass_all", Engine, "bypass"),
                                               ("regional", Engine, "auto"))}
        prompts = {"static": STATIC, "scheduled": SCHEDULED, "remerge_every_change": SCHEDULED,
                   "bypass_all": STATIC, "regional": REGIONAL}
        per_region = Engine({"unet": unet}, "sd1", lambda kind, n: paths[n],
                            latent=(latent, latent), batch=batch)
        per_region_plans = [compile_prompt(p, ctx) for p in PER_REGION]
        _steps(unet, 2, latent, batch)  # warm-up
        for _ in range(repeats):
            timed("base", _steps(unet, steps, latent, batch))
            for name, e in engines.items():
                start = time.perf_counter()
                e.activate(compile_prompt(prompts[name], ctx))
                timed(f"{name}_activate", time.perf_counter() - start)
                merges = e.merges
                timed(name, _steps(unet, steps, latent, batch, e.set_step))
                extra[f"{name}_merges_during_steps"] = e.merges - merges
                if name == "scheduled":
                    extra["scheduled_bypassed_layers"] = sum(
                        any(c.bypass for c in s.contributions) for s in e._slots.values())
                if name == "static":
                    extra.update(_change_one_strength(e, ctx, timed))
                e.deactivate()
            timed("per_region_passes", _per_region_passes(per_region, unet, per_region_plans,
                                                          steps, latent, batch))
            per_region.deactivate()
    ratios = {"static_vs_base": best["static"] / best["base"],
              "scheduled_vs_static": best["scheduled"] / best["static"],
              "scheduled_vs_base": best["scheduled"] / best["base"],
              "remerge_every_change_vs_static": best["remerge_every_change"] / best["static"],
              "bypass_all_vs_base": best["bypass_all"] / best["base"],
              "regional_vs_base": best["regional"] / best["base"],
              "per_region_passes_vs_base": best["per_region_passes"] / best["base"]}
    return {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cores": os.cpu_count(), "torch": torch.__version__,
                        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                        "threads": torch.get_num_threads()},
            "config": {"unet": "SD1.5" + (" (narrow, --quick)" if quick else ""), "steps": steps,
                       "latent": latent, "batch": batch, "rank": rank, "networks": 3,
                       "dtype": str(dtype).replace("torch.", ""), "keyframes": 4,
                       "repeats": repeats},
            "ratios": ratios, "pristine_mib": extra.pop("pristine_mib"),
            "touched_layers": extra.pop("touched_layers"), "timings_s": best, **extra}


def _change_one_strength(e: Engine, ctx: CompileContext, timed) -> dict:
    """Between two generations: the same plan again, then one network's strength changed."""
    layers_of_net1 = sum(1 for s in e._slots.values() if any(c.network == 1 for c in s.contributions))
    before = e.merges
    start = time.perf_counter()
    e.activate(compile_prompt(STATIC, ctx))
    timed("same_plan_again", time.perf_counter() - start)
    again = e.merges - before
    start = time.perf_counter()
    e.activate(compile_prompt(CHANGED, ctx))
    timed("one_strength_changed", time.perf_counter() - start)
    return {"pristine_mib": e.pristine_bytes / 2 ** 20, "touched_layers": len(e._slots),
            "change_one_strength": {"layers_remerged": e.merges - before - again,
                                    "layers_of_that_network": layers_of_net1,
                                    "layers_patched": len(e._slots),
                                    "same_plan_again_remerged": again}}


def table(result: dict) -> str:
    r, t = result["ratios"], result["timings_s"]
    c = result["change_one_strength"]
    lines = [f"{result['config']['unet']} UNet, {result['config']['steps']} steps, latent "
             f"{result['config']['latent']}², batch {result['config']['batch']}, "
             f"{result['machine']['device']} ({result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']})",
             f"  {'workload':<40}{'ratio':>8}{'target':>9}",
             f"  {'3 static LoRAs, per step vs base':<40}{r['static_vs_base']:8.3f}{'≤ 1.01':>9}",
             f"  {'3 LoRAs × 4 keyframes vs static':<40}{r['scheduled_vs_static']:8.3f}{'≤ 1.05':>9}",
             f"  {'3 LoRAs × 4 keyframes vs base':<40}{r['scheduled_vs_base']:8.3f}{'':>9}",
             f"  {'baseline: re-merge all on change':<40}{r['remerge_every_change_vs_static']:8.3f}"
             f"{'(A1111)':>9}",
             f"  {'baseline: bypass all vs base':<40}{r['bypass_all_vs_base']:8.3f}{'(PEFT)':>9}",
             f"  {'2 regional + 1 global LoRA vs base':<40}{r['regional_vs_base']:8.3f}{'≤ 1.25':>9}",
             f"  {'baseline: a UNet pass per region':<40}{r['per_region_passes_vs_base']:8.3f}"
             f"{'(RP)':>9}",
             f"  change one strength between runs: {c['layers_remerged']} layers re-merged "
             f"(that network has {c['layers_of_that_network']}, {c['layers_patched']} patched; "
             f"same plan again: {c['same_plan_again_remerged']})",
             f"  pristine copies: {result['pristine_mib']:.1f} MiB for {result['touched_layers']} "
             f"touched layers; activation {t['static_activate']:.2f} s; best of "
             f"{result['config']['repeats']} interleaved runs",
             "  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())]
    return "\n".join(lines)
