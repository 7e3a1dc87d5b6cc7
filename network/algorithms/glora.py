"""GLoRA: a low-rank change of the layer's input plus a low-rank additive term.

    new layout (LyCORIS now):  ΔW = s · scale · (W · a1 · a2 + b1 · b2)
        a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in(, kh, kw)], optional Tucker bm [r, r, kh, kw]
    old layout (LyCORIS old, A1111's only reading):  ΔW = s · scale · (W · a2 · a1 + b2 · b1)
        a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]

ΔW depends on W, so `delta` needs the host's original weight. The layout is read from the
shapes as ComfyUI does: the rank sits in different positions. On a square layer both
readings fit; then the rank is the smaller side of a2, and a tie goes to the new layout.

Scale: the `scale` part, else alpha / r (new: a2.shape[0], old: a1.shape[0]); 1 without alpha.
GLoRA saves alpha without the rs-LoRA fold, so an rs-LoRA GLoRA file loads with alpha / r.

Strength: s multiplies ΔW (ComfyUI, LyCORIS get_diff_weight), so linear in s.
LyCORIS' bypass also passes the layer's bias through its second base call; ours is the exact
layer'(x) − layer(x).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import (
    Adapter,
    FormatError,
    f32,
    factor_bypass_ok,
    is_conv,
    need,
    pointwise,
    rank_scale,
    shape_error,
    weight_op,
)

_PARTS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


def detects(parts) -> bool:
    return any(k in parts for k in _PARTS)


def _mat(t: Tensor, dev=None) -> Tensor:
    return f32(t, dev).reshape(t.shape[0], -1)


def old_layout(a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor) -> bool:
    """True for the old layout; FormatError when the shapes fit neither."""
    new = a1.shape[1] == a2.shape[0] == b1.shape[1] == b2.shape[0] and a1.shape[0] == a2[0].numel()
    old = a1.shape[0] == a2.shape[1] == b1.shape[0] == b2.shape[1] and a1[0].numel() == a2.shape[0]
    if new and old:
        return a2.shape[0] > a2[0].numel()  # the rank is the smaller side of a2
    if not (new or old):
        shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(_PARTS, (a1, a2, b1, b2)))
        raise FormatError(
            f"glora: factor shapes fit neither layout ({shapes}); expected a1 [in, r], a2 [r, in], "
            f"b1 [out, r], b2 [r, in] (new) or a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r] (old)"
        )
    return old


def delta_weight(weight: Tensor, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor,
                 bm: Optional[Tensor] = None, scale: float = 1.0, old: bool = False) -> Tensor:
    """ΔW = scale · (W·A + B), fp32, weight's shape; `weight` is the original [out, in(, kh, kw)]."""
    w = f32(weight)
    dev = w.device
    if old:  # everything on the flattened [out, in × kernel] weight
        wa = (w.reshape(w.shape[0], -1) @ _mat(a2, dev)) @ _mat(a1, dev)
        return ((_mat(b2, dev) @ _mat(b1, dev) + wa) * scale).reshape(weight.shape)
    # W·a1·a2 mixes the input channels only; a conv kernel stays where it is.
    wa = torch.einsum("oi...,ir->or...", w, _mat(a1, dev))
    wa = torch.einsum("or...,ri->oi...", wa, _mat(a2, dev))
    if bm is None:
        wb = (_mat(b1, dev) @ _mat(b2, dev)).reshape(weight.shape)
    else:
        wb = torch.einsum("ab...,oa,bi->oi...", f32(bm, dev), _mat(b1, dev), _mat(b2, dev))
    return (wa + wb.reshape(weight.shape)) * scale


