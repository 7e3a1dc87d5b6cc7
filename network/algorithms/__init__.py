"""Weight math for every LoRA-family algorithm: one module per algorithm, one front here.

Each algorithm module has two pure functions in the style of LyCORIS' functional API:
`delta_weight(...)` builds ΔW (fp32, shaped like the host weight) and `bypass(...)` computes
the output delta Δy = layer'(x) − layer(x) for the engine's regional / per-row path. Its
`Adapter` subclass binds one network's tensors for one host module.

This file is the uniform interface the engine calls:

    detect(parts)              -> algorithm name from one layer's part names, or None
    make(parts, default_alpha) -> Adapter (DoRA wraps it when the layer has `dora_scale`)

`parts` maps the key suffixes after the layer name ("lora_down.weight", "alpha", ...) to
tensors. Tensors stay in the dtype they were loaded in (fp16 files stay half the size in RAM)
and are cast to fp32 on the compute device at every call.

Strength `s` and `scale` are kept apart: `scale` is the file's own factor (`scale` part, or
alpha / rank), `s` the user strength. Every adapter gives ΔW = 0 at s = 0 and the trained
weight at s = 1; `Adapter.linear` says whether ΔW(s) = s · ΔW(1) exactly (see each module).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FormatError", "Adapter", "detect", "make", "ALGORITHMS"]


class FormatError(ValueError):
    """A layer's tensors are missing, inconsistent, or do not fit the host weight."""


# ---------------------------------------------------------------- helpers shared by the modules


def f32(t: Optional[Tensor], device=None) -> Optional[Tensor]:
    """The tensor in fp32 on `device` (no copy when it already is)."""
    if t is None:
        return None
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


def scalar(t) -> Optional[float]:
    """A per-layer scalar part (`alpha`, `scale`, `on_input`) as a float."""
    if t is None:
        return None
    if isinstance(t, Tensor):
        if t.numel() != 1:
            raise FormatError(f"expected a scalar, found a tensor of shape {list(t.shape)}")
        return float(t.reshape(-1)[0].float().item())
    return float(t)


def rank_scale(parts: Mapping[str, Tensor], rank: Optional[int], default_alpha: Optional[float]) -> float:
    """The file's own factor for rank-based algorithms (LoRA, LoHa, LoKr, GLoRA).

    A `scale` part wins (A1111 `calc_scale`); else alpha / rank. No alpha (and no
    default_alpha from metadata) gives 1, as in A1111 and ComfyUI. alpha = 0 also gives 1:
    kohya and LyCORIS train alpha 0 as "alpha = rank", so that is how such a file was trained.
    rs-LoRA needs nothing here: LyCORIS saves alpha·√r, so alpha_saved / r = alpha / √r.
    """
    if "scale" in parts:
        return scalar(parts["scale"])
    alpha = scalar(parts.get("alpha"))
    if alpha is None:
        alpha = default_alpha
    if alpha is None or alpha == 0 or not rank:
        return 1.0
    return alpha / rank


def need(parts: Mapping[str, Tensor], name: str, algorithm: str, why: str = "") -> Tensor:
    """A required part, or a FormatError that says which part and what else was there."""
    t = parts.get(name)
    if t is None:
        have = ", ".join(sorted(parts)) or "nothing"
        raise FormatError(f"{algorithm}: part '{name}' is missing{why} (the layer has: {have})")
    return t


def expect_dims(t: Tensor, dims, algorithm: str, name: str) -> None:
    if t.dim() not in dims:
        raise FormatError(
            f"{algorithm}: '{name}' has shape {list(t.shape)}; expected "
            f"{' or '.join(f'{d}-D' for d in dims)}"
        )


def layout(shape) -> tuple:
    """Shape with a trailing all-ones kernel dropped: a Linear [o, i] fits a Conv 1×1 [o, i, 1, 1]."""
    shape = tuple(int(s) for s in shape)
    if len(shape) > 2 and all(s == 1 for s in shape[2:]):
        return shape[:2]
    return shape


