"""backend/quant_ops.py (Neo): comfy-kitchen's QuantizedTensor for the "Mixed" precision
layers (backend/patcher/base.py imports it). Nothing here quantizes; the module marks the host
as Neo for scripts/netweave_entry.py, as the real file does."""
import torch


class QuantizedTensor(torch.Tensor):
    pass
