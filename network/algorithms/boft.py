"""BOFT (butterfly OFT): m stages of block rotations, each on a butterfly-permuted channel order.

    oft_blocks [m, n, b, b] (b even, n·b = out), optional rescale [out, 1, ...]
    stage i (k = 2^i · b/2): view the channels as (groups, 2, k), swap to (groups, k, 2),
    rotate consecutive blocks of b by R_i (v ← R_i v), undo the swap.
    W' = rescale ⊙ (stage_m ∘ … ∘ stage_1)(W)  along the output rows;  ΔW = W' − W

R_i is the Cayley rotation of stage i (see oft.py), with alpha a constraint κ = alpha · out
on ‖Q‖_F over all stages, as the LyCORIS trainer applies it (ComfyUI uses κ = alpha).
The rotation acts as R_i v (LyCORIS, ComfyUI), not R_iᵀ v as diag-OFT does.

Strength: per stage R_i ← s·R_i + (1 − s)·I (ComfyUI, LyCORIS module and functional), so
the result is a product of s-dependent factors: NOT linear in s (`linear = False`); the
engine has to rebuild it for each strength. rescale is treated as one more such factor,
1 + s·(rescale − 1), so that s = 0 gives ΔW = 0 (LyCORIS applies it whole at any s).

Bypass applies the same stages to the base output without its bias: Δy = M_s(z) − z.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import Adapter, FormatError, channel_axis, f32, scalar, without_bias
from .oft import rotation


def detects(parts) -> bool:
    # Only the rank of oft_blocks tells BOFT from diag-OFT; names-only callers get "oft".
    return "oft_blocks" in parts and getattr(parts["oft_blocks"], "ndim", None) == 4


def butterfly(v: Tensor, R: Tensor, rescale: Optional[Tensor] = None, strength: float = 1.0) -> Tensor:
    """Apply the m butterfly stages to the channel vectors on v's last axis.

    v [..., n·b]; R [m, n, b, b] rotations; rescale [n·b] or None. Returns M_s(v), fp32.
    """
    m, n, b, _ = R.shape
    lead, c = v.shape[:-1], v.shape[-1]
    eye = torch.eye(b, device=v.device)
    for i in range(m):
        r = R[i] if strength == 1 else strength * R[i] + (1 - strength) * eye
        k = (b // 2) << i
        # Pair channel j with j + k inside every group of 2k, then rotate blocks of b.
        h = v.reshape(*lead, c // (2 * k), 2, k).transpose(-1, -2).reshape(*lead, n, b)
        h = torch.einsum("kij,...kj->...ki", r, h)
        v = h.reshape(*lead, c // (2 * k), k, 2).transpose(-1, -2).reshape(*lead, c)
    if rescale is not None:
        v = v * (1 + strength * (f32(rescale, v.device).reshape(-1) - 1))
    return v


def delta_weight(weight: Tensor, R: Tensor, rescale: Optional[Tensor] = None, strength: float = 1.0) -> Tensor:
    """ΔW = M_s(W) − W on the output rows; weight [n·b, ...], R [m, n, b, b]."""
    W = f32(weight)
    cols = W.reshape(W.shape[0], -1).T  # every column is a vector of output channels
    return (butterfly(cols, f32(R, W.device), rescale, strength).T - cols.T).reshape(W.shape)


def bypass(x: Tensor, module, y: Tensor, R: Tensor, rescale: Optional[Tensor] = None,
           strength: float = 1.0) -> Tensor:
    """Δy = M_s(z) − z with z = y − bias, on the layer's channel axis."""
    z = without_bias(module, f32(y))
    axis = channel_axis(module, z)
    zc = z.movedim(axis, -1)
    return (butterfly(zc, f32(R, z.device), rescale, strength) - zc).movedim(-1, axis)


class BOFT(Adapter):
    algorithm = "boft"
    uses_weight = True
    linear = False

    def __init__(self, blocks, alpha, rescale, ignored=()):
        super().__init__(ignored)
        self.blocks, self.alpha, self.rescale = blocks, alpha, rescale

    def rotations(self, device=None) -> Tensor:
        m, n, b, _ = self.blocks.shape
        return rotation(f32(self.blocks, device), self.alpha * n * b)

    def check(self, weight_shape):
        m, n, b, _ = self.blocks.shape
        if weight_shape and weight_shape[0] == n * b:
            return None
        return (f"boft: {n} blocks of {b} rotate {n * b} output channels, "
                f"but the host weight is {list(weight_shape)}")

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        return delta_weight(weight, self.rotations(weight.device), self.rescale, strength)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        return bypass(x, module, y, self.rotations(y.device), self.rescale, strength).to(y.dtype)


def from_parts(parts, default_alpha=None) -> BOFT:
    blocks = parts.get("oft_blocks")
    if blocks is None or blocks.dim() != 4 or blocks.shape[2] != blocks.shape[3]:
        found = "nothing" if blocks is None else list(blocks.shape)
        raise FormatError(f"boft: 'oft_blocks' must be [m, n, b, b], found {found}")
    m, n, b, _ = blocks.shape
    if b % 2 or n % (1 << (m - 1)):
        raise FormatError(
            f"boft: 'oft_blocks' {list(blocks.shape)} is not a butterfly: the block size must be even "
            f"and the {n} blocks divisible by 2^(m−1) = {1 << (m - 1)}"
        )
    rescale = parts.get("rescale")
    if rescale is not None and rescale.numel() != n * b:
        raise FormatError(f"boft: 'rescale' {list(rescale.shape)} must have {n * b} entries (one per output channel)")
    alpha = scalar(parts.get("alpha")) or 0.0
    return BOFT(blocks, alpha, rescale, set(parts) - {"oft_blocks", "alpha", "rescale", "dora_scale"})
