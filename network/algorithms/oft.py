"""Diag-OFT: a block-diagonal rotation of the layer's output channels.

    Q_k = B_k − B_kᵀ,  R_k = (I + Q_k)(I − Q_k)⁻¹   (Cayley, fp32)
    W'_k = rescale ⊙ R_kᵀ W_k  for the k-th block of b output rows;  ΔW = s · (W' − W)

Parts: `oft_blocks` [n, b, b] (kohya, LyCORIS now), or old LyCORIS `oft_diag` [n, b, b], which
holds R itself (A1111 and SD.Next read it so; one early LyCORIS build saved R − I instead,
recognised by being nearer to 0 than to I); optional `rescale` [out, 1, ...].

Constraint: alpha is not a scale. When alpha > 0 and ‖Q‖_F (over all blocks) > κ, Q is
rescaled to norm κ, with κ = alpha · out: kohya's and LyCORIS' trainers store the per-channel
constraint as alpha and multiply by out (A1111 and SD.Next load it the same way). ComfyUI
uses κ = alpha, which clamps harder than training did; we reproduce the trained weight.
`oft_diag` is already a rotation: no constraint.

Strength: ΔW = s · (rescale ⊙ RᵀW − W), linear in s. Without rescale this is ComfyUI's and
the LyCORIS module's `(s·R − s·I)ᵀ W`. With rescale, LyCORIS' module form leaves
(rescale − 1)·W at s = 0; ours is 0 at s = 0 and the trained weight at s = 1.

Bypass transforms the base output: Δy = s · (rescale ⊙ Rᵀ z − z) with z = y − bias, n·b²
multiply-adds per token instead of a weight rebuild.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import Adapter, FormatError, along, channel_axis, f32, scalar, without_bias


def detects(parts) -> bool:
    return "oft_diag" in parts or ("oft_blocks" in parts and getattr(parts["oft_blocks"], "ndim", None) != 4)


def rotation(blocks: Tensor, constraint: float = 0.0) -> Tensor:
    """Cayley rotations R [..., b, b] from the free blocks [..., b, b], with the norm clamp."""
    q = f32(blocks)
    q = q - q.transpose(-1, -2)  # skew-symmetric, so R is orthogonal
    if constraint and constraint > 0:
        norm = q.norm() + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    # (I + Q)(I − Q)⁻¹ = (I − Q)⁻¹(I + Q): the factors commute, so one solve does it.
    return torch.linalg.solve(eye - q, eye + q)


def delta_weight(weight: Tensor, R: Tensor, rescale: Optional[Tensor] = None, strength: float = 1.0) -> Tensor:
    """ΔW = s · (rescale ⊙ RᵀW − W); weight [n·b, ...], R [n, b, b], rescale [n·b] or None."""
    W = f32(weight)
    n, b, _ = R.shape
    eye = torch.eye(b, device=W.device)
    # (R − I)ᵀ W keeps the precision of a small rotation.
    turn = torch.einsum("knm,kni->kmi", f32(R, W.device) - eye, W.reshape(n, b, -1)).reshape(W.shape)
    if rescale is not None:
        m = along(f32(rescale, W.device).reshape(-1), 0, W.dim())
        turn = m * (turn + W) - W
    return turn * strength


def transform(z: Tensor, R: Tensor, rescale: Optional[Tensor], strength: float, axis: int) -> Tensor:
    """Δ = s · (rescale ⊙ Rᵀ z − z) on channel `axis` of z (the output without its bias)."""
    n, b, _ = R.shape
    zc = z.movedim(axis, -1)
    eye = torch.eye(b, device=z.device)
    turn = torch.einsum("knm,...kn->...km", f32(R, z.device) - eye, zc.reshape(*zc.shape[:-1], n, b))
    turn = turn.reshape(zc.shape)
    if rescale is not None:
        m = f32(rescale, z.device).reshape(-1)
        turn = m * (turn + zc) - zc
    return (turn * strength).movedim(-1, axis)


def bypass(x: Tensor, module, y: Tensor, R: Tensor, rescale: Optional[Tensor] = None,
           strength: float = 1.0) -> Tensor:
    """Δy for a Linear (channels last) or Conv (channels on axis 1) from its output y."""
    z = without_bias(module, f32(y))
    return transform(z, R, rescale, strength, channel_axis(module, z))


class OFT(Adapter):
    algorithm = "oft"
    uses_weight = True
    linear = True

    def __init__(self, blocks, is_rotation, alpha, rescale, ignored=()):
        super().__init__(ignored)
        self.blocks, self.is_rotation, self.alpha, self.rescale = blocks, is_rotation, alpha, rescale

    def rotation(self, device=None) -> Tensor:
        if self.is_rotation:
            d = f32(self.blocks, device)
            eye = torch.eye(d.shape[-1], device=d.device)
            # R itself, or (one early LyCORIS build) R − I: whichever it is nearer to.
            return d if (d - eye).norm() <= d.norm() else d + eye
        n, b, _ = self.blocks.shape
        return rotation(f32(self.blocks, device), self.alpha * n * b)

    def check(self, weight_shape):
        n, b, _ = self.blocks.shape
        if weight_shape and weight_shape[0] == n * b:
            return None
        return (f"oft: {n} blocks of {b} rotate {n * b} output channels, "
                f"but the host weight is {list(weight_shape)}")

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        return delta_weight(weight, self.rotation(weight.device), self.rescale, strength)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        return bypass(x, module, y, self.rotation(y.device), self.rescale, strength).to(y.dtype)


def from_parts(parts, default_alpha=None) -> OFT:
    name = "oft_blocks" if "oft_blocks" in parts else "oft_diag"
    blocks = parts.get(name)
    if blocks is None:
        raise FormatError(f"oft: part 'oft_blocks' is missing (the layer has: {', '.join(sorted(parts))})")
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise FormatError(f"oft: '{name}' must be [n, b, b], found {list(blocks.shape)}")
    rescale = parts.get("rescale")
    n, b, _ = blocks.shape
    if rescale is not None and rescale.numel() != n * b:
        raise FormatError(f"oft: 'rescale' {list(rescale.shape)} must have {n * b} entries (one per output channel)")
    alpha = scalar(parts.get("alpha")) or 0.0
    used = {"oft_blocks", "oft_diag", "alpha", "rescale", "dora_scale"}
    return OFT(blocks, name == "oft_diag", alpha, rescale, set(parts) - used)
