"""DoRA: weight decomposition on top of another algorithm, turned on by a `dora_scale` part.

    W_c    = W + ΔW                 ΔW: the inner algorithm's delta at s = 1 (its scale applied)
    W_dora = m ⊙ W_c / ‖W_c‖        m = dora_scale, the norm on the axis m's shape names:
                                      [out, 1, ...] per output row (LyCORIS wd_on_out, PEFT)
                                      [1, in, 1, ...] per input column (kohya, old LyCORIS)
    W'(s)  = W + s · (W_dora − W)

Why this form:
- At s = 1 it is m ⊙ (W + ΔW) / ‖W + ΔW‖, the weight the file was trained to (LyCORIS module,
  LyCORIS functional, PEFT merge). ComfyUI's output-axis path normalises by ‖W‖ instead,
  which is not the trained weight.
- For s ≠ 1 the hosts disagree (formats.md 4.11). ComfyUI and LyCORIS functional
  (`apply_dora_scale`) interpolate W + s·(W_dora − W); that is linear in s, so DoRA merges
  and schedules like LoRA (`linear = True`) and is W at s = 0. LyCORIS' module form
  (W + ΔW)·(s·(m/‖·‖ − 1) + 1) leaves W + ΔW at s = 0; PEFT puts s inside ΔW and the norm.

Bypass has to materialise ΔW (the norm couples every entry of a row or column): Δy is the
layer's op with W'(s) − W, as LyCORIS' and PEFT's DoRA forwards do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import Adapter, FormatError, f32, weight_op

_EPS = torch.finfo(torch.float32).eps  # guards a zero row; as LyCORIS and ComfyUI


def axis_of(magnitude_shape, weight_shape) -> str:
    """'out' or 'in' from dora_scale's shape, or FormatError if it fits neither axis."""
    m = tuple(int(s) for s in magnitude_shape)
    out, inp = int(weight_shape[0]), int(weight_shape[1]) if len(weight_shape) > 1 else -1
    numel = 1
    for s in m:
        numel *= s
    if m and m[0] == out and numel == out:  # [out, 1, ...] or [out]; ComfyUI tests shape[0] first too
        return "out"
    if len(m) > 1 and m[0] == 1 and m[1] == inp and numel == inp:
        return "in"
    raise FormatError(
        f"dora: 'dora_scale' {list(m)} fits neither the output axis [{out}, 1, ...] nor the "
        f"input axis [1, {inp}, ...] of the host weight {list(weight_shape)}"
    )


def decompose(weight: Tensor, combined: Tensor, magnitude: Tensor) -> Tensor:
    """W_dora − W = m ⊙ W_c / ‖W_c‖ − W, fp32; the axis from magnitude's shape."""
    W, Wc = f32(weight), f32(combined)
    m = f32(magnitude, W.device)
    if axis_of(m.shape, W.shape) == "out":
        norm = Wc.reshape(Wc.shape[0], -1).norm(dim=1)
        shape = (-1,) + (1,) * (W.dim() - 1)
    else:
        norm = Wc.transpose(0, 1).reshape(Wc.shape[1], -1).norm(dim=1)
        shape = (1, -1) + (1,) * (W.dim() - 2)
    return m.reshape(shape) * Wc / (norm.reshape(shape) + _EPS) - W


def delta_weight(weight: Tensor, delta: Tensor, magnitude: Tensor, strength: float = 1.0) -> Tensor:
    """ΔW_dora(s) = s · (m ⊙ (W + ΔW) / ‖W + ΔW‖ − W); delta is the inner ΔW at s = 1."""
    W = f32(weight)
    return decompose(W, W + f32(delta, W.device), magnitude) * strength


class DoRA(Adapter):
    linear = True
    uses_weight = True

    def __init__(self, inner: Adapter, magnitude: Tensor):
        super().__init__(inner.ignored)
        self.inner, self.magnitude = inner, magnitude
        # what `inspect` reports: DoRA on a LoRA is "dora"; on another algorithm, both
        self.algorithm = "dora" if inner.algorithm == "lora" else f"{inner.algorithm}+dora"
        self.rank = inner.rank

    def check(self, weight_shape):
        msg = self.inner.check(weight_shape)
        if msg:
            return msg
        try:
            axis_of(self.magnitude.shape, weight_shape)
        except FormatError as e:
            return str(e)
        return None

    def delta(self, weight, strength=1.0, dyn=None):
        self.require(weight.shape)
        if strength == 0:
            return torch.zeros(weight.shape, device=weight.device)
        inner = self.inner.delta(weight, 1.0, dyn)
        return delta_weight(weight, inner, self.magnitude, strength)

    @property
    def changes_bias(self):
        return self.inner.changes_bias

    def bias_delta(self, bias, strength=1.0):
        return self.inner.bias_delta(bias, strength)

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        self.require(module.weight.shape)
        dw = self.delta(module.weight.detach(), strength, dyn)
        return weight_op(module, f32(x), dw).to(y.dtype)

    def __repr__(self):
        return f"<DoRA on {self.inner!r}>"


def wrap(inner: Adapter, magnitude: Tensor) -> DoRA:
    if inner.algorithm in ("ia3", "norm"):
        raise FormatError(f"dora: 'dora_scale' on {inner.algorithm} is not supported (no weight delta to decompose)")
    return DoRA(inner, magnitude)
