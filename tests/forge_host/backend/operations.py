"""backend/operations.py at Forge dfdcbab: Forge's layer classes. Linear is a plain Module
(not nn.Linear) that holds `weight`, `bias` and an optional `scale_weight` itself and calls
F.linear with them at every forward, after `get_weight_and_bias` (scaled fp8: weight ·
scale_weight); Conv2d, GroupNorm and LayerNorm subclass torch's and read self.weight too.
The GGUF Linear holds a quantized tensor subclass and dequantizes it at every forward."""
import torch


def get_weight_and_bias(layer):
    weight, bias = layer.weight, layer.bias
    if weight is not None and getattr(weight, "gguf_cls", None) is not None:
        weight = weight.gguf_cls.dequantize_pytorch(weight)
    scale_weight = getattr(layer, "scale_weight", None)
    if weight is not None and scale_weight is not None:
        weight = weight * scale_weight.to(device=weight.device, dtype=weight.dtype)
    return weight, bias


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.dummy = torch.nn.Parameter(torch.empty(1))
            self.weight = None
            self.scale_weight = None
            self.bias = None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                                  missing_keys, unexpected_keys, error_msgs):
            if hasattr(self, "dummy"):  # first load: the tensors become parameters as they are
                if prefix + "weight" in state_dict:
                    self.weight = torch.nn.Parameter(state_dict[prefix + "weight"].to(self.dummy))
                if prefix + "scale_weight" in state_dict:
                    self.scale_weight = torch.nn.Parameter(state_dict[prefix + "scale_weight"])
                if prefix + "bias" in state_dict:
                    self.bias = torch.nn.Parameter(state_dict[prefix + "bias"].to(self.dummy))
                del self.dummy
            else:
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                              missing_keys, unexpected_keys, error_msgs)

        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return torch.nn.functional.linear(x, weight, bias)

    class Conv2d(torch.nn.Conv2d):
        def reset_parameters(self):
            return None

        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return super()._conv_forward(x, weight, bias)

    class GroupNorm(torch.nn.GroupNorm):
        def reset_parameters(self):
            return None

    class LayerNorm(torch.nn.LayerNorm):
        def reset_parameters(self):
            return None


class ForgeOperationsGGUF(ForgeOperations):
    class Linear(torch.nn.Module):
        """No in_features / out_features; `weight` a ParameterGGUF."""

        def __init__(self, *args, **kwargs):
            super().__init__()
            self.weight = None
            self.bias = None

        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


    class Conv2d(torch.nn.Conv2d):
        """Neo's: torch's Conv2d, its weight a ParameterGGUF, cast to the input's dtype."""

        def reset_parameters(self):
            return None

        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return super()._conv_forward(x, weight.to(x.dtype), bias)


class Q8:
    """A GGUF quantization class stand-in (backend/operations_gguf.py quants_mapping): int8
    blocks with one scale, stored as raw bytes."""

    scale = 1 / 64

    @classmethod
    def quantize(cls, w):
        return (w / cls.scale).round().clamp(-127, 127).to(torch.int8).view(torch.uint8)

    @classmethod
    def dequantize_pytorch(cls, p):
        return p.data.view(torch.int8).float().reshape(p.real_shape) * cls.scale


class ParameterGGUF(torch.nn.Parameter):
    """backend/operations_gguf.py: the raw bytes, `gguf_cls`, and `shape` the real one. An F16
    or F32 tensor of a GGUF file has no quant class (`gguf_cls` None): its data is the floats."""

    def __new__(cls, raw, real_shape, gguf_cls=Q8):
        self = super().__new__(cls, raw, requires_grad=False)
        self.gguf_cls, self.real_shape = gguf_cls, torch.Size(real_shape)
        return self

    @property
    def shape(self):
        return self.real_shape


def gguf_linear(linear):
    """A Forge GGUF Linear holding `linear`'s weight quantized (as a GGUF checkpoint loads)."""
    layer = ForgeOperationsGGUF.Linear()
    w = linear.weight.detach()
    layer.weight = ParameterGGUF(Q8.quantize(w).reshape(-1), w.shape)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def gguf_f16_linear(linear):
    """A Forge GGUF Linear holding `linear`'s weight as an F16 tensor of a GGUF file (city96's
    conversions keep small and conv weights so): a ParameterGGUF without a quant class."""
    layer = ForgeOperationsGGUF.Linear()
    w = linear.weight.detach()
    layer.weight = ParameterGGUF(w.to(torch.float16), w.shape, gguf_cls=None)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def gguf_f16_conv(conv):
    """A GGUF Conv2d holding `conv`'s weight as an F16 tensor of a GGUF file."""
    w = conv.weight.detach()
    layer = ForgeOperationsGGUF.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                       conv.stride, conv.padding, device="meta")
    layer.weight = ParameterGGUF(w.to(torch.float16), w.shape, gguf_cls=None)
    layer.bias = torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
    return layer


def forge_layers(root):
    """Every torch layer of `root` as Forge builds it under `using_forge_operations`: Linear
    a ForgeOperations.Linear loaded from the same tensors, Conv2d / GroupNorm / LayerNorm
    Forge's subclasses holding the same parameters."""
    swaps = {torch.nn.Conv2d: ForgeOperations.Conv2d, torch.nn.GroupNorm: ForgeOperations.GroupNorm,
             torch.nn.LayerNorm: ForgeOperations.LayerNorm}
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                layer = ForgeOperations.Linear(child.in_features, child.out_features)
                layer.load_state_dict(child.state_dict())
                setattr(module, child_name, layer)
            elif type(child) in swaps:
                child.__class__ = swaps[type(child)]
    return root
