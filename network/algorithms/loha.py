"""LoHa: the Hadamard product of two low-rank products, incl. Tucker t1 / t2.

    ΔW = s · scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)          rank up to r²
    Tucker (conv): each half is t_i ×₁ w_i_a ×₂ w_i_b, with w_i_a [r, out], w_i_b [r, in]

Scale: the `scale` part, else alpha / r with r = hada_w1_b.shape[0] (ComfyUI, A1111); 1
without alpha. LyCORIS `LohaModule.get_diff_weight` applies its scale twice (formats.md 5.2);
we follow its forward and functional API, which apply it once.

Strength: s multiplies ΔW in every host, so linear in s (`linear = True`).

Bypass rebuilds ΔW and runs the layer's op once more: a Hadamard product of two rank-r
products has no factor-wise form cheaper in general (LyCORIS does the same).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Adapter, FormatError, expect_dims, f32, need, rank_scale, shape_error, weight_op

_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def detects(parts) -> bool:
    return any(k.startswith("hada_") for k in parts)


def _half(a: Tensor, b: Tensor, t: Tensor | None) -> Tensor:
    if t is None:  # a [out, r], b [r, in × kernel]
        return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)
    # Tucker: a [r, out], b [r, in], t [r, r, *kernel] -> [out, in, *kernel]
    return torch.einsum("ij...,ip,jq->pq...", t, a, b)


def delta_weight(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor, t1: Tensor | None = None,
                 t2: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """ΔW = scale · half1 ⊙ half2, fp32.

    Without Tucker: w1a, w2a [out, r]; w1b, w2b [r, in × kernel]; returns [out, in × kernel].
    Tucker: w1a, w2a [r, out]; w1b, w2b [r, in]; t1, t2 [r, r, kh, kw]; returns [out, in, kh, kw].
    """
    dev = w1a.device
    h1 = _half(f32(w1a), f32(w1b, dev), f32(t1, dev))
    h2 = _half(f32(w2a, dev), f32(w2b, dev), f32(t2, dev))
    return h1 * h2 * scale


def bypass(x: Tensor, module, w1a, w1b, w2a, w2b, t1=None, t2=None, scale: float = 1.0) -> Tensor:
    """Δy = op(x, ΔW): rebuild ΔW, then the original layer's op (stride, padding, groups kept)."""
    x = f32(x)
    dw = delta_weight(w1a.to(x.device), w1b, w2a, w2b, t1, t2, scale)
    return weight_op(module, x, dw.reshape(module.weight.shape))


class LoHa(Adapter):
    algorithm = "loha"
    linear = True

    def __init__(self, w1a, w1b, w2a, w2b, t1, t2, scale, ignored=()):
        super().__init__(ignored)
        self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2 = w1a, w1b, w2a, w2b, t1, t2
        self.scale = scale
        self.rank = int(w1b.shape[0])

    def check(self, weight_shape):
        if self.t1 is not None:
            expected = (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *self.t1.shape[2:])
            return shape_error(self.algorithm, expected, weight_shape)
        return shape_error(self.algorithm, (int(self.w1a.shape[0]), int(self.w1b[0].numel())),
                           weight_shape, flat=True)

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        d = delta_weight(self.w1a.to(weight.device), self.w1b, self.w2a, self.w2b, self.t1, self.t2,
                         self.scale * strength)
        return d.reshape(weight.shape)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        return bypass(x, module, self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2,
                      self.scale * strength).to(y.dtype)


def from_parts(parts, default_alpha=None) -> LoHa:
    w1a, w1b, w2a, w2b = (need(parts, n, "loha") for n in _PARTS)
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    if (t1 is None) != (t2 is None):
        raise FormatError("loha: Tucker needs both 'hada_t1' and 'hada_t2', found only one")
    for name, t in zip(_PARTS, (w1a, w1b, w2a, w2b)):
        expect_dims(t, (2,) if t1 is not None else (2, 3, 4, 5), "loha", name)
    r = w1b.shape[0]
    if t1 is None:
        ok = (w1a.shape[1] == r and w2a.shape[1] == w2b.shape[0]
              and w1a.shape[0] == w2a.shape[0] and w1b[0].numel() == w2b[0].numel())
        hint = "hada_w*_a [out, r], hada_w*_b [r, in]"
    else:
        r2 = w2b.shape[0]
        ok = (w1a.shape[0] == r and tuple(t1.shape[:2]) == (r, r) and tuple(t2.shape[:2]) == (r2, r2)
              and w2a.shape[0] == r2 and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1]
              and t1.shape[2:] == t2.shape[2:])
        hint = "Tucker: hada_w*_a [r, out], hada_w*_b [r, in], hada_t* [r, r, kh, kw]"
    if not ok:
        shapes = ", ".join(f"{n} {list(parts[n].shape)}" for n in sorted(parts) if n.startswith("hada_"))
        raise FormatError(f"loha: inconsistent factor shapes ({shapes}); expected {hint}")
    used = set(_PARTS) | {"hada_t1", "hada_t2", "alpha", "scale", "dora_scale"}
    return LoHa(w1a, w1b, w2a, w2b, t1, t2, rank_scale(parts, r, default_alpha), set(parts) - used)
