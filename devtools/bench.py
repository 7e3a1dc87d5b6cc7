"""Engine benchmark: the same model and networks under every strategy, timed side by side in
one run, so the ratios compare like with like (`python -m netweave bench
[--arch sd|flux|zimage] [--quick | --size 512|1024] [--repeats N] [--json]`).

Models (`FAMILIES`, one entry per family): SD's UNets (SD1.5, SDXL), and Flux-architecture and
Z-Image transformers at their releases' real widths with fewer blocks (random weights, made on
the device); their networks are synthetic files in the key names their trainers write.

Workloads: the bare model; three static rank-32 LoRAs (one on the attention, one on the
feed-forward, one on the conv layers — on a transformer, on the modulations, embedders and
final layer) merged by the engine; the same with 4 keyframes each, at staggered positions
(the engine's cost model picks merge or bypass per layer); and two baselines — "restore and
re-merge every patched layer on every change" (A1111, loractl: with the keyframes staggered,
every layer at each step where any network changes, where the engine re-merges only that
network's layers) and "bypass every network every step" (PEFT unfused), the engine held to one
strategy. Regions: two LoRAs on the left and right
halves plus one global, in one forward (one pass; a blended start over 15 % of the steps; every
step blended: network/blend.py), against the peers' way — one model pass per region, each
with its own networks merged, blended by the masks (Regional Prompter's latent mode, ComfyUI's
per-region conditioning). On a transformer the regions are halves of the packed patch grid.
Quantized (`quantize=FORMAT`, e.g. q8_0): the same model with its
linear layers quantized, the three LoRAs beside them (static and with 4 keyframes) against
the quantized model alone, and the peers' way for the scheduled ones — dequantize, merge and
quantize again at every change (network/requantize.py, held to it); the seconds beside the
float model's with the LoRAs merged. Plus: what changing one network's strength between two
generations costs, and the bytes of pristine copies.

Timing is paired: the workloads run on one model while an identical twin with nothing applied
runs the same step right before each of theirs, so each ratio compares seconds measured in the
same moments (a shared or throttled machine drifts by ±10 % between runs of a minute; the
pairs cancel that). Each workload runs `repeats` times; a ratio is the median of its runs,
with the spread (min–max over the runs) beside it. The floor of a row is its arithmetic: the
floating-point operations of its steps (forwards and merges, counted by torch's FlopCounterMode)
over those of the bare model, so "above floor" is what the engine costs beyond its arithmetic.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..network.calibrate import calibration
from ..network.engine import Engine
from ..network.plan import CompileContext, compile_prompt
from ..network.quantize import QuantFormat, parse_format, quantize_model
from ..network.requantize import requantizer
from ..network.reference import UNET
from .synthetic import write_network

STATIC = "<lora:net0:0.8> <lora:net1:0.6> <lora:net2:0.4>"
# staggered: over 8 steps net0 changes at steps 2, 4, 6, net1 at 3, 5, 7, net2 at 1, 3, 5
SCHEDULED = ("<lora:net0:0.2@0,0.5@0.25,0.8@0.5,1@0.75> "
             "<lora:net1:1@0,0.6@0.375,0.3@0.625,0@0.875> "
             "<lora:net2:0.4@0,0.1@0.125,0.4@0.375,0.7@0.625>")
CHANGED = "<lora:net0:0.8> <lora:net1:0.5> <lora:net2:0.4>"
REGIONAL = "<lora:net0:0.8:region=left> <lora:net1:0.6:region=right> <lora:net2:0.4>"
# the same with a blended start (network/blend.py): 15 % of the pass, and the whole pass
REGIONAL_BLEND = REGIONAL.replace("region=left", "region=left:blend=15%") \
    .replace("region=right", "region=right:blend=15%")
REGIONAL_FULL_BLEND = REGIONAL.replace("region=left", "region=left:blend=1") \
    .replace("region=right", "region=right:blend=1")
PER_REGION = ("<lora:net0:0.8> <lora:net2:0.4>", "<lora:net1:0.6> <lora:net2:0.4>")
WORKLOADS = {"static": (STATIC, "auto"), "scheduled": (SCHEDULED, "auto"),
             "scheduled_merge_only": (SCHEDULED, "merge"),
             "remerge_every_change": (SCHEDULED, "merge"), "bypass_all": (STATIC, "bypass"),
             "regional": (REGIONAL, "auto"), "regional_blend15": (REGIONAL_BLEND, "auto"),
             "regional_full_blend": (REGIONAL_FULL_BLEND, "auto")}


class Family(Enum):
    """The model families `bench --arch` builds (each size names the engine's architecture)."""

    SD = "sd"
    FLUX = "flux"
    ZIMAGE = "zimage"


@dataclass(frozen=True)
class Setup:
    """One benchmark size: which model, at which latent, for how many steps."""

    label: str
    arch: str
    latent: int  # the VAE latent's side; a transformer packs 2×2 of it into one token
    steps: int
    config: Dict  # the diffusers model class's arguments
    family: Family = Family.SD
    text: int = 77  # text tokens the model attends to


@dataclass(frozen=True)
class ModelFamily:
    """How the bench builds one family's model, feeds and calls it as its pipeline does, and
    what its three networks cover (attention, feed-forward, the rest). Another family
    (Qwen-Image, SD3) is one more entry of FAMILIES."""

    kind: str  # what the report calls the model
    setups: Dict[str, Setup]
    build: Callable[[Setup, str, torch.dtype], nn.Module]
    inputs: Callable[[Setup, int, str, torch.dtype], Dict]  # the call's arguments but the time
    timestep: Callable[[int, int, int, str, torch.dtype], object]  # (k, steps, batch, …)
    call: Callable[[nn.Module, Dict, object], torch.Tensor]  # (model, inputs, time) -> prediction
    left: Callable[[Setup, str, torch.dtype], torch.Tensor]  # the left half, on the prediction
    shape: Callable[[Setup], str]  # the size, in words
    covers: Tuple[Callable, Callable, Callable]  # target -> covered, per network
    style: str  # synthetic.py's key style and format of the networks' files
    fmt: str
    batch: int  # rows per model call: cond and uncond, or one (guidance-distilled)
    cuda_dtype: torch.dtype


# ---- SD's UNets -------------------------------------------------------------------------
def _build_unet(setup: Setup, device: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(layers_per_block=2, **setup.config).eval() \
        .to(device=device, dtype=dtype)


def _unet_inputs(setup: Setup, batch: int, device: str, dtype: torch.dtype) -> Dict:
    gen = torch.Generator().manual_seed(1)
    n, width = setup.latent, setup.config["cross_attention_dim"]
    inputs = {"sample": torch.randn(batch, 4, n, n, generator=gen).to(device, dtype),
              "encoder_hidden_states": torch.randn(batch, setup.text, width, generator=gen)
              .to(device, dtype)}
    if setup.config.get("addition_embed_type") == "text_time":  # SDXL's pooled text and sizes
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=gen).to(device, dtype),
            "time_ids": torch.tensor([[1024., 1024., 0., 0., 1024., 1024.]] * batch,
                                     device=device, dtype=dtype)}
    return inputs


