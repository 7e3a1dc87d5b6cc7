"""Full / diff: the file stores ΔW itself (`diff`) and optionally a bias delta (`diff_b`).

    W' = W + s · diff,   b' = b + s · diff_b

No scale, no rank; linear in s (A1111, ComfyUI, LyCORIS). Bypass runs the layer's op once
more with s · diff (a second full-size matmul / conv; LyCORIS refuses bypass for this
algorithm, but the regional path needs it) and adds s · diff_b.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import Adapter, FormatError, along, channel_axis, f32, shape_error, vector_delta, weight_op


def detects(parts) -> bool:
    return "diff" in parts or "diff_b" in parts


def delta_weight(diff: Tensor, strength: float = 1.0) -> Tensor:
    """ΔW = s · diff, fp32, diff's shape."""
    return f32(diff) * strength


def bypass(x: Tensor, module, diff: Tensor, diff_b: Optional[Tensor] = None, strength: float = 1.0) -> Tensor:
    """Δy = layer_nobias(x; s·diff) + s·diff_b."""
    x = f32(x)
    dy = weight_op(module, x, delta_weight(diff.to(x.device), strength).reshape(module.weight.shape))
    if diff_b is not None:
        dy = dy + along(f32(diff_b, x.device).reshape(-1) * strength, channel_axis(module, dy), dy.dim())
    return dy


class Full(Adapter):
    algorithm = "full"
    changes_bias = True
    linear = True

    def __init__(self, diff, diff_b, ignored=()):
        super().__init__(ignored)
        self.diff, self.diff_b = diff, diff_b

    def check(self, weight_shape):
        return shape_error(self.algorithm, tuple(self.diff.shape), weight_shape)

    def rows(self, start: int, length: int) -> "Full":
        """The same network on rows [start, start + length) of the layer (algorithms/rows.py)."""
        end = start + length
        return Full(self.diff[start:end], None if self.diff_b is None else self.diff_b.reshape(-1)[start:end],
                    self.ignored)

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        return delta_weight(self.diff.to(weight.device), strength).reshape(weight.shape)

    def bias_delta(self, bias, strength=1.0):
        return vector_delta(self.algorithm, "diff_b", self.diff_b, bias, strength)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        return bypass(x, module, self.diff, self.diff_b, strength).to(y.dtype)


def from_parts(parts, default_alpha=None) -> Full:
    diff = parts.get("diff")
    if diff is None:
        raise FormatError(f"full: part 'diff' is missing (the layer has: {', '.join(sorted(parts))})")
    return Full(diff, parts.get("diff_b"), set(parts) - {"diff", "diff_b", "dora_scale"})
