"""backend/operations.py (Neo): Forge's layer classes subclass torch's (`ForgeOperations.Linear
(torch.nn.Linear, ForgeWeights)`, Conv2d, GroupNorm, LayerNorm, RMSNorm, Embedding, …). Every
forward takes its weight and bias through `get_weight_and_bias`, which runs the layer's
`weight_function` / `bias_function` lists on them: Neo's on-the-fly LoRA (OnlineLoRAPatch) and
low-VRAM patches live there, beside the stored weight."""
import torch


def get_weight_and_bias(layer):
    weight = getattr(layer, "weight", None)
    for f in getattr(layer, "weight_function", []):
        weight = f(weight)
    bias = getattr(layer, "bias", None)
    for f in getattr(layer, "bias_function", []):
        bias = f(bias)
    return weight, bias


class ForgeWeights:
    parameters_manual_cast = False
    weight_function = []
    bias_function = []


class ForgeOperations:
    class Linear(torch.nn.Linear, ForgeWeights):
        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return torch.nn.functional.linear(x, weight, bias)

    class Conv2d(torch.nn.Conv2d, ForgeWeights):
        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return self._conv_forward(x, weight, bias)

    class GroupNorm(torch.nn.GroupNorm, ForgeWeights):
        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return torch.nn.functional.group_norm(x, self.num_groups, weight, bias, self.eps)

    class LayerNorm(torch.nn.LayerNorm, ForgeWeights):
        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return torch.nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    class RMSNorm(torch.nn.RMSNorm, ForgeWeights):
        bias = None

        def forward(self, x):
            weight, _ = get_weight_and_bias(self)
            return torch.nn.functional.rms_norm(x, self.normalized_shape, weight, self.eps)

    class Embedding(torch.nn.Embedding, ForgeWeights):
        bias = None

        def forward(self, ids):
            weight, _ = get_weight_and_bias(self)
            return torch.nn.functional.embedding(ids, weight)


SWAPS = {getattr(torch.nn, name): getattr(ForgeOperations, name)
         for name in ("Linear", "Conv2d", "GroupNorm", "LayerNorm", "RMSNorm", "Embedding")}


def forge_layers(root):
    """Every torch layer of `root` as Neo builds it under `using_forge_operations`: the same
    parameters in Neo's subclass (Neo's loader builds the tree with those classes)."""
    for module in root.modules():
        if type(module) in SWAPS:
            module.__class__ = SWAPS[type(module)]
    return root
