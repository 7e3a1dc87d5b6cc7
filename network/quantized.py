"""Quantized layers as hosts hold them: which kind a layer is, its logical shape, and its
weight dequantized (docs/design.md §4 "Quantized layers").

NetWeave never writes a quantized weight: every network on such a layer runs beside it
(bypass), so restore has nothing to undo. The dequantized weight is needed only by the
algorithms whose change is built from W (DoRA, OFT, GLoRA, IA3, `<model:>`).

Recognised by the attributes each format's own classes carry, so a host's copies of them
(Forge, Neo, ComfyUI) are recognised as the registry packages' are:

| kind | the weight (or layer) carries | dequantized by |
|---|---|---|
| GGUF | `quant_type` + `quant_shape` (diffusers), `tensor_type` + `tensor_shape` (ComfyUI-GGUF) | the `gguf` package |
| Forge/Neo GGUF | `gguf_cls` (its quant class; `shape` says the real shape) | that class's `dequantize_pytorch` |
| Forge/Neo GGUF F16/F32 | `gguf_cls` None (a GGUF file's float tensor, read by the host's GGUF layers, which may swap it for a cast copy at a forward) | none: its data is the floats |
| bitsandbytes 4-bit | `quant_state` (Params4bit, Forge's ForgeParams4bit) | `bitsandbytes.functional.dequantize_4bit` |
| bitsandbytes 8-bit | `SCB` (Int8Params) | `bitsandbytes.functional.int8_vectorwise_dequant` |
| SDNQ | the layer's `sdnq_dequantizer` | that dequantizer |
| tensor subclasses | a `dequantize()` method (torchao, ComfyUI's QuantizedTensor, Neo's int8) | it |
"""
from __future__ import annotations

import inspect
from enum import Enum
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn


class Quant(Enum):
    GGUF = "GGUF"
    BNB_4BIT = "bitsandbytes 4-bit"
    BNB_8BIT = "bitsandbytes 8-bit"
    SDNQ = "SDNQ"
    SUBCLASS = "a quantized tensor"  # torchao, ComfyUI QuantizedTensor, Neo's int8


_GGUF_ATTRS = (("quant_type", "quant_shape"), ("tensor_type", "tensor_shape"),
               ("gguf_type", "gguf_real_shape"), ("tensor_type", "real_shape"))


def kind_of(module: nn.Module) -> Optional[Quant]:
    """The quantized format a layer's weight is stored in; None for a plain float weight (or
    a packing NetWeave does not know)."""
    if getattr(module, "sdnq_dequantizer", None) is not None:
        return Quant.SDNQ
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        return None
    if hasattr(w, "gguf_cls"):  # Forge's and Neo's ParameterGGUF, its F16/F32 ones too
        return Quant.GGUF
    if any(getattr(w, t, None) is not None and getattr(w, s, None) is not None
           for t, s in _GGUF_ATTRS) and _gguf_type(w) not in ("F32", "F16", "BF16"):
        return Quant.GGUF
    if getattr(w, "quant_state", None) is not None:
        return Quant.BNB_4BIT
    state = getattr(module, "state", None)  # Linear8bitLt may keep the row scales there
    if w.dtype == torch.int8 and (getattr(w, "SCB", None) is not None or
                                  getattr(state, "SCB", None) is not None):
        return Quant.BNB_8BIT
    if type(w) not in (Tensor, nn.Parameter) and \
            getattr(type(w), "dequantize", Tensor.dequantize) is not Tensor.dequantize:
        return Quant.SUBCLASS  # its own dequantize(), not torch's for its quantized dtypes
    return None


def _gguf_type(w: Tensor) -> Optional[str]:
    for t, _ in _GGUF_ATTRS:
        qtype = getattr(w, t, None)
        if qtype is not None:
            return getattr(qtype, "name", str(qtype))
    return None


def logical_shape(module: nn.Module) -> Tuple[int, ...]:
    """The shape the layer computes with (a packed weight's own shape is its bytes')."""
    kind = kind_of(module)
    w = module.weight
    if kind is None:
        return tuple(int(v) for v in w.shape)
    if kind is Quant.GGUF:
        if hasattr(w, "gguf_cls"):  # Forge's `shape` is the real one
            return tuple(int(v) for v in w.shape)
        for _, s in _GGUF_ATTRS:
            shape = getattr(w, s, None)
            if shape is not None:
                return tuple(int(v) for v in shape)
    if kind is Quant.BNB_4BIT:
        return tuple(int(v) for v in w.quant_state.shape)
    if kind is Quant.SDNQ:
        shape = getattr(module.sdnq_dequantizer, "result_shape", None)
        if shape is not None:
            return tuple(int(v) for v in shape)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return tuple(int(v) for v in w.shape)


def dequantize(module: nn.Module) -> Tensor:
    """The layer's weight in fp32, logical shape, on its device."""
    kind = kind_of(module)
    w = module.weight
    if kind is Quant.GGUF and callable(getattr(getattr(w, "gguf_cls", None), "dequantize_pytorch", None)):
        d = w.gguf_cls.dequantize_pytorch(w)
    elif kind is Quant.GGUF and hasattr(w, "gguf_cls"):  # F16/F32: no quant class, the floats
        d = torch.Tensor(w.detach())
    elif kind is Quant.GGUF:
        d = _gguf_dequantize(w, logical_shape(module))
    elif kind is Quant.BNB_4BIT:
        import bitsandbytes.functional as bf
        d = bf.dequantize_4bit(w.data, w.quant_state)
    elif kind is Quant.BNB_8BIT:
        import bitsandbytes.functional as bf
        scb = getattr(w, "SCB", None)
        d = bf.int8_vectorwise_dequant(w.data, scb if scb is not None else module.state.SCB)
    elif kind is Quant.SDNQ:
        d = _sdnq_dequantize(module)
    elif kind is Quant.SUBCLASS:
        d = w.dequantize()
    else:
        d = w
    return torch.as_tensor(d).detach().to(torch.float32).reshape(logical_shape(module))


def dequantize_as(module: nn.Module, weight: Tensor) -> Tensor:
    """What `dequantize` gives with `weight` in the layer's place (another stored version of
    it: the original one kept for restore, or a requantized one)."""
    kept = module._parameters["weight"]
    module._parameters["weight"] = weight
    try:
        return dequantize(module)
    finally:
        module._parameters["weight"] = kept


def _sdnq_dequantize(module: nn.Module) -> Tensor:
    """SDNQ's dequantizer, called with the tensors of the layer its signature names (the
    names grew between versions: scale_2, zero_point_scale, …)."""
    q = module.sdnq_dequantizer
    names = inspect.signature(q.__call__).parameters
    kwargs = {n: getattr(module, n) for n in names if n not in ("dtype", "skip_quantized_matmul")
              and hasattr(module, n)}
    if "skip_quantized_matmul" in names:
        kwargs["skip_quantized_matmul"] = getattr(q, "use_quantized_matmul", False)
    return q(**kwargs, dtype=torch.float32)


def _gguf_dequantize(w: Tensor, shape: Tuple[int, ...]) -> Tensor:
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, _gguf_type(w))
    raw = w.as_tensor() if hasattr(w, "as_tensor") else w
    data = torch.Tensor(raw.detach().cpu()).view(torch.uint8).numpy() if raw.dtype != torch.uint8 \
        else torch.Tensor(raw.detach().cpu()).numpy()
    values = gguf.quants.dequantize(np.ascontiguousarray(data), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape).to(w.device)