def _unet_timestep(k: int, steps: int, batch: int, device: str, dtype: torch.dtype) -> int:
    return 999 - k * 999 // steps


def _keyword_call(model: nn.Module, inputs: Dict, t) -> torch.Tensor:
    """As diffusers' UNet and Flux pipelines call their model: keywords, `.sample` back."""
    return model(**inputs, timestep=t).sample


def _left_half(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    left = torch.zeros(n, n, device=device, dtype=dtype)
    left[:, : n // 2] = 1
    return left


def _latent_left(setup: Setup, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The left half of the latent, for a prediction shaped like it (a UNet's; Z-Image's)."""
    return _left_half(setup.latent, device, dtype)


SD = ModelFamily(
    "UNet",
    {"quick": Setup("SD1.5 (narrow, --quick)", "sd1", 32, 8,
                    {**UNET["sd1"], "block_out_channels": (64, 128, 128, 128)}),
     "512": Setup("SD1.5 at 512 px", "sd1", 64, 20, UNET["sd1"]),
     "1024": Setup("SDXL at 1024 px", "sdxl", 128, 20, UNET["sdxl"])},
    _build_unet, _unet_inputs, _unet_timestep, _keyword_call, _latent_left,
    lambda s: f"latent {s.latent}²",
    (lambda t: ".attn" in t.name or "proj_in" in t.name or "proj_out" in t.name,
     lambda t: ".ff." in t.name,
     lambda t: isinstance(t.module, torch.nn.Conv2d)),
    "kohya", "lora", batch=2, cuda_dtype=torch.float16)
SETUPS = SD.setups  # the UNet sizes, as before families


# ---- transformers (Flux, Z-Image) -------------------------------------------------------
def _random_on(device: str, dtype: torch.dtype, make: Callable[[], nn.Module]) -> nn.Module:
    """`make()`'s module with random weights made on the device itself: built without
    storage (meta), then filled in place, so a model of billions of weights starts in seconds
    and never passes through CPU memory. Matrices ~ N(0, 1/fan-in) (activations stay of order
    one through the blocks), norm scales 1, biases 0."""
    with torch.device("meta"):
        # nn.Module's own `to`: diffusers' warns of modules from_pretrained keeps in float32
        model = nn.Module.to(make(), dtype)
    model = model.to_empty(device=device).eval()
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1)
    return model


def _transformer(cls: str) -> Callable[[Setup, str, torch.dtype], nn.Module]:
    """Builds diffusers' transformer class `cls` with the setup's config, random weights."""
    def build(setup: Setup, device: str, dtype: torch.dtype) -> nn.Module:
        import diffusers
        return _random_on(device, dtype, lambda: getattr(diffusers, cls)(**setup.config))
    return build


def _packed_grid(setup: Setup) -> int:
    return setup.latent // 2  # 2×2 latent patches per token


def _flux_inputs(setup: Setup, batch: int, device: str, dtype: torch.dtype) -> Dict:
    """What diffusers' FluxPipeline passes: packed latent tokens, T5 states, CLIP's pooled
    vector, the positions (0, row, column) of the image tokens and zeros of the text's, and
    the embedded guidance."""
    gen = torch.Generator().manual_seed(1)
    g, cfg = _packed_grid(setup), setup.config
    ids = torch.zeros(g, g, 3)
    ids[..., 1], ids[..., 2] = torch.arange(g)[:, None], torch.arange(g)[None]
    cpu = {"hidden_states": torch.randn(batch, g * g, cfg["in_channels"], generator=gen),
           "encoder_hidden_states": torch.randn(batch, setup.text, cfg["joint_attention_dim"],
                                                generator=gen),
           "pooled_projections": torch.randn(batch, cfg["pooled_projection_dim"], generator=gen),
           "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(setup.text, 3),
           "guidance": torch.full((batch,), 3.5)}
    return {k: v.to(device, dtype) for k, v in cpu.items()}


def _flow_timestep(k: int, steps: int, batch: int, device: str, dtype: torch.dtype):
    """A flow pipeline's time: 1 → 0 over the pass, one per row (the model scales it by 1000)."""
    return torch.full((batch,), 1 - k / steps, device=device, dtype=dtype)


def _rising_timestep(k: int, steps: int, batch: int, device: str, dtype: torch.dtype):
    """ZImagePipeline's time: (1000 − t) / 1000, so 0 → 1 over the pass, one per row."""
    return torch.full((batch,), k / steps, device=device, dtype=dtype)


def _token_left(setup: Setup, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The left half of the packed grid, one value per image token (row by row)."""
    return _left_half(_packed_grid(setup), device, dtype).reshape(-1, 1)


def _flux_config(heads: int, head_dim: int, text_width: int, pooled: int,
                 rope: Tuple[int, int, int]) -> Dict:
    # 2 double + 4 single blocks: at Flux's width that is 1.31 G weights, 5.2 GB in fp32; with
    # the bench's bare twin and the engine's pristine copies a 512 px run peaks at 16.9 GiB
    # resident, which fits a 2-core 24 GiB box (Flux.1's 19 + 38 blocks: 48 GB per copy)
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                attention_head_dim=head_dim, num_attention_heads=heads,
                joint_attention_dim=text_width, pooled_projection_dim=pooled,
                guidance_embeds=True, axes_dims_rope=rope)


FLUX_WIDTH = _flux_config(24, 128, 4096, 768, (16, 56, 56))  # Flux.1 dev's published shapes
FLUX_NARROW = _flux_config(2, 64, 64, 32, (8, 28, 28))


def _flux_attention(t) -> bool:
    return ".attn." in t.name


def _flux_feed_forward(t) -> bool:
    return ".ff." in t.name or ".ff_context." in t.name or t.name.endswith(".proj_mlp") or \
        (t.name.startswith("single_transformer_blocks.") and t.name.endswith(".proj_out"))


def _split(attention: Callable, feed_forward: Callable) -> Tuple[Callable, Callable, Callable]:
    """The three networks' layers: attention; feed-forward; the rest (modulations,
    embedders, the final layer)."""
    return attention, feed_forward, lambda t: not attention(t) and not feed_forward(t)


def _tokens(text: str = "text", multiple: int = 1) -> Callable[[Setup], str]:
    """The size in tokens, the text's padded to a multiple of `multiple` by the model."""
    def words(s: Setup) -> str:
        padded = -(-s.text // multiple) * multiple
        return f"{_packed_grid(s) ** 2} image + {s.text} {text} tokens" + \
            (f" (padded to {padded})" if padded != s.text else "")
    return words


FLUX = ModelFamily(
    "transformer",
    {"quick": Setup("Flux architecture (2 heads × 64, 2 double + 4 single blocks, --size quick)",
                    "flux", 16, 8, FLUX_NARROW, Family.FLUX, text=16),
     "512": Setup("Flux width (24 heads × 128, 2 double + 4 single blocks) at 512 px",
                  "flux", 64, 20, FLUX_WIDTH, Family.FLUX, text=512),
     "1024": Setup("Flux width (24 heads × 128, 2 double + 4 single blocks) at 1024 px",
                   "flux", 128, 20, FLUX_WIDTH, Family.FLUX, text=512)},
    _transformer("FluxTransformer2DModel"), _flux_inputs, _flow_timestep, _keyword_call,
    _token_left, _tokens(), _split(_flux_attention, _flux_feed_forward),
    # diffusers' names (ai-toolkit writes them), no alpha: the PEFT layout
    "diffusers", "peft", batch=1, cuda_dtype=torch.bfloat16)


def _zimage_inputs(setup: Setup, batch: int, device: str, dtype: torch.dtype) -> Dict:
    """What diffusers' ZImagePipeline passes: one latent (C, 1, H, W) and one caption's Qwen3
    states (tokens, 2560) per image, in lists; the model patchifies the latent itself and pads
    either sequence to a multiple of 32 (diffusers' SEQ_MULTI_OF)."""
    gen = torch.Generator().manual_seed(1)
    n, cfg = setup.latent, setup.config
    return {"x": [torch.randn(cfg["in_channels"], 1, n, n, generator=gen).to(device, dtype)
                  for _ in range(batch)],
            "cap_feats": [torch.randn(setup.text, cfg["cap_feat_dim"], generator=gen)
                          .to(device, dtype) for _ in range(batch)]}


def _zimage_call(model: nn.Module, inputs: Dict, t) -> torch.Tensor:
    """As ZImagePipeline calls it: positional (lists, time, lists; the blended start's hook
    finds the batch from the time), one prediction per image back, stacked as it stacks them."""
    return torch.stack(model(inputs["x"], t, inputs["cap_feats"], return_dict=False)[0])


def _zimage_config(heads: int, head_dim: int, caption: int, rope: Tuple[int, int, int]) -> Dict:
    # 4 main layers of 30, the 2 noise + 2 context refiners kept: at Z-Image's width 1.45 G
    # weights, 5.4 GiB in fp32 (the whole model: 6.15 G, 23 GiB per copy), so the model, its
    # bare twin and the pristine copies fit a 24 GiB box as the Flux entry's do
    return dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16,
                dim=heads * head_dim, n_layers=4, n_refiner_layers=2, n_heads=heads,
                n_kv_heads=heads, cap_feat_dim=caption, axes_dims=list(rope))


ZIMAGE_WIDTH = _zimage_config(30, 128, 2560, (32, 48, 48))  # Z-Image Turbo's published shapes
ZIMAGE_NARROW = _zimage_config(2, 64, 64, (16, 24, 24))
# the pipeline keeps a caption's own tokens (chat template included), up to its
# max_sequence_length 512: the real sizes take that longest caption, as Flux's T5 takes 512
ZIMAGE_CAPTION = 512
_ZIMAGE = "Z-Image width (30 heads × 128, 4 of 30 layers + 2 + 2 refiners)"

ZIMAGE = ModelFamily(
    "transformer",
    {"quick": Setup("Z-Image architecture (2 heads × 64, 4 layers + 2 + 2 refiners, --size quick)",
                    "zimage", 16, 8, ZIMAGE_NARROW, Family.ZIMAGE, text=20),
     "512": Setup(f"{_ZIMAGE} at 512 px", "zimage", 64, 8, ZIMAGE_WIDTH, Family.ZIMAGE,
                  text=ZIMAGE_CAPTION),
     "1024": Setup(f"{_ZIMAGE} at 1024 px", "zimage", 128, 8, ZIMAGE_WIDTH, Family.ZIMAGE,
                   text=ZIMAGE_CAPTION)},
    _transformer("ZImageTransformer2DModel"), _zimage_inputs, _rising_timestep, _zimage_call,
    _latent_left, _tokens("caption", 32),
    _split(lambda t: ".attention." in t.name, lambda t: ".feed_forward." in t.name),
    # ai-toolkit's Z-Image files: diffusers' names under ComfyUI's diffusion_model. prefix
    "comfy", "peft", batch=1, cuda_dtype=torch.bfloat16)

FAMILIES = {Family.SD: SD, Family.FLUX: FLUX, Family.ZIMAGE: ZIMAGE}


class RemergeEverything(Engine):
    """Baseline (A1111's lazy re-merge, loractl): whenever any strength changes, every patched
    layer is restored and re-merged."""

    def set_step(self, k: int, phase: str = "base") -> None:
        if self.plan is not None and self._phase_step == (phase, k - 1) and \
                self._changes[phase].get(k):
            for slot in self._unet_slots():
                slot.applied = ("stale",)
            self._phase_step = None  # as after a jump: every layer is compared, all stale
        super().set_step(k, phase)


class RequantizeEveryChange(Engine):
    """Baseline on quantized layers (Forge's "Patching LoRAs", SD.Next's native LoRA): every
    network merges, and each layer whose strengths change is dequantized, merged and
    quantized again."""

    def _choose_strategies(self, slots) -> None:
        super()._choose_strategies(slots)
        for slot in slots.values():
            if slot.target.quant is not None and requantizer(slot.target.module) is not None:
                for c in slot.contributions:
                    c.bypass = not c.uniform


class Bench:
    """A model with its inputs for `steps` denoiser calls (SD: cond and uncond rows in one
    batch, as WebUIs run; Flux: one row, its guidance embedded; Z-Image Turbo: one row, no
    CFG)."""

    def __init__(self, setup: Setup, device: str, dtype: torch.dtype, batch: int):
        self.family = FAMILIES[setup.family]
        self.model = self.family.build(setup, device, dtype)
        self.twin = copy.deepcopy(self.model)  # never patched: the base every step is paired with
        self.setup, self.device, self.dtype, self.batch = setup, device, dtype, batch
        self.inputs = self.family.inputs(setup, batch, device, dtype)

    def quantized(self, fmt: QuantFormat) -> "Bench":
        """The same bench on a copy of the model (and of its twin) quantized in `fmt`."""
        other = copy.copy(self)
        other.model, other.twin = copy.deepcopy(self.model), copy.deepcopy(self.model)
        for model in (other.model, other.twin):  # each quantized: GGUF weights do not deepcopy
            quantize_model(model, fmt)
        return other

    def forward(self, k: int, model=None):
        t = self.family.timestep(k, self.setup.steps, self.batch, self.device, self.dtype)
        return self.family.call(model or self.model, self.inputs, t)

    def steps(self, on_step: Optional[Callable[[int], None]] = None,
              steps: Optional[int] = None) -> Tuple[float, float, float]:
        """(seconds of the workload, seconds of the bare twin, seconds of the workload's
        `on_step` alone: its merges) over the pass: each step the twin and the workload
        (`on_step(k)`, then its model call) run in turn, the twin first at even steps and
        second at odd ones, so neither gains from its place."""
        switching = 0.0

        def step(k):
            nonlocal switching
            if on_step is not None:
                switching += self._timed(lambda: on_step(k))
            self.forward(k)
        mine = base = 0.0
        with torch.no_grad():
            for k in range(self.setup.steps if steps is None else steps):
                pair = self._pair(lambda: self.forward(k, self.twin), lambda: step(k), k)
                base, mine = base + pair[0], mine + pair[1]
        return mine, base, switching

    def _pair(self, twin, workload, k: int) -> Tuple[float, float]:
        """(the twin's seconds, the workload's) at step k, in the order the step's parity says."""
        if k % 2:
            mine = self._timed(workload)
            return self._timed(twin), mine
        base = self._timed(twin)
        return base, self._timed(workload)

    def _timed(self, fn) -> float:
        _sync(self.device)
        start = time.perf_counter()
        fn()
        _sync(self.device)
        return time.perf_counter() - start

    def per_region_passes(self, engine: Engine, plans) -> Tuple[float, float]:
        """Baseline: per step, one model pass per region with that region's networks merged
        (only the layers that differ re-merge between passes), blended by the half masks."""
        left = self.family.left(self.setup, self.device, self.dtype)
        mine = base = 0.0
        with torch.no_grad():
            for k in range(self.setup.steps):
                def passes():
                    outs = []
                    for p in plans:
                        engine.activate(p)
                        engine.set_step(k)
                        outs.append(self.forward(k))
                    return outs[0] * left + outs[1] * (1 - left)
                pair = self._pair(lambda: self.forward(k, self.twin), passes, k)
                base, mine = base + pair[0], mine + pair[1]
        return mine, base

    def flops(self, engine: Optional[Engine]) -> float:
        """Floating-point operations of the pass: the step-0 forward times the steps (a blended
        start's steps, then one pass's), plus every merge the engine makes at its keyframes."""
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                self.forward(0)
            first = counter.get_total_flops()  # a blended start's step 0 runs doubled
            total = first * self.setup.steps
            if engine is not None:
                with FlopCounterMode(display=False) as counter:
                    for k in range(1, self.setup.steps):
                        engine.set_step(k)
                total += counter.get_total_flops()
                engine.set_step(0)
                blended = [bool(b.blended) for b in engine.blender.steps.get("base", [])]
                if any(blended) and not all(blended):  # step 0 ran doubled, the rest one pass
                    engine.set_step(blended.index(False))
                    with FlopCounterMode(display=False) as counter:
                        self.forward(0)
                    one = counter.get_total_flops()
                    engine.set_step(0)
                    total += (one - first) * blended.count(False)
        return total


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(size: str = "quick", device: str = "cpu", repeats: int = 5, rank: int = 32,
        batch: Optional[int] = None, steps: Optional[int] = None, setup: Optional[Setup] = None,
        quantize: Optional[str] = None, arch: str = Family.SD.value) -> dict:
    """Every workload `repeats` times, each step paired with the bare twin's; medians and
    spreads. `arch`: the model family (sd, flux, zimage); `setup` overrides it and `size` (tests use
    a tiny UNet); `batch`: rows per call (default the family's); `steps` overrides the
    size's; `quantize`: the format of the quantized rows, None for none."""
    setup = setup or FAMILIES[Family(arch)].setups[str(size)]
    if steps is not None:
        setup = dataclasses.replace(setup, steps=steps)
    family = FAMILIES[setup.family]
    batch = family.batch if batch is None else batch
    dtype = family.cuda_dtype if device.startswith("cuda") else torch.float32
    bench = Bench(setup, device, dtype, batch)
    ctx = CompileContext(arch=setup.arch, steps=setup.steps)
    seconds: Dict[str, List[float]] = collections.defaultdict(list)
    runs: Dict[str, List[float]] = collections.defaultdict(list)  # workload / its paired base
    extra: dict = {"choices": {}, "floors": {}, "problems": {}, "kept_delta": {}}

    def measured(name, mine, base):
        seconds[name].append(mine)
        seconds["base"].append(base)
        runs[name].append(mine / base)

    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, covers in enumerate(family.covers):
            paths[f"net{i}"] = os.path.join(tmp, f"net{i}.safetensors")
            written = write_network(paths[f"net{i}"], {"unet": bench.model}, family.fmt,
                                    family.style, setup.arch, rank=rank, seed=i,
                                    components=("unet",), scale=0.02, select=covers)
            extra.setdefault("lora_layers", []).append(len(written))
            extra.setdefault("lora_key", next(iter(written)))  # a name as the files give it

        def engine(cls=Engine, strategy="auto"):
            return cls({"unet": bench.model}, setup.arch, lambda kind, n: paths[n],
                       latent=(setup.latent, setup.latent), batch=batch, strategy=strategy)

        engines = {name: engine(RemergeEverything if name == "remerge_every_change" else Engine,
                                strategy) for name, (_, strategy) in WORKLOADS.items()}
        benches = {name: bench for name in engines}
        if quantize:
            qbench = bench.quantized(parse_format(quantize))
            for name, (cls, _) in QUANTIZED.items():
                engines[name] = cls({"unet": qbench.model}, setup.arch, lambda kind, n: paths[n],
                                    latent=(setup.latent, setup.latent), batch=batch)
                benches[name] = qbench
        per_region = engine()
        per_region_plans = [compile_prompt(p, ctx) for p in PER_REGION]
        base_flops = bench.flops(None)
        for name, e in engines.items():
            # what the engine left out or warned of: a row on networks it half applied lies
            extra["problems"][name] = e.activate(compile_prompt(WORKLOAD_PROMPTS[name], ctx)) \
                + e.warnings
            extra["floors"][name] = benches[name].flops(e) / base_flops
            extra["choices"][name] = _choices(e)
            # contributions re-merged from a kept ΔW (network/deltas.py)
            extra["kept_delta"][name] = sum(e.deltas.granted(id(c)) for slot in e._unet_slots()
                                            for c in slot.contributions)
            e.deactivate()
        bench.steps(steps=2)  # warm-up
        for _ in range(repeats):
            for name, e in engines.items():
                start = time.perf_counter()
                e.activate(compile_prompt(WORKLOAD_PROMPTS[name], ctx))
                seconds[f"{name}_activate"].append(time.perf_counter() - start)
                merges = e.merges
                mine, base, switching = benches[name].steps(e.set_step)
                measured(name, mine, base)
                seconds[f"{name}_set_step"].append(switching)
                extra[f"{name}_merges_during_steps"] = e.merges - merges
                if name == "static":
                    extra.update(_change_one_strength(e, ctx, seconds))
                e.deactivate()
            measured("per_region_passes", *bench.per_region_passes(per_region, per_region_plans))
            per_region.deactivate()
    rows = {k: v for k, v in ROWS.items() if v[0] in runs and (v[1] == "base" or v[1] in runs)}
    ratio_runs = {key: [a / b for a, b in zip(runs[num], runs[den])] if den != "base" else
                  runs[num] for key, (num, den) in rows.items()}
    if quantize:  # seconds against seconds: the quantized model beside the float one merged
        ratio_runs["quantized_beside_vs_float_merged"] = [
            a / b for a, b in zip(seconds["quantized_static"], seconds["static"])]
        rows["quantized_beside_vs_float_merged"] = ("quantized_static", "static")
    ratios = {k: statistics.median(v) for k, v in ratio_runs.items()}
    spread = {k: (min(v), max(v)) for k, v in ratio_runs.items()}
    floors = extra.pop("floors")
    floors["per_region_passes"] = 2 * floors["static"]  # two passes, each with merged networks
    floor = {k: floors.get(a, 1.0) / floors.get(b, 1.0) for k, (a, b) in rows.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    cal = calibration(torch.device(device), dtype)
    return {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cores": os.cpu_count(), "torch": torch.__version__,
                        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                        "threads": torch.get_num_threads()},
            "config": {"model": setup.label, "kind": family.kind, "arch": setup.family.value,
                       "steps": setup.steps, "latent": setup.latent,
                       "shape": family.shape(setup), "batch": batch, "rank": rank, "networks": 3,
                       "dtype": str(dtype).replace("torch.", ""), "keyframes": 4,
                       "repeats": repeats, "quantized": quantize},
            "ratios": ratios, "spread": spread, "floor": floor,
            "calibration": cal.as_dict(),
            "pristine_mib": extra.pop("pristine_mib"),
            "touched_layers": extra.pop("touched_layers"),
            "timings_s": median, **extra}


# ratio name -> (numerator, denominator); "base" is each workload's own paired twin
ROWS = {"static_vs_base": ("static", "base"), "scheduled_vs_static": ("scheduled", "static"),
        "scheduled_vs_base": ("scheduled", "base"),
        "scheduled_vs_merge_only": ("scheduled", "scheduled_merge_only"),
        "remerge_every_change_vs_static": ("remerge_every_change", "static"),
        "scheduled_vs_remerge_every_change": ("scheduled", "remerge_every_change"),
        "bypass_all_vs_base": ("bypass_all", "base"), "regional_vs_base": ("regional", "base"),
        "regional_blend15_vs_base": ("regional_blend15", "base"),
        "regional_full_blend_vs_base": ("regional_full_blend", "base"),
        "per_region_passes_vs_base": ("per_region_passes", "base"),
        "regional_vs_per_region_passes": ("regional", "per_region_passes"),
        "regional_blend15_vs_per_region_passes": ("regional_blend15", "per_region_passes")}


# quantized workloads: the engine, the prompt (run on the quantized copy of the model)
QUANTIZED = {"quantized_static": (Engine, STATIC), "quantized_scheduled": (Engine, SCHEDULED),
             "quantized_requantize_every_change": (RequantizeEveryChange, SCHEDULED)}
WORKLOAD_PROMPTS = {**{name: prompt for name, (prompt, _) in WORKLOADS.items()},
                    **{name: prompt for name, (_, prompt) in QUANTIZED.items()}}
ROWS.update({"quantized_static_vs_base": ("quantized_static", "base"),
             "quantized_scheduled_vs_base": ("quantized_scheduled", "base"),
             "quantized_requantize_vs_beside": ("quantized_requantize_every_change",
                                                "quantized_scheduled")})


def _choices(e: Engine) -> Dict[str, int]:
    """How the engine runs each model layer of a plan: merged, bypassed, or both."""
    counts = {"merged": 0, "bypassed": 0, "both": 0}
    for slot in e._unet_slots():
        kinds = {c.bypass for c in slot.contributions}
        counts["both" if len(kinds) == 2 else "bypassed" if True in kinds else "merged"] += 1
    return counts


def _change_one_strength(e: Engine, ctx: CompileContext, seconds) -> dict:
    """Between two generations: the same plan again, then one network's strength changed."""
    layers_of_net1 = sum(1 for s in e._slots.values() if any(c.network == 1 for c in s.contributions))
    before = e.merges
    start = time.perf_counter()
    e.activate(compile_prompt(STATIC, ctx))
    seconds["same_plan_again"].append(time.perf_counter() - start)
    again = e.merges - before
    start = time.perf_counter()
    e.activate(compile_prompt(CHANGED, ctx))
    seconds["one_strength_changed"].append(time.perf_counter() - start)
    return {"pristine_mib": e.pristine_bytes / 2 ** 20, "touched_layers": len(e._slots),
            "change_one_strength": {"layers_remerged": e.merges - before - again,
                                    "layers_of_that_network": layers_of_net1,
                                    "layers_patched": len(e._slots),
                                    "same_plan_again_remerged": again}}


TARGETS = {"static_vs_base": "≤ 1.01", "scheduled_vs_static": "≤ 1.05",
           "scheduled_vs_merge_only": "≤ 1",
           "remerge_every_change_vs_static": "(A1111)", "bypass_all_vs_base": "(PEFT)",
           "scheduled_vs_remerge_every_change": "≤ 1",
           "regional_vs_base": "≤ 1.25", "regional_blend15_vs_base": "≤ 1.45",
           "per_region_passes_vs_base": "(RP)"}
LABELS = {"static_vs_base": "3 static LoRAs vs base",
          "scheduled_vs_static": "3 LoRAs × 4 keyframes vs static",
          "scheduled_vs_base": "3 LoRAs × 4 keyframes vs base",
          "scheduled_vs_merge_only": "  the cost model vs merging only",
          "remerge_every_change_vs_static": "baseline: re-merge all on change",
          "scheduled_vs_remerge_every_change": "  4 keyframes vs re-merge all",
          "bypass_all_vs_base": "baseline: bypass all vs base",
          "regional_vs_base": "2 regional + 1 global LoRA vs base",
          "regional_blend15_vs_base": "  the same, blended start 15 %",
          "regional_full_blend_vs_base": "  the same, every step blended",
          "per_region_passes_vs_base": "baseline: a model pass per region",
          "regional_vs_per_region_passes": "regional one pass vs pass per region",
          "regional_blend15_vs_per_region_passes": "blended start 15 % vs pass per region",
          "quantized_static_vs_base": "quantized: 3 static LoRAs beside vs base",
          "quantized_scheduled_vs_base": "quantized: 4 keyframes beside vs base",
          "quantized_requantize_vs_beside": "baseline: requantize on change vs beside",
          "quantized_beside_vs_float_merged": "quantized beside vs float merged (s)"}


def table(result: dict) -> str:
    r, t, cfg = result["ratios"], result["timings_s"], result["config"]
    c = result["change_one_strength"]
    lines = [f"{cfg['model']} {cfg['kind']}{' (quantized rows: ' + cfg['quantized'] + ')' if cfg.get('quantized') else ''}, {cfg['steps']} steps, {cfg['shape']}, batch "
             f"{cfg['batch']}, {cfg['dtype']}, {result['machine']['device']} "
             f"({result['machine']['cores']} cores, torch {result['machine']['torch']}); "
             f"median of {cfg['repeats']} runs, each step timed beside a bare twin's",
             f"  {'workload':<36}{'ratio':>7}{'spread':>15}{'floor':>7}{'above':>7}{'target':>9}"]
    for key, label in LABELS.items():
        if key not in r:
            continue
        lo, hi = result["spread"][key]
        lines.append(f"  {label:<36}{r[key]:7.3f}{f'{lo:.3f}–{hi:.3f}':>15}"
                     f"{result['floor'][key]:7.3f}{r[key] - result['floor'][key]:+7.3f}"
                     f"{TARGETS.get(key, ''):>9}")
    if "lora_key" in result:
        lines.append(f"  networks: {' + '.join(map(str, result['lora_layers']))} layers "
                     f"(attention, feed-forward, the rest), keys as {result['lora_key']}")
    said: Dict[str, List[str]] = {}  # each problem once, with the workloads it came up in
    for name, problems in result.get("problems", {}).items():
        for p in problems:
            said.setdefault(p, []).append(name)
    lines += [f"  {', '.join(names)}: {p}" for p, names in said.items()]
    lines.append("  layers (merged / bypassed / both): " + "; ".join(
        f"{name} {v['merged']}/{v['bypassed']}/{v['both']}"
        for name, v in result["choices"].items()))
    kept = {name: n for name, n in result["kept_delta"].items() if n}
    if kept:
        lines.append("  re-merged from a kept ΔW: " + "; ".join(
            f"{name} {n}" for name, n in kept.items()))
    cal = result["calibration"]
    lines.append(f"  cost model, measured here: merge {cal['merge_ns_per_mac']:.3f} ns/MAC + "
                 f"{cal['merge_us_per_layer']:.0f} µs/layer, bypass "
                 f"{cal['bypass_ns_per_mac']:.3f} "
                 f"ns/MAC + {cal['bypass_us_per_call']:.0f} µs/call, from a kept ΔW "
                 f"{cal['delta_ns_per_value'] or 0:.3f} ns/value + "
                 f"{cal['delta_us_per_layer']:.0f} µs/layer")
    switching = {name[:-len("_set_step")]: v for name, v in t.items()
                 if name.endswith("_set_step") and v >= 0.0005}
    if switching:
        lines.append("  set_step alone (the merges), per pass: " + ", ".join(
            f"{name} {1000 * v:.1f} ms" for name, v in switching.items()))
    lines += [f"  change one strength between runs: {c['layers_remerged']} layers re-merged "
              f"(that network has {c['layers_of_that_network']}, {c['layers_patched']} patched; "
              f"same plan again: {c['same_plan_again_remerged']})",
              f"  pristine copies: {result['pristine_mib']:.1f} MiB for {result['touched_layers']} "
              f"touched layers; activation {t['static_activate']:.2f} s",
              "  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()
                                        if not k.endswith("_set_step"))]
    return "\n".join(lines)
