"""Norm: deltas for a GroupNorm / LayerNorm's affine weight (`w_norm`) and bias (`b_norm`).

    γ' = γ + s · w_norm,   β' = β + s · b_norm

Linear in s (A1111 network_norm, ComfyUI's `diff` patches, LyCORIS NormModule). Bypass:
Δy = normalize(x) · s·w_norm + s·b_norm, the normalisation recomputed without affine.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from . import Adapter, FormatError, along, f32, vector_delta


def detects(parts) -> bool:
    return "w_norm" in parts or "b_norm" in parts


def delta_weight(w_norm: Tensor, strength: float = 1.0) -> Tensor:
    """Δγ = s · w_norm, fp32."""
    return f32(w_norm) * strength


def is_rms_norm(module: nn.Module) -> bool:
    """torch's, diffusers' or an original DiT tree's RMSNorm (their classes share the name)."""
    return isinstance(module, nn.RMSNorm) or type(module).__name__ == "RMSNorm"


def affine(module: nn.Module) -> Tensor:
    """A norm's learned scale γ: `weight`, or `scale` in the original DiT trees."""
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) else module.scale


def normalized(x: Tensor, module: nn.Module) -> tuple:
    """(x normalised without affine, the axis or trailing shape γ broadcasts over)."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps), 1 if x.dim() > 1 else 0
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps), tuple(module.normalized_shape)
    if is_rms_norm(module):  # over the last axis; the original trees' eps is 1e-6
        eps = getattr(module, "eps", None)
        return F.rms_norm(x, (x.shape[-1],), None, 1e-6 if eps is None else eps), (x.shape[-1],)
    raise TypeError(f"norm: bypass needs a GroupNorm, LayerNorm or RMSNorm, got {type(module).__name__}")


def bypass(x: Tensor, module: nn.Module, w_norm: Tensor, b_norm: Optional[Tensor] = None,
           strength: float = 1.0) -> Tensor:
    """Δy = normalize(x) · s·w_norm + s·b_norm; x as the norm layer takes it."""
    z, where = normalized(f32(x), module)

    def shaped(v):
        v = f32(v, z.device) * strength
        return v.reshape(where) if isinstance(where, tuple) else along(v.reshape(-1), where, z.dim())

    dy = z * shaped(w_norm)
    return dy + shaped(b_norm) if b_norm is not None else dy


class Norm(Adapter):
    algorithm = "norm"
    changes_bias = True
    linear = True

    def __init__(self, w_norm, b_norm, ignored=()):
        super().__init__(ignored)
        self.w_norm, self.b_norm = w_norm, b_norm

    def check(self, weight_shape):
        if math.prod(int(s) for s in weight_shape) == self.w_norm.numel():
            return None
        return f"norm: 'w_norm' has {self.w_norm.numel()} entries, but the host weight is {list(weight_shape)}"

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        return delta_weight(self.w_norm.to(weight.device), strength).reshape(weight.shape)

    def bias_delta(self, bias, strength=1.0):
        return vector_delta(self.algorithm, "b_norm", self.b_norm, bias, strength)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(affine(module).shape)
        return bypass(x, module, self.w_norm, self.b_norm, strength).to(y.dtype)


def from_parts(parts, default_alpha=None) -> Norm:
    w = parts.get("w_norm")
    if w is None:
        raise FormatError(f"norm: part 'w_norm' is missing (the layer has: {', '.join(sorted(parts))})")
    b = parts.get("b_norm")
    if b is not None and b.numel() != w.numel():
        raise FormatError(f"norm: 'b_norm' {list(b.shape)} and 'w_norm' {list(w.shape)} differ in size")
    return Norm(w, b, set(parts) - {"w_norm", "b_norm"})