def bypass(x: Tensor, module, a1, a2, b1, b2, bm=None, scale: float = 1.0) -> Tensor:
    """Δy = scale · (layer_nobias(A·x) + B·x) for the new layout (old layout: Linear only).

    A·x is two 1×1 / linear maps; the original weight then runs once more on it, with the
    layer's own stride / padding. B is a LoRA: its kernel factor runs with the layer's geometry.
    """
    x = f32(x)
    dev = x.device
    ax = pointwise(module, pointwise(module, x, _mat(a2, dev)), _mat(a1, dev))
    out = weight_op(module, ax, f32(module.weight.detach(), dev))
    if bm is not None:
        bx = weight_op(module, pointwise(module, x, _mat(b2, dev)), f32(bm, dev))
    elif is_conv(module):
        bx = weight_op(module, x, f32(b2, dev).reshape(b2.shape[0], -1, *module.kernel_size))
    else:
        bx = pointwise(module, x, _mat(b2, dev))
    return (out + pointwise(module, bx, _mat(b1, dev))) * scale


def bypass_old(x: Tensor, module, a1, a2, b1, b2, scale: float = 1.0) -> Tensor:
    """Old layout on a Linear: Δy = scale · (W·a2·a1·x + b2·b1·x)."""
    x = f32(x)
    dev = x.device
    ax = (x @ _mat(a1, dev).T) @ _mat(a2, dev).T
    bx = (x @ _mat(b1, dev).T) @ _mat(b2, dev).T
    return (ax @ f32(module.weight.detach(), dev).T + bx) * scale


class GLoRA(Adapter):
    algorithm = "glora"
    uses_weight = True
    linear = True

    def __init__(self, a1, a2, b1, b2, bm, scale, old, ignored=()):
        super().__init__(ignored)
        self.a1, self.a2, self.b1, self.b2, self.bm = a1, a2, b1, b2, bm
        self.scale, self.old = scale, old
        self.rank = int(a1.shape[0] if old else a2.shape[0])

    def check(self, weight_shape):
        if self.old:
            return shape_error(self.algorithm, (int(self.b2.shape[0]), int(self.b1[0].numel())),
                               weight_shape, flat=True)
        out, inp = int(self.b1.shape[0]), int(self.a1.shape[0])
        if self.bm is not None:
            msg = shape_error(self.algorithm, (out, inp, *self.bm.shape[2:]), weight_shape)
        elif self.b2.dim() > 2:
            msg = shape_error(self.algorithm, (out, *self.b2.shape[1:]), weight_shape)
        else:
            msg = shape_error(self.algorithm, (out, int(self.b2.shape[1])), weight_shape, flat=True)
        if msg is None and (len(weight_shape) < 2 or weight_shape[1] != inp):
            msg = (f"glora: 'a1.weight' {list(self.a1.shape)} mixes {inp} input channels, "
                   f"but the host weight is {list(weight_shape)}")
        return msg

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        return delta_weight(weight, self.a1, self.a2, self.b1, self.b2, self.bm, self.scale * strength, self.old)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        s = self.scale * strength
        if self.old and not is_conv(module):
            return bypass_old(x, module, self.a1, self.a2, self.b1, self.b2, s).to(y.dtype)
        if self.old or not factor_bypass_ok(module):  # rebuild ΔW for the odd cases
            return weight_op(module, f32(x), self.delta(module.weight.detach(), strength)).to(y.dtype)
        return bypass(x, module, self.a1, self.a2, self.b1, self.b2, self.bm, s).to(y.dtype)


def from_parts(parts, default_alpha=None) -> GLoRA:
    a1, a2, b1, b2 = (need(parts, n, "glora") for n in _PARTS)
    old = old_layout(a1, a2, b1, b2)
    bm = parts.get("bm.weight")
    if bm is not None and (old or tuple(bm.shape[:2]) != (b2.shape[0],) * 2 or b2[0].numel() != a1.shape[0]):
        raise FormatError(
            f"glora: Tucker 'bm.weight' {list(bm.shape)} expects [r, r, kh, kw] with a 1×1 "
            f"'b2.weight', found {list(b2.shape)}"
        )
    rank = a1.shape[0] if old else a2.shape[0]
    used = set(_PARTS) | {"bm.weight", "alpha", "scale", "dora_scale"}
    return GLoRA(a1, a2, b1, b2, bm, rank_scale(parts, rank, default_alpha), old, set(parts) - used)
