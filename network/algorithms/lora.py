"""LoRA / LoCon, incl. Tucker `lora_mid`; diffusers / PEFT `lora_A` / `lora_B` are the same math.

    ΔW = s · scale · up · down                  (Linear, Conv with the kernel in `down`)
    ΔW = s · scale · mid ×₁ up ×₂ down          (Tucker: the kernel in `mid`)

Scale: the `scale` part, else alpha / r with r = down.shape[0]; 1 without alpha (A1111,
ComfyUI, kohya, LyCORIS all agree). PEFT files carry no alpha: the caller passes lora_alpha
from metadata as default_alpha.

Strength: every host multiplies ΔW by s, so linear in s (`linear = True`).

dyn (A1111 DyLoRA): keep the first `dyn` ranks, up[:, :dyn] @ down[:dyn], with the scale of
the full rank, as A1111's rebuild_conventional. With Tucker, mid[:dyn, :dyn] too (A1111
ignores dyn there; slicing every factor is the only reading that keeps a rank-dyn network).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import (
    Adapter,
    FormatError,
    expect_dims,
    f32,
    factor_bypass_ok,
    is_conv,
    need,
    pointwise,
    rank_scale,
    shape_error,
    weight_op,
)

# (down, up) part names in the spellings hosts accept.
_NAMES = (
    ("lora_down.weight", "lora_up.weight"),  # kohya / LyCORIS
    ("lora_A.weight", "lora_B.weight"),  # PEFT / diffusers
    ("lora_A", "lora_B"),  # PEFT without `.weight` (ComfyUI's Mochi spelling)
)
_MARKERS = {n for pair in _NAMES for n in pair} | {"lora_mid.weight"}


def detects(parts) -> bool:
    return any(k in parts for k in _MARKERS)


def _truncate(down: Tensor, up: Tensor, mid: Optional[Tensor], dyn: Optional[int]):
    if dyn is None or not 0 < dyn < down.shape[0]:
        return down, up, mid
    return down[:dyn], up[:, :dyn], (None if mid is None else mid[:dyn, :dyn])


def delta_weight(down: Tensor, up: Tensor, mid: Optional[Tensor] = None, scale: float = 1.0,
                 dyn: Optional[int] = None) -> Tensor:
    """ΔW = scale · up ⋅ (mid) ⋅ down, fp32.

    down [r, in(, kh, kw)] (Tucker: [r, in(, 1, 1)]), up [out, r(, 1, 1)], mid [r, r, kh, kw].
    Returns [out, in, *kernel] with the kernel of `mid` (Tucker) or `down`.
    """
    down, up, mid = _truncate(f32(down), f32(up), f32(mid, down.device), dyn)
    u = up.reshape(up.shape[0], -1)  # [out, r]
    if mid is None:
        w = (u @ down.reshape(down.shape[0], -1)).reshape(u.shape[0], *down.shape[1:])
    else:
        d = down.reshape(down.shape[0], -1)  # [r, in]
        w = torch.einsum("ab...,oa,bi->oi...", mid, u, d)
    return w * scale


def bypass(x: Tensor, module: nn.Module, down: Tensor, up: Tensor, mid: Optional[Tensor] = None,
           scale: float = 1.0, dyn: Optional[int] = None) -> Tensor:
    """Δy = scale · up(mid(down(x))), never building ΔW: 2 GEMMs (3 convs with Tucker).

    x [..., in] (Linear) or [N, in, *spatial] (Conv). The factor that carries the kernel
    runs with the original conv's stride / padding / dilation; the others are 1×1.
    """
    x = f32(x)
    down, up, mid = _truncate(f32(down, x.device), f32(up, x.device), f32(mid, x.device), dyn)
    if not is_conv(module):
        h = x @ down.reshape(down.shape[0], -1).T
        return (h @ up.reshape(up.shape[0], -1).T) * scale
    if mid is not None:
        h = pointwise(module, x, down)
        h = weight_op(module, h, mid)
    else:
        kernel = down.reshape(down.shape[0], -1, *module.kernel_size)
        h = weight_op(module, x, kernel)
    return pointwise(module, h, up) * scale


class LoRA(Adapter):
    algorithm = "lora"
    linear = True

    def __init__(self, down, up, mid, scale, ignored=()):
        super().__init__(ignored)
        self.down, self.up, self.mid, self.scale = down, up, mid, scale
        self.rank = int(down.shape[0])

    def _expected(self):
        out, inp = int(self.up.shape[0]), int(self.down.shape[1])
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return (out, inp, *kernel)

    def check(self, weight_shape):
        return shape_error(self.algorithm, self._expected(), weight_shape)

    def rows(self, start: int, length: int) -> "LoRA":
        """The same network on rows [start, start + length) of the layer (algorithms/rows.py)."""
        return LoRA(self.down, self.up[start:start + length], self.mid, self.scale, self.ignored)

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        d = delta_weight(self.down.to(weight.device), self.up.to(weight.device),
                         None if self.mid is None else self.mid.to(weight.device),
                         self.scale * strength, dyn)
        return d.reshape(weight.shape)

    def costs(self, weight_shape, tokens):
        if self.mid is not None:
            return None
        out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
        return out * fan_in * (self.rank + 1), tokens * self.rank * (fan_in + out)

    def low_rank(self, strength=1.0, dyn=None, device=None):
        if self.mid is not None:
            return None  # Tucker: three factors
        down, up, _ = _truncate(self.down, self.up, None, dyn)
        u = f32(up, device).reshape(up.shape[0], -1) * (self.scale * strength)
        return u, f32(down, device).reshape(down.shape[0], -1)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        if not factor_bypass_ok(module):  # grouped conv: factors cannot run per group
            return weight_op(module, f32(x), self.delta(f32(module.weight.detach()), strength, dyn)).to(y.dtype)
        return bypass(x, module, self.down, self.up, self.mid, self.scale * strength, dyn).to(y.dtype)


def from_parts(parts, default_alpha=None) -> LoRA:
    for down_name, up_name in _NAMES:
        if down_name in parts or up_name in parts:
            break
    else:
        raise FormatError(f"lora: 'lora_mid.weight' without 'lora_down.weight' / 'lora_up.weight' ({sorted(parts)})")
    down = need(parts, down_name, "lora", f" ('{up_name}' needs it)")
    up = need(parts, up_name, "lora", f" ('{down_name}' needs it)")
    mid = parts.get("lora_mid.weight")
    expect_dims(down, (2, 3, 4, 5), "lora", down_name)
    expect_dims(up, (2, 3, 4, 5), "lora", up_name)
    r = down.shape[0]
    if up.shape[1] != r or any(s != 1 for s in up.shape[2:]):
        raise FormatError(
            f"lora: '{up_name}' has shape {list(up.shape)}; expected [out, {r}(, 1, 1)] "
            f"to match '{down_name}' {list(down.shape)}"
        )
    if mid is not None:
        if mid.dim() < 3 or tuple(mid.shape[:2]) != (r, r) or any(s != 1 for s in down.shape[2:]):
            raise FormatError(
                f"lora: Tucker 'lora_mid.weight' {list(mid.shape)} expects [{r}, {r}, kh, kw] "
                f"and a 1×1 '{down_name}', found {list(down.shape)}"
            )
    used = {down_name, up_name, "lora_mid.weight", "alpha", "scale", "dora_scale"}
    return LoRA(down, up, mid, rank_scale(parts, r, default_alpha), set(parts) - used)
