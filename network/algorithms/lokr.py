"""LoKr: a Kronecker product of two factors, each full or low-rank; Tucker for the conv factor.

    ΔW = s · scale · W1 ⊗ W2,   W1 [a, c] = lokr_w1 | lokr_w1_a @ lokr_w1_b
                                W2 [b, d(, k)] = lokr_w2 | lokr_w2_a @ lokr_w2_b | t2 ×₁ w2_a ×₂ w2_b
    out = a·b, in = c·d; the conv kernel always lives in W2.

Scale: the `scale` part; else alpha / r only when a factor is decomposed, r being that
factor's rank (w2_b.shape[0], else w1_b.shape[0], as A1111 reads it). With both factors full
the scale is 1 whatever alpha says: LyCORIS trains them with alpha forced to the rank,
ComfyUI and LyCORIS functional agree. (LyCORIS functional reads the Tucker rank from
w2_a.shape[1], which is `b`, not r; we follow the module, which is how files were trained.)

Strength: s multiplies ΔW everywhere, so linear in s (`linear = True`).

Bypass never builds the Kronecker product: with x viewed as X [c, d], ΔW·x = W1 · X · W2ᵀ, i.e.
W2 (or its factors) along d, then W1 along c. Convs fold c into the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import (
    Adapter,
    FormatError,
    f32,
    factor_bypass_ok,
    is_conv,
    pointwise,
    rank_scale,
    shape_error,
    weight_op,
)


def detects(parts) -> bool:
    return any(k.startswith("lokr_") for k in parts)


def _w1(w1, w1a, w1b, dev) -> Tensor:
    return f32(w1, dev) if w1 is not None else f32(w1a, dev) @ f32(w1b, dev)


def _w2_flat(w2, w2a, w2b, t2, dev) -> Tensor:
    """W2 as [b, d × kernel]."""
    if w2 is not None:
        return f32(w2, dev).reshape(w2.shape[0], -1)
    if t2 is None:  # w2a [b, r], w2b [r, d × kernel]
        return f32(w2a, dev) @ f32(w2b, dev).reshape(w2b.shape[0], -1)
    # Tucker: t2 [r, r, *kernel], w2a [r, b], w2b [r, d]
    w = torch.einsum("ij...,ip,jq->pq...", f32(t2, dev), f32(w2a, dev), f32(w2b, dev))
    return w.reshape(w.shape[0], -1)


def delta_weight(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None,
                 scale: float = 1.0) -> Tensor:
    """ΔW = scale · W1 ⊗ W2, fp32, as [a·b, c·d·kernel] (reshape to the host weight).

    Flattening W2's kernel into its columns gives the same entries as the 4-D Kronecker
    product: column j1·(d·K) + j2 of the 2-D product is input channel j1·d + j2 // K.
    """
    dev = next(t.device for t in (w1, w1a, w2, w2a) if t is not None)
    return torch.kron(_w1(w1, w1a, w1b, dev), _w2_flat(w2, w2a, w2b, t2, dev)) * scale


def _apply_w2(module, h: Tensor, w2, w2a, w2b, t2, d: int) -> Tensor:
    """W2 along the last axis (Linear) or as a conv on [N·c, d, *spatial]."""
    dev = h.device
    if not is_conv(module):
        if w2 is not None:
            return h @ f32(w2, dev).reshape(w2.shape[0], -1).T
        return (h @ f32(w2b, dev).reshape(w2b.shape[0], -1).T) @ f32(w2a, dev).T
    if w2 is not None:
        return weight_op(module, h, f32(w2, dev).reshape(w2.shape[0], d, *module.kernel_size))
    if t2 is None:
        k = f32(w2b, dev).reshape(w2b.shape[0], d, *module.kernel_size)
        return pointwise(module, weight_op(module, h, k), f32(w2a, dev))
    h = pointwise(module, h, f32(w2b, dev))  # [r, d]
    h = weight_op(module, h, f32(t2, dev))  # the kernel, with the layer's stride / padding
    return pointwise(module, h, f32(w2a, dev).T)  # [b, r]


def bypass(x: Tensor, module, w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None,
           scale: float = 1.0) -> Tensor:
    """Δy = scale · W1 · X · W2ᵀ without the Kronecker product.

    Linear: x [..., c·d] -> [..., a·b]. Conv: x [N, c·d, *spatial] -> [N, a·b, *spatial'].
    Costs c·d·b + c·b·a multiply-adds per token (plus the rank factors) instead of in·out.
    """
    x = f32(x)
    W1 = _w1(w1, w1a, w1b, x.device)  # [a, c]
    a, c = W1.shape
    if not is_conv(module):
        h = x.reshape(*x.shape[:-1], c, -1)  # [..., c, d]
        h = _apply_w2(module, h, w2, w2a, w2b, t2, h.shape[-1])  # [..., c, b]
        y = torch.matmul(W1, h)  # [..., a, b]
        return y.reshape(*x.shape[:-1], -1) * scale
    n, cd, *spatial = x.shape
    h = x.reshape(n * c, cd // c, *spatial)
    h = _apply_w2(module, h, w2, w2a, w2b, t2, cd // c)  # [N·c, b, *spatial']
    h = h.reshape(n, c, *h.shape[1:])
    y = torch.einsum("ac,ncb...->nab...", W1, h)
    return y.reshape(n, -1, *y.shape[3:]) * scale


class LoKr(Adapter):
    algorithm = "lokr"
    linear = True

    def __init__(self, factors: dict, scale: float, rank, ignored=()):
        super().__init__(ignored)
        self.w1, self.w1a, self.w1b = factors["w1"], factors["w1a"], factors["w1b"]
        self.w2, self.w2a, self.w2b, self.t2 = factors["w2"], factors["w2a"], factors["w2b"], factors["t2"]
        self.scale, self.rank = scale, rank

    def _factors(self):
        return dict(w1=self.w1, w1a=self.w1a, w1b=self.w1b, w2=self.w2, w2a=self.w2a, w2b=self.w2b, t2=self.t2)

    def _dims(self):
        a, c = (self.w1.shape if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1]))
        if self.w2 is not None:
            b, d, kernel = self.w2.shape[0], self.w2.shape[1], tuple(self.w2.shape[2:])
        elif self.t2 is not None:
            b, d, kernel = self.w2a.shape[1], self.w2b.shape[1], tuple(self.t2.shape[2:])
        else:
            b, d, kernel = self.w2a.shape[0], self.w2b[0].numel(), None  # d × kernel, folded
        return int(a), int(b), int(c), int(d), kernel

    def check(self, weight_shape):
        a, b, c, d, kernel = self._dims()
        if kernel is None or (self.w2 is not None and self.w2.dim() == 2):
            return shape_error(self.algorithm, (a * b, c * d), weight_shape, flat=True)
        return shape_error(self.algorithm, (a * b, c * d, *kernel), weight_shape)

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        f = {k: (v.to(weight.device) if v is not None else None) for k, v in self._factors().items()}
        return delta_weight(**f, scale=self.scale * strength).reshape(weight.shape)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        batched = not is_conv(module) or x.dim() == len(module.kernel_size) + 2
        if not (factor_bypass_ok(module) and batched):  # grouped / unbatched conv: rebuild ΔW
            return weight_op(module, f32(x), self.delta(f32(module.weight.detach()), strength)).to(y.dtype)
        return bypass(x, module, **self._factors(), scale=self.scale * strength).to(y.dtype)


def from_parts(parts, default_alpha=None) -> LoKr:
    g = parts.get
    f = dict(w1=g("lokr_w1"), w1a=g("lokr_w1_a"), w1b=g("lokr_w1_b"),
             w2=g("lokr_w2"), w2a=g("lokr_w2_a"), w2b=g("lokr_w2_b"), t2=g("lokr_t2"))
    for i in ("1", "2"):
        full, pa, pb = f[f"w{i}"], f[f"w{i}a"], f[f"w{i}b"]
        if full is None and (pa is None or pb is None):
            raise FormatError(
                f"lokr: factor {i} needs 'lokr_w{i}' or both 'lokr_w{i}_a' and 'lokr_w{i}_b' "
                f"(the layer has: {', '.join(sorted(parts))})"
            )
        if full is not None and (pa is not None or pb is not None):
            raise FormatError(f"lokr: factor {i} is given both full ('lokr_w{i}') and decomposed")
        if full is None and pa.shape[1 if (i == "1" or f['t2'] is None) else 0] != pb.shape[0]:
            raise FormatError(
                f"lokr: 'lokr_w{i}_a' {list(pa.shape)} and 'lokr_w{i}_b' {list(pb.shape)} disagree on the rank"
            )
    if f["w1"] is not None:
        if f["w1"].dim() > 2 and any(s != 1 for s in f["w1"].shape[2:]):
            raise FormatError(f"lokr: 'lokr_w1' {list(f['w1'].shape)} must be 2-D; the kernel belongs to w2")
        f["w1"] = f["w1"].reshape(f["w1"].shape[0], f["w1"].shape[1])
    if f["t2"] is not None:
        if f["w2"] is not None:
            raise FormatError("lokr: 'lokr_t2' needs a decomposed factor 2 ('lokr_w2_a', 'lokr_w2_b'), not 'lokr_w2'")
        r = f["w2b"].shape[0]
        if (f["t2"].dim() < 3 or tuple(f["t2"].shape[:2]) != (r, r)
                or f["w2a"].dim() != 2 or f["w2b"].dim() != 2 or f["w2a"].shape[0] != r):
            raise FormatError(
                f"lokr: Tucker expects lokr_t2 [r, r, kh, kw], lokr_w2_a [r, b], lokr_w2_b [r, d]; found "
                f"{list(f['t2'].shape)}, {list(f['w2a'].shape)}, {list(f['w2b'].shape)}"
            )
    # The rank that alpha refers to: the decomposed factor's (w2 wins, as in A1111).
    rank = (int(f["w2b"].shape[0]) if f["w2"] is None
            else int(f["w1b"].shape[0]) if f["w1"] is None else None)
    scale = rank_scale(parts, rank, default_alpha)  # rank None (both full): 1 unless a `scale` part
    used = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
            "alpha", "scale", "dora_scale"}
    return LoKr(f, scale, rank, set(parts) - used)
