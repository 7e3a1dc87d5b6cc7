"""Merging into a quantized layer: dequantize, add the networks, quantize again in the layer's
own format (docs/design.md §4 "Quantized layers").

A merged network costs nothing per step, where one beside the layer costs its low-rank
forward (or, for `<model:>` and full networks, a second full-size matmul and a full-size
delta held in memory). The price is the format's rounding of the merged weight, measured
at every merge (`Requantized.error`). The original parameter object is kept as it is and put
back on restore, so restore is exact whatever the merges did.

Formats that can be made again here: GGUF Q8_0/Q5_0/Q5_1/Q4_0/Q4_1 in diffusers' GGUFParameter
(the `gguf` package), bitsandbytes 4-bit (Params4bit), torchao's int8 and fp8 weight tensors.
The others (K-quants, which `gguf` cannot make; SDNQ; a host's own GGUF classes) keep their
networks beside them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .quantized import Quant, dequantize_as, kind_of

GGUF_MADE = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")


@dataclass
class Requantized:
    param: nn.Parameter  # the new quantized weight
    error: float  # ‖dequant(requant(W')) − W'‖ / ‖W' − W0‖: the rounding against the change


def requantizer(module: nn.Module) -> Optional[Callable[[Tensor], nn.Parameter]]:
    """A function making a weight like `module.weight` (same format and settings) from fp32
    values, or None when this format cannot be made here."""
    kind = kind_of(module)
    w = getattr(module, "weight", None)
    if kind is Quant.GGUF and type(w).__name__ == "GGUFParameter" and \
            getattr(w.quant_type, "name", "") in GGUF_MADE:
        return lambda values: _gguf(values, w)
    if kind is Quant.BNB_4BIT and type(w).__name__ == "Params4bit":
        return lambda values: _bnb4(values, w)
    if kind is Quant.SUBCLASS and type(w).__name__ in ("Int8Tensor", "Float8Tensor"):
        return lambda values: _torchao(values, w)
    return None


def requantize(module: nn.Module, values: Tensor, original: Tensor) -> Optional[Requantized]:
    """`values` (fp32, logical shape) as a new weight in the module's format; None when the
    format cannot be made here. `original`: the dequantized pristine weight, for the error."""
    make = requantizer(module)
    if make is None:
        return None
    param = make(values)
    rounded = dequantize_as(module, param)
    change = float((values - original).norm())
    error = float((rounded - values).norm()) / change if change else 0.0
    return Requantized(param, error)


def _gguf(values: Tensor, like: Tensor) -> nn.Parameter:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter
    data = gguf.quants.quantize(values.detach().float().cpu().numpy(), like.quant_type)
    return GGUFParameter(torch.from_numpy(data).to(like.device), requires_grad=False,
                         quant_type=like.quant_type)


def _bnb4(values: Tensor, like: Tensor) -> nn.Parameter:
    import bitsandbytes as bnb
    state = like.quant_state
    param = bnb.nn.Params4bit(values.to(state.dtype).cpu(), requires_grad=False,
                              quant_type=state.quant_type, blocksize=state.blocksize)
    return param._quantize(like.device)


def _torchao(values: Tensor, like: Tensor) -> nn.Parameter:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    layer = nn.Linear(values.shape[1], values.shape[0], bias=False, device=like.device,
                      dtype=getattr(like, "dtype", torch.float32))
    with torch.no_grad():
        layer.weight.copy_(values.to(layer.weight.dtype))
    config = Int8WeightOnlyConfig() if type(like).__name__ == "Int8Tensor" else Float8WeightOnlyConfig()
    holder = nn.Sequential(layer)
    quantize_(holder, config)
    return holder[0].weight
