"""backend/nn/llm/qwen_vl.py (Neo): Qwen2.5-VL's vision tower, held beside the language model
as `visual` (patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.gate_proj,
mlp.up_proj, mlp.down_proj}, merger.{ln_q, mlp.0, mlp.2}). Text-to-image never runs it: here
its weights only, in Neo's names (its MLP names are the language model's)."""
from torch import nn


class VisionPatchEmbed(nn.Module):
    def __init__(self, channels, width, patch=2, frames=2):
        super().__init__()
        self.proj = nn.Conv3d(channels, width, (frames, patch, patch), (frames, patch, patch),
                              bias=False)


class VisionAttention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)


class VisionMLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden)
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)


class VisionBlock(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.norm1 = nn.RMSNorm(width, eps=1e-6)
        self.norm2 = nn.RMSNorm(width, eps=1e-6)
        self.attn = VisionAttention(width)
        self.mlp = VisionMLP(width, hidden)


class PatchMerger(nn.Module):
    def __init__(self, out, width, merge=2):
        super().__init__()
        self.ln_q = nn.RMSNorm(width, eps=1e-6)
        wide = width * merge * merge
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(), nn.Linear(wide, out))


class Qwen2VLVisionTransformer(nn.Module):
    def __init__(self, hidden_size=8, output_hidden_size=24, intermediate_size=12, num_layers=1):
        super().__init__()
        self.patch_embed = VisionPatchEmbed(3, hidden_size)
        self.blocks = nn.ModuleList([VisionBlock(hidden_size, intermediate_size)
                                     for _ in range(num_layers)])
        self.merger = PatchMerger(output_hidden_size, hidden_size)

    def forward(self, pixels, grid):
        raise NotImplementedError("text-to-image encodes no image")

