"""Networks on some rows of a weight: the Flux family's fused layers (network/flux_keys.py).

A fused layer in a file (q, k, v in one `qkv`) on a host that splits it gives each host
layer some rows of its ΔW (`rows_of`); split layers in a file on a host that fuses them each
fill some rows of the host's ΔW (`Placed`). Rows of ΔW are rows of the layer's output, so
both are exact:

    ΔW_part = ΔW[a:b]                    a LoRA: up[a:b] · down, still rank r
    ΔW = [ΔW_1; ΔW_2; …]                 each at its rows, zero elsewhere; a LoRA stays a
                                         product: [U_1 0; 0 U_2] · [D_1; D_2]

An algorithm that builds ΔW from the host weight (DoRA, OFT, …) needs the weight it was
trained on: a part of the host's fused weight is exactly the split layer it was trained on
(`Placed`), but a split host layer is only part of the fused weight a fused file was
trained on, so `rows_of` refuses those.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import Adapter, FormatError, along, f32


def rows_of(adapter: Adapter, start: int, length: int, src_rows: int) -> Adapter:
    """Rows [start, start + length) of what `adapter` builds for a weight of `src_rows` rows."""
    if start == 0 and length == src_rows:
        return adapter
    own = getattr(adapter, "rows", None)
    if own is not None:
        return own(start, length)
    if adapter.uses_weight:
        raise FormatError(f"{adapter.algorithm} builds its change from the whole fused weight it "
                          "was trained on; this host splits that layer, so it cannot be applied")
    return RowsOf(adapter, start, length, src_rows)


class RowsOf(Adapter):
    """Rows of another adapter's ΔW, for algorithms whose ΔW has no per-row form (LoHa's
    Hadamard product, LoKr's Kronecker product): ΔW is built whole and sliced."""

    def __init__(self, inner: Adapter, start: int, length: int, src_rows: int):
        super().__init__(inner.ignored)
        self.inner, self.start, self.length, self.src_rows = inner, start, length, src_rows
        self.algorithm, self.linear, self.rank = inner.algorithm, inner.linear, inner.rank
        self.changes_bias = inner.changes_bias

    def _source(self, weight: Tensor) -> Tensor:
        # only the shape, dtype and device of the fused weight matter (uses_weight is False)
        return weight.new_zeros(()).expand(self.src_rows, *weight.shape[1:])

    def check(self, weight_shape):
        if int(weight_shape[0]) != self.length:
            return (f"{self.algorithm}: rows {self.start}–{self.start + self.length} of the "
                    f"network's layer do not fit a host weight of {weight_shape[0]} rows")
        return self.inner.check((self.src_rows, *weight_shape[1:]))

    def delta(self, weight, strength=1.0, dyn=None):
        full = self.inner.delta(self._source(weight), strength, dyn)
        return full[self.start:self.start + self.length]

    def low_rank(self, strength=1.0, dyn=None, device=None):
        pair = self.inner.low_rank(strength, dyn, device)
        return None if pair is None else (pair[0][self.start:self.start + self.length], pair[1])

    def bias_delta(self, bias, strength=1.0):
        source = None if bias is None else bias.new_zeros(()).expand(self.src_rows)
        d = self.inner.bias_delta(source, strength)
        return None if d is None else d[self.start:self.start + self.length]

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        return _linear_bypass(self, x, module, y, strength, dyn)


class Placed(Adapter):
    """Several adapters, each building `length` rows of a host weight of `rows` rows from
    row `dst`."""

    def __init__(self, parts: Sequence[Tuple[int, int, Adapter]], rows: int):
        super().__init__()
        self.rows = rows
        self.parts: List[Tuple[int, int, Adapter]] = sorted(parts, key=lambda p: p[0])
        adapters = [a for _, _, a in self.parts]
        self.algorithm = "+".join(dict.fromkeys(a.algorithm for a in adapters))
        self.linear = all(a.linear for a in adapters)
        self.uses_weight = any(a.uses_weight for a in adapters)
        self.changes_bias = any(a.changes_bias for a in adapters)
        ranks = [a.rank for a in adapters]
        self.rank = sum(ranks) if all(ranks) else None

    def _tensors(self):
        for _, _, a in self.parts:
            yield from a._tensors()

    def to(self, device=None, dtype=None):
        for _, _, a in self.parts:
            a.to(device, dtype)
        return self

    def check(self, weight_shape):
        if int(weight_shape[0]) != self.rows:
            return f"{self.algorithm}: built for {self.rows} rows, the host weight has {weight_shape[0]}"
        for dst, length, a in self.parts:
            if dst + length > int(weight_shape[0]):
                return (f"{a.algorithm}: rows {dst}–{dst + length} lie outside the host weight's "
                        f"{weight_shape[0]} rows")
            problem = a.check((length, *weight_shape[1:]))
            if problem:
                return problem
        return None

    def delta(self, weight, strength=1.0, dyn=None):
        out = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for dst, length, a in self.parts:
            out[dst:dst + length] = a.delta(weight[dst:dst + length], strength, dyn)
        return out

    def low_rank(self, strength=1.0, dyn=None, device=None):
        pairs = [a.low_rank(strength, dyn, device) for _, _, a in self.parts]
        if any(p is None for p in pairs):
            return None
        rank = sum(u.shape[1] for u, _ in pairs)
        up = pairs[0][0].new_zeros(self.rows, rank)  # block-diagonal: each part its own ranks
        col = 0
        for (dst, length, _), (u, _) in zip(self.parts, pairs):
            up[dst:dst + length, col:col + u.shape[1]] = u
            col += u.shape[1]
        return up, torch.cat([d for _, d in pairs])

    def costs(self, weight_shape, tokens):
        if self.rank is None or any(a.costs((length, *weight_shape[1:]), tokens) is None
                                    for _, length, a in self.parts):
            return None
        out, fan_in = int(weight_shape[0]), int(weight_shape[1])
        return out * fan_in * (self.rank + 1), tokens * self.rank * (fan_in + out)

    def bias_delta(self, bias, strength=1.0):
        if not self.changes_bias or bias is None:
            return None
        out = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for dst, length, a in self.parts:
            d = a.bias_delta(bias[dst:dst + length], strength)
            if d is not None:
                out[dst:dst + length] = d
        return out

    def bypass(self, x, module, y, strength=1.0, dyn=None):
        return _linear_bypass(self, x, module, y, strength, dyn)


def _linear_bypass(adapter: Adapter, x: Tensor, module, y: Tensor, strength: float,
                   dyn: Optional[int]) -> Tensor:
    """Δy of a Linear layer from the adapter's factors when it has them, else from ΔW."""
    x = f32(x)
    pair = adapter.low_rank(strength, dyn, x.device)
    if pair is not None and not adapter.uses_weight:
        dy = F.linear(F.linear(x, pair[1]), pair[0])
    else:
        dy = F.linear(x, adapter.delta(f32(module.weight.detach()), strength, dyn))
    b = adapter.bias_delta(getattr(module, "bias", None), strength)
    if b is not None:
        dy = dy + along(b, dy.dim() - 1, dy.dim())
    return dy.to(y.dtype)
