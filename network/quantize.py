"""Quantize a loaded model's linear layers in place, with the registry packages made for each
format, so a model runs as users of large models run it (`generate --quantize FORMAT`) and
tests have real quantized layers: diffusers' GGUFLinear holding `gguf`-quantized blocks,
bitsandbytes' Linear4bit, torchao's int8 and fp8 weight tensors, SDNQ's layers.

A layer whose input width does not fit the format's block stays as it is (GGUF blocks are 32
or 256 wide, bitsandbytes' 64). K-quants (q4_k, …) can be read from files (network/quantized.py
dequantizes them) but the `gguf` package cannot make them, so they are no format here.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Callable, Dict, Tuple

if TYPE_CHECKING:  # torch is imported where a model is quantized: the CLI parses without it
    from torch import nn


class QuantFormat(Enum):
    Q8_0 = "q8_0"
    Q5_0 = "q5_0"
    Q4_0 = "q4_0"
    NF4 = "nf4"
    FP4 = "fp4"
    INT8 = "int8"
    FP8 = "fp8"
    SDNQ_INT8 = "sdnq-int8"
    SDNQ_UINT4 = "sdnq-uint4"


PACKAGES = {QuantFormat.Q8_0: "gguf", QuantFormat.Q5_0: "gguf", QuantFormat.Q4_0: "gguf",
            QuantFormat.NF4: "bitsandbytes", QuantFormat.FP4: "bitsandbytes",
            QuantFormat.INT8: "torchao", QuantFormat.FP8: "torchao",
            QuantFormat.SDNQ_INT8: "sdnq", QuantFormat.SDNQ_UINT4: "sdnq"}
# pip pins the project tests with (pyproject.toml's dev extra)
PINS = {"gguf": "gguf==0.19.0", "bitsandbytes": "bitsandbytes==0.50.2",
        "torchao": "torchao==0.18.0", "sdnq": "sdnq==0.2.8"}


class QuantizeError(ValueError):
    """A format NetWeave cannot make here: unknown, or its package is not installed."""


def parse_format(name: str) -> QuantFormat:
    try:
        return QuantFormat(name.strip().lower())
    except ValueError:
        known = ", ".join(f.value for f in QuantFormat)
        raise QuantizeError(f"unknown quantization '{name}'; formats: {known}") from None


def quantize_model(root: nn.Module, fmt: QuantFormat) -> int:
    """Replace every nn.Linear under `root` that the format can hold by its quantized layer;
    returns how many were quantized. QuantizeError names the missing package."""
    package = PACKAGES[fmt]
    try:
        __import__(package)
    except ImportError:
        raise QuantizeError(f"{fmt.value} needs the '{package}' package: "
                            f"pip install {PINS[package]}") from None
    from torch import nn
    make = _MAKERS[fmt]
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.in_features % _BLOCK[fmt] == 0:
                setattr(parent, name, make(child, fmt))
                count += 1
    return count


def _gguf(layer: nn.Linear, fmt: QuantFormat) -> nn.Module:
    import gguf
    import torch
    from torch import nn
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    qtype = getattr(gguf.GGMLQuantizationType, fmt.value.upper())
    data = gguf.quants.quantize(layer.weight.detach().float().cpu().numpy(), qtype)
    out = GGUFLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                     compute_dtype=layer.weight.dtype, device="meta")
    out.weight = GGUFParameter(torch.from_numpy(data).to(layer.weight.device), quant_type=qtype)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return out


def _bnb4(layer: nn.Linear, fmt: QuantFormat) -> nn.Module:
    import bitsandbytes as bnb
    from torch import nn

    out = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            compute_dtype=layer.weight.dtype, quant_type=fmt.value,
                            device=layer.weight.device)
    out.weight = bnb.nn.Params4bit(layer.weight.detach().clone(), requires_grad=False,
                                   quant_type=fmt.value)._quantize(layer.weight.device)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return out


def _torchao(layer: nn.Linear, fmt: QuantFormat) -> nn.Module:
    from torch import nn
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    wrapper = nn.Sequential(layer)
    quantize_(wrapper, Int8WeightOnlyConfig() if fmt is QuantFormat.INT8 else Float8WeightOnlyConfig())
    return wrapper[0]


def _sdnq(layer: nn.Linear, fmt: QuantFormat) -> nn.Module:
    import sdnq

    config = sdnq.SDNQConfig(weights_dtype=fmt.value.split("-")[1], minimum_allowed_numel=0,
                             minimum_allowed_channel_size=0)
    out, _ = sdnq.sdnq_quantize_layer(layer, config, torch_dtype=layer.weight.dtype)
    return out


_MAKERS: Dict[QuantFormat, Callable[[nn.Linear, QuantFormat], nn.Module]] = {
    QuantFormat.Q8_0: _gguf, QuantFormat.Q5_0: _gguf, QuantFormat.Q4_0: _gguf,
    QuantFormat.NF4: _bnb4, QuantFormat.FP4: _bnb4, QuantFormat.INT8: _torchao,
    QuantFormat.FP8: _torchao, QuantFormat.SDNQ_INT8: _sdnq, QuantFormat.SDNQ_UINT4: _sdnq}
_BLOCK: Dict[QuantFormat, int] = {QuantFormat.Q8_0: 32, QuantFormat.Q5_0: 32, QuantFormat.Q4_0: 32,
                                  QuantFormat.NF4: 64, QuantFormat.FP4: 64, QuantFormat.INT8: 1,
                                  QuantFormat.FP8: 1, QuantFormat.SDNQ_INT8: 1,
                                  QuantFormat.SDNQ_UINT4: 8}


FORMATS: Tuple[str, ...] = tuple(f.value for f in QuantFormat)
