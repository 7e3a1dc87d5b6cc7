"""IA³: a learned per-channel rescale of the layer's outputs (or, with `on_input`, its inputs).

    ΔW = s · w ⊙ W      along output rows, or along input columns when on_input

so W' = W ⊙ (1 + s·w), as LyCORIS (`_ia3_weight`) and A1111 (`orig_weight * w`, times s).
There is no alpha and no rank. Strength: linear in s.

Bypass: output mode scales W·x (the output without its bias, so it equals the merged layer;
LyCORIS' bypass scales the bias too); input mode runs the weight once more on s·w ⊙ x.
"""

from __future__ import annotations

from torch import Tensor

from . import Adapter, FormatError, along, channel_axis, f32, scalar, weight_op, without_bias


def detects(parts) -> bool:
    return "on_input" in parts or set(parts) == {"weight"}


def delta_weight(weight: Tensor, w: Tensor, on_input: bool = False, strength: float = 1.0) -> Tensor:
    """ΔW = s · w ⊙ W; weight [out, in(, kh, kw)], w [out] (or [in] with on_input)."""
    W = f32(weight)
    v = f32(w, W.device).reshape(-1) * strength
    return W * along(v, 1 if on_input else 0, W.dim())


def bypass(x: Tensor, module, y: Tensor, w: Tensor, on_input: bool = False, strength: float = 1.0) -> Tensor:
    """Δy = s·w ⊙ (y − b) (output mode), or layer_nobias(s·w ⊙ x) (input mode)."""
    v = f32(w, x.device).reshape(-1) * strength
    if on_input:
        x = f32(x)
        return weight_op(module, x * along(v, channel_axis(module, x), x.dim()), f32(module.weight.detach(), x.device))
    z = without_bias(module, f32(y))
    return z * along(v, channel_axis(module, z), z.dim())


class IA3(Adapter):
    algorithm = "ia3"
    uses_weight = True
    linear = True

    def __init__(self, w, on_input, ignored=()):
        super().__init__(ignored)
        self.w, self.on_input = w, on_input

    def check(self, weight_shape):
        axis = 1 if self.on_input else 0
        if len(weight_shape) > axis and weight_shape[axis] == self.w.numel():
            return None
        return (f"ia3: 'weight' has {self.w.numel()} entries for the {'input' if self.on_input else 'output'} "
                f"channels, but the host weight is {list(weight_shape)}")

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        return delta_weight(weight, self.w, self.on_input, strength)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        return bypass(x, module, y, self.w, self.on_input, strength).to(y.dtype)


def from_parts(parts, default_alpha=None) -> IA3:
    w = parts.get("weight")
    if w is None:
        raise FormatError(f"ia3: part 'weight' is missing (the layer has: {', '.join(sorted(parts))})")
    if sum(s != 1 for s in w.shape) > 1:
        raise FormatError(f"ia3: 'weight' must be a vector (e.g. [out] or [1, out, 1, 1]), found {list(w.shape)}")
    on_input = bool(scalar(parts.get("on_input")) or 0)
    return IA3(w.reshape(-1), on_input, set(parts) - {"weight", "on_input"})
