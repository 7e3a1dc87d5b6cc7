"""Model-as-LoRA: another checkpoint's weight as a full-rank contribution.

    ΔW = s · (W_target − W),  b' − b = s · (b_target − b)      W: the host's original weight

so s = 1 gives the other model's layer and 0 < s < 1 blends toward it (docs/design.md §3 `<model:…>`,
ComfyUI's model_as_lora). The target tensor stays in its memory-mapped file and is read only
when a layer is merged, one layer at a time: two full models never sit in memory together.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from . import Adapter, along, channel_axis, f32, norm, shape_error, weight_op

NORMS = (nn.GroupNorm, nn.LayerNorm)

Source = Tuple[object, str, Optional[Tuple[int, int]]]  # (SafeFile, key, (first row, rows))


def delta_weight(target: Tensor, weight: Tensor, strength: float = 1.0) -> Tensor:
    """ΔW = s · (target − weight), fp32, weight's shape."""
    return (f32(target, weight.device) - f32(weight)) * strength


def bypass(x: Tensor, module, target: Tensor, weight: Tensor, strength: float = 1.0) -> Tensor:
    """Δy = layer_nobias(x; s·(target − weight)): one more full-size op (full rank)."""
    return weight_op(module, f32(x), delta_weight(target, weight, strength).reshape(weight.shape))


def _read(source: Source) -> Tensor:
    file, key, rows = source
    t = file.get(key)
    return t if rows is None else t.narrow(0, rows[0], rows[1])


class CheckpointDelta(Adapter):
    algorithm = "model"
    changes_bias = True
    uses_weight = True
    linear = True

    def __init__(self, weight: Source, bias: Optional[Source] = None):
        super().__init__()
        self.source, self.bias_source = weight, bias

    @property
    def nbytes(self) -> int:
        return 0  # nothing held: read from the file when needed

    def check(self, weight_shape):
        file, key, rows = self.source
        shape = list(file.shape(key))
        if rows is not None:
            if rows[0] + rows[1] > shape[0]:
                return f"{self.algorithm}: '{key}' has {shape[0]} rows, not {rows[0] + rows[1]}"
            shape[0] = rows[1]
        return shape_error(self.algorithm, tuple(shape), weight_shape)

    def rows(self, start: int, length: int) -> "CheckpointDelta":
        """Rows [start, start + length) of the file's tensors (algorithms/rows.py)."""
        def narrow(source):
            if source is None:
                return None
            file, key, rows = source
            return file, key, (start + (rows[0] if rows else 0), length)
        return CheckpointDelta(narrow(self.source), narrow(self.bias_source))

    def delta(self, weight, strength=1.0, dyn=None):
        return delta_weight(_read(self.source), weight, strength).reshape(weight.shape)

    def bias_delta(self, bias, strength=1.0):
        if self.bias_source is None or bias is None:
            return None
        return delta_weight(_read(self.bias_source), bias, strength)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        if isinstance(module, NORMS) or norm.is_rms_norm(module):  # normalize(x)·Δγ + Δβ
            w = norm.affine(module).detach()
            b = getattr(module, "bias", None)
            return norm.bypass(x, module, delta_weight(_read(self.source), w, strength),
                               None if b is None else self.bias_delta(b.detach(), strength)).to(y.dtype)
        out = bypass(x, module, _read(self.source), module.weight, strength)
        b = self.bias_delta(getattr(module, "bias", None), strength)
        if b is not None:
            out = out + along(b, channel_axis(module, out), out.dim())
        return out.to(y.dtype)