def shape_error(algorithm: str, expected, found, flat: bool = False) -> Optional[str]:
    """None when `found` (the host weight shape) fits `expected`, else a message naming both.

    flat=True: expected is (out, in × kernel), for factors that keep the kernel folded into
    their last dimension (LoHa, LoKr without Tucker).
    """
    found = tuple(int(s) for s in found)
    if flat:
        ok = len(found) >= 2 and found[0] == expected[0] and math.prod(found[1:]) == expected[1]
        what = f"[{expected[0]}, {expected[1]} (in × kernel)]"
    else:
        ok = layout(expected) == layout(found)
        what = str(list(expected))
    if ok:
        return None
    return f"{algorithm}: the network builds a weight of shape {what}, but the host weight is {list(found)}"


def vector_delta(algorithm: str, name: str, v: Optional[Tensor], bias: Optional[Tensor],
                 strength: float) -> Optional[Tensor]:
    """s · v shaped like the host bias (full's diff_b, norm's b_norm); None without v."""
    if v is None:
        return None
    d = f32(v, None if bias is None else bias.device) * strength
    if bias is None:
        return d.reshape(-1)
    if d.numel() != bias.numel():
        raise FormatError(f"{algorithm}: '{name}' has {d.numel()} entries, but the host bias has {bias.numel()}")
    return d.reshape(bias.shape)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def weight_op(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """The host layer's own op with weight `w` and no bias.

    For convs this is the module's `_conv_forward`, so stride, padding, dilation, groups and
    padding_mode are exactly the original's. `w` must have the layout that op expects.
    """
    if is_conv(module):
        return module._conv_forward(x, w, None)
    return F.linear(x, w)


_POINTWISE = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def pointwise(module: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    """Apply a [out, in] matrix on the channel axis: a Linear, or a 1×1 conv for conv layers."""
    w = w.reshape(w.shape[0], -1)
    if is_conv(module):
        nd = len(module.kernel_size)
        return _POINTWISE[nd](x, w.reshape(*w.shape, *([1] * nd)))
    return F.linear(x, w)


def channel_axis(module: nn.Module, y: Tensor) -> int:
    """Channel axis of a layer output: last for Linear, 1 (0 if unbatched) for convs."""
    if is_conv(module):
        return y.dim() - len(module.kernel_size) - 1
    return y.dim() - 1


def along(v: Tensor, axis: int, ndim: int) -> Tensor:
    """View a vector so it broadcasts along `axis` of an ndim-D tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def without_bias(module: nn.Module, y: Tensor) -> Tensor:
    """y − b: output transforms (OFT, BOFT, IA3) act on W·x, not on the bias."""
    b = getattr(module, "bias", None)
    if b is None:
        return y
    return y - along(f32(b.detach(), y.device), channel_axis(module, y), y.dim())


def factor_bypass_ok(module: nn.Module) -> bool:
    """Low-rank convs run per factor only for ungrouped convs; grouped ones rebuild ΔW instead."""
    return not is_conv(module) or module.groups == 1


# ---------------------------------------------------------------- the adapter interface


class Adapter:
    """One network's tensors for one host module.

    linear: True when delta(W, s) == s * delta(W, 1) exactly, so the engine may merge
    W0 + Σ s_i ΔW_i; BOFT is the one algorithm where this is False. uses_weight: ΔW is built
    from W, so a bypass beside merged networks must see the pristine W0, not the merged one.
    """

    algorithm: str = ""
    linear: bool = True
    uses_weight: bool = False  # ΔW depends on the host weight W (DoRA, GLoRA, IA3, OFT, BOFT, model)
    changes_bias: bool = False  # bias_delta may be non-zero (full, norm, model)
    rank: Optional[int] = None

    def __init__(self, ignored=()):
        self.ignored = tuple(sorted(ignored))  # parts this adapter did not use (loaders may warn)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self):
        for v in vars(self).values():
            if isinstance(v, Tensor):
                yield v
            elif isinstance(v, Adapter):
                yield from v._tensors()

    def to(self, device=None, dtype=None) -> "Adapter":
        """Move (and optionally cast) the held tensors in place; returns self."""
        for k, v in list(vars(self).items()):
            if isinstance(v, Tensor):
                setattr(self, k, v.to(device=device, dtype=dtype))
            elif isinstance(v, Adapter):
                v.to(device, dtype)
        return self

    def check(self, weight_shape: tuple) -> Optional[str]:
        """None if the tensors fit a host weight of this shape, else a message (expected vs found)."""
        raise NotImplementedError

    def require(self, weight_shape) -> None:
        msg = self.check(tuple(weight_shape))
        if msg:
            raise FormatError(msg)

    def delta(self, weight: Tensor, strength: float = 1.0, dyn: Optional[int] = None) -> Tensor:
        """W'(s) − W in fp32, weight's shape. `weight` is the host's ORIGINAL weight."""
        raise NotImplementedError

    def low_rank(self, strength: float = 1.0, dyn: Optional[int] = None, device=None):
        """(U [out, r], D [r, in·kernel]) in fp32 with ΔW = U @ D, when the algorithm is a plain
        product of two factors; None otherwise. The engine merges such contributions with one
        fused multiply-add into W0 instead of building each ΔW."""
        return None

    def costs(self, weight_shape, tokens: int) -> Optional[Tuple[float, float]]:
        """(multiply-adds of one merge, of one bypass forward over `tokens` rows), for the
        engine's choice between re-merging at keyframes and a runtime branch (docs/design.md §4);
        None when the bypass is no cheaper than rebuilding ΔW (the default)."""
        return None

    def bias_delta(self, bias: Optional[Tensor], strength: float = 1.0) -> Optional[Tensor]:
        """b'(s) − b in fp32 for algorithms that change the bias (full, norm); None otherwise."""
        return None

    def bypass(self, x: Tensor, module: nn.Module, y: Tensor, strength: float = 1.0, dyn=None) -> Tensor:
        """Δy = layer'(x) − layer(x), computed in fp32 and returned in y's dtype.

        `module` is the original Linear / Conv (or norm layer), `y` its output for `x`.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        rank = f" rank={self.rank}" if self.rank else ""
        return f"<{type(self).__name__} {self.algorithm}{rank} {self.nbytes} bytes>"


# ---------------------------------------------------------------- detection and construction

# Submodules import the helpers above from this package, so they are imported only now.
from . import boft, dora, full, glora, ia3, lokr, lora, loha, norm, oft  # noqa: E402

# Detection order follows A1111's module_types where families could overlap.
_FAMILIES = (
    ("lora", lora.detects),
    ("loha", loha.detects),
    ("lokr", lokr.detects),
    ("glora", glora.detects),
    ("boft", boft.detects),
    ("oft", oft.detects),
    ("ia3", ia3.detects),
    ("full", full.detects),
    ("norm", norm.detects),
)

ALGORITHMS = {
    "lora": lora.from_parts,
    "loha": loha.from_parts,
    "lokr": lokr.from_parts,
    "glora": glora.from_parts,
    "boft": boft.from_parts,
    "oft": oft.from_parts,
    "ia3": ia3.from_parts,
    "full": full.from_parts,
    "norm": norm.from_parts,
}


def _families(parts: Mapping[str, Tensor]) -> list:
    return [name for name, test in _FAMILIES if test(parts)]


def detect(parts: Mapping[str, Tensor]) -> Optional[str]:
    """Algorithm name from the part names of ONE layer, or None if nothing is recognised.

    Only the names matter, except that BOFT is told from diag-OFT by oft_blocks' rank: with
    values that are not tensors (a names-only lookup) `oft_blocks` answers "oft", and make()
    decides from the tensors. DoRA is not an algorithm of its own: `dora_scale` on top of
    another one turns it on.
    """
    found = _families(parts)
    return found[0] if found else None


def make(parts: Mapping[str, Tensor], default_alpha: Optional[float] = None) -> Adapter:
    """Build the adapter for one layer; FormatError for missing or inconsistent parts.

    default_alpha: alpha for layers without an `alpha` part (PEFT / diffusers files keep
    lora_alpha in metadata). None gives scale 1. For a PEFT rsLoRA config pass
    lora_alpha·√r so that default_alpha / r equals PEFT's lora_alpha / √r.
    """
    found = _families(parts)
    if not found:
        raise FormatError(f"no known algorithm uses the parts {sorted(parts)}")
    if len(found) > 1:
        raise FormatError(f"the layer mixes parts of {' and '.join(found)}: {sorted(parts)}")
    adapter = ALGORITHMS[found[0]](parts, default_alpha)
    if "dora_scale" in parts:
        adapter = dora.wrap(adapter, parts["dora_scale"])
    return adapter
