"""Which host module each key of a network or checkpoint file belongs to.

Found by the structure of the host's own module trees, never by one library's path layout:
the UNet may be an LDM `UNetModel` (A1111, Forge) or a diffusers `UNet2DConditionModel`
(SD.Next, standalone); a text encoder may be Hugging Face CLIP (with or without the
`text_model.` level, which transformers 5 dropped) or OpenCLIP (`transformer.resblocks`, a
fused `nn.MultiheadAttention`). Every patchable layer gets a canonical name — the diffusers
path for the UNet, the HF CLIP path for text encoders — and from it every spelling a file may
use (kohya diffusers-style and LDM-style, LyCORIS, OFT, PEFT/diffusers, checkpoint keys).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from enum import Enum
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

from torch import Tensor, nn

from . import dit_keys, quantized, te_keys
from .blocks import TEXT_BLOCKS
from .dit_arches import ARCHES
from .tokens import TokenLayout, Tokens

PATCHABLE = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


class Family(Enum):
    """Which kind of model the trees are: the SD UNets, or one of the transformers
    (dit_arches.py; Chroma is the Flux family's)."""

    SD = "sd"
    FLUX = "flux"
    ZIMAGE = "zimage"
    QWENIMAGE = "qwenimage"
    SD3 = "sd3"
    WAN22 = "wan22"

COMPONENTS = ("unet", "te1", "te2", "te3")  # te3: SD3.5's T5


def linear_like(module: nn.Module) -> bool:
    """An nn.Linear, or a layer built like one without subclassing it: a leaf module holding
    a 2-D `weight` [out, in] (hosts with their own layer classes keep the weight themselves
    and call F.linear with it). Embeddings hold a 2-D weight too but are tables, not layers."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Embedding) or next(module.children(), None) is not None:
        return False
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and len(w.shape) == 2  # .shape: a packed tensor may say its own


def patchable(module: nn.Module) -> bool:
    return isinstance(module, PATCHABLE) or linear_like(module)


def frozen(weight: Tensor) -> Optional[str]:
    """Why a weight cannot take a merge, or None: only a plain floating-point tensor can. A
    tensor subclass that packs or quantizes its data (4-bit, GGUF blocks) would be written
    as raw bytes."""
    if type(weight) in (Tensor, nn.Parameter) and weight.is_floating_point():
        return None
    return f"its weight is stored quantized ({type(weight).__name__}, {weight.dtype})"


@dataclass(frozen=True)
class Target:
    """One thing a network can change: a module's weight, or one chunk of a fused weight."""

    component: str  # "unet", "te1", "te2" or "te3"
    name: str  # canonical: the diffusers UNet path, the HF CLIP text-model path, …
    path: str  # the module's path inside the host's component tree
    module: nn.Module = field(compare=False, repr=False)
    param: str = "weight"  # "weight", or "in_proj_weight" / "out_proj.weight" of an OpenCLIP MHA
    chunk: Optional[Tuple[int, int]] = None  # (index, count) of q/k/v inside in_proj_weight
    block: Optional[str] = None  # BASE, INxx, …, a text encoder's; None outside every block
    tokens: Optional[Tokens] = None  # a transformer layer's rows; None: found by grid
    quant: Optional[quantized.Quant] = None  # stored quantized: networks run beside it only

    @property
    def shape(self) -> Tuple[int, ...]:
        """The weight's logical shape (a quantized weight's storage has its own)."""
        if self.quant is not None:
            return quantized.logical_shape(self.module)
        return tuple(self.weight.shape)

    @property
    def weight(self) -> Tensor:
        w = self.module.get_parameter(self.param)
        if self.chunk is not None:
            w = w.chunk(self.chunk[1])[self.chunk[0]]
        return w

    @cached_property  # asked at every merge; a layer gains or loses no bias
    def bias_param(self) -> Optional[str]:
        name = {"weight": "bias", "in_proj_weight": "in_proj_bias",
                "out_proj.weight": "out_proj.bias"}.get(self.param)  # an RMSNorm's scale: none
        if name is None:
            return None
        try:
            return name if self.module.get_parameter(name) is not None else None
        except AttributeError:
            return None


# ---- the UNet ---------------------------------------------------------------------------
_RESNET_LDM_TO_DIFFUSERS = {"in_layers.0": "norm1", "in_layers.2": "conv1",
                            "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
                            "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}
_TOP_LDM_TO_DIFFUSERS = {"time_embed.0": "time_embedding.linear_1",
                         "time_embed.2": "time_embedding.linear_2",
                         "label_emb.0.0": "add_embedding.linear_1",
                         "label_emb.0.2": "add_embedding.linear_2",
                         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_TOP_DIFFUSERS_TO_LDM = {v: k for k, v in _TOP_LDM_TO_DIFFUSERS.items()}
LAYERS_PER_LEVEL = 2  # resnets per down level in every SD UNet (SD1, SD2, SDXL)


def _rename(rest: str, table: Mapping[str, str]) -> Optional[str]:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def _kind(module: nn.Module) -> str:
    """resnets / attentions / sampler, from the LDM class name (ResBlock, SpatialTransformer,
    Downsample, Upsample; sgm's UNet uses the same names)."""
    name = type(module).__name__
    if "ResBlock" in name:
        return "resnets"
    if "Transformer" in name:
        return "attentions"
    return "sampler"


def ldm_to_diffusers(path: str, root: nn.Module) -> Optional[str]:
    """`input_blocks.4.1.proj_in` → `down_blocks.1.attentions.0.proj_in` (None if the path is
    not a layer that diffusers' UNet has)."""
    top = _rename(path, _TOP_LDM_TO_DIFFUSERS)
    if top is not None:
        return top
    parts = path.split(".")
    if len(parts) < 3 or parts[0] not in ("input_blocks", "middle_block", "output_blocks"):
        return None
    if parts[0] == "middle_block":  # middle_block.{0: resnet, 1: attention, 2: resnet}
        i, rest = int(parts[1]), ".".join(parts[2:])
        kind = _kind(root.middle_block[i])
        prefix = "mid_block.attentions.0" if kind == "attentions" else f"mid_block.resnets.{i // 2}"
    else:
        i, k, rest = int(parts[1]), int(parts[2]), ".".join(parts[3:])
        kind = _kind(getattr(root, parts[0])[i][k])
        if parts[0] == "input_blocks":  # input_blocks.{1 + 3·level + j}
            level, j = divmod(i - 1, LAYERS_PER_LEVEL + 1)
            if kind == "sampler":
                return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
            prefix = f"down_blocks.{level}.{kind}.{j}"
        else:  # output_blocks.{3·level + j}
            level, j = divmod(i, LAYERS_PER_LEVEL + 1)
            if kind == "sampler":
                return f"up_blocks.{level}.upsamplers.0.conv" if rest == "conv" else None
            prefix = f"up_blocks.{level}.{kind}.{j}"
    if kind == "resnets":
        rest = _rename(rest, _RESNET_LDM_TO_DIFFUSERS)
        if rest is None:
            return None
    return f"{prefix}.{rest}" if rest else prefix


def diffusers_to_ldm(path: str, root: nn.Module) -> Optional[str]:
    """The inverse of `ldm_to_diffusers`, for a diffusers UNet. The upsampler's LDM index
    depends on whether that up level has attention (A1111 assumes SD1's layout and misses
    SDXL's `output_blocks.2.2.conv`; the structure tells)."""
    top = _rename(path, _TOP_DIFFUSERS_TO_LDM)
    if top is not None:
        return top
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                 r"\.(\d+)(?:\.(.*))?$", path) or re.match(
        r"(mid_block)\.()(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
    if not m:
        return None
    group, level, kind, j, rest = m.group(1), m.group(2), m.group(3), int(m.group(4)), m.group(5) or ""
    if kind == "resnets":
        rest = _rename(rest, _RESNET_DIFFUSERS_TO_LDM)
        if rest is None:
            return None
    if group == "mid_block":
        head = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * j}"
    elif group == "down_blocks":
        b = int(level)
        if kind == "downsamplers":
            return f"input_blocks.{3 + 3 * b}.0.op" if rest == "conv" else None
        head = f"input_blocks.{1 + 3 * b + j}.{1 if kind == 'attentions' else 0}"
    else:
        b = int(level)
        if kind == "upsamplers":
            has_attention = hasattr(root.up_blocks[b], "attentions")
            return f"output_blocks.{3 * b + 2}.{2 if has_attention else 1}.conv" if rest == "conv" \
                else None
        head = f"output_blocks.{3 * b + j}.{1 if kind == 'attentions' else 0}"
    return f"{head}.{rest}" if rest else head


def unet_block(name: str) -> Optional[str]:
    """The lora-block-weight block of a canonical (diffusers) UNet name (docs/design.md §3)."""
    if name.startswith("conv_in"):
        return "IN00"
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)",
                 name)
    if m:
        level, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
        if m.group(1) == "down":
            return f"IN{3 * level + 3:02d}" if kind == "downsamplers" else f"IN{3 * level + j + 1:02d}"
        return f"OUT{3 * level + 2:02d}" if kind == "upsamplers" else f"OUT{3 * level + j:02d}"
    if name.startswith("mid_block"):
        return "M00"
    return None  # time embedding, conv_out, ...: outside lora-block-weight's blocks


def _unet_layers(root: nn.Module) -> Iterator[Tuple[str, str, nn.Module]]:
    """(diffusers name, LDM name, module) of every patchable UNet layer."""
    ldm = hasattr(root, "input_blocks")
    if not ldm and not hasattr(root, "down_blocks"):
        raise ValueError(f"{type(root).__name__} is neither an LDM nor a diffusers UNet")
    for path, module in root.named_modules():
        if not patchable(module):
            continue
        if ldm:
            d, l = ldm_to_diffusers(path, root), path
        else:
            d, l = path, diffusers_to_ldm(path, root)
        if d is not None and l is not None:
            yield d, l, module


# ---- text encoders ----------------------------------------------------------------------
_OPENCLIP_TO_HF = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "ln_1": "layer_norm1",
                   "ln_2": "layer_norm2"}


def _find_text_root(root: nn.Module) -> Tuple[str, str, nn.Module]:
    """("hf" | "openclip", path, module) of the text model inside whatever wraps it."""
    for path, module in root.named_modules():
        children = dict(module.named_children())
        if "embeddings" in children and "encoder" in children and \
                hasattr(children["encoder"], "layers"):
            return "hf", path, module
        if "transformer" in children and hasattr(children["transformer"], "resblocks") and \
                "token_embedding" in children:
            return "openclip", path, module
    raise ValueError(f"no CLIP text model (HF encoder.layers or OpenCLIP transformer.resblocks) "
                     f"found inside {type(root).__name__}")


def _text_layers(root: nn.Module) -> Iterator[Tuple[str, str, nn.Module, str, Optional[Tuple[int, int]]]]:
    """(HF canonical name, path in the component tree, module, param, chunk)."""
    style, base, text = _find_text_root(root)
    prefix = base + "." if base else ""
    for rel, module in text.named_modules():
        path = prefix + rel
        if style == "hf":
            if patchable(module):
                yield rel, path, module, "weight", None
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rel)
        if isinstance(module, nn.MultiheadAttention) and m and m.group(2) == "attn":
            layer = f"encoder.layers.{m.group(1)}.self_attn"
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                yield f"{layer}.{proj}", path, module, "in_proj_weight", (i, 3)
            yield f"{layer}.out_proj", path, module, "out_proj.weight", None
        elif patchable(module) and m:
            hf = _rename(m.group(2), _OPENCLIP_TO_HF)
            if hf is not None:
                yield f"encoder.layers.{m.group(1)}.{hf}", path, module, "weight", None
        elif patchable(module) and rel == "ln_final":
            yield "final_layer_norm", path, module, "weight", None


def _openclip_name(hf: str) -> Optional[str]:
    """HF canonical name → OpenCLIP layer path (for SD2/SDXL checkpoints' text encoders)."""
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)$", hf)
    if hf == "final_layer_norm":
        return "ln_final"
    if not m:
        return None
    rest = m.group(2)
    if rest.startswith("self_attn."):
        return f"transformer.resblocks.{m.group(1)}.attn"
    back = {v: k for k, v in _OPENCLIP_TO_HF.items()}
    return f"transformer.resblocks.{m.group(1)}.{back[rest]}" if rest in back else None


# ---- spellings ----------------------------------------------------------------------------
def _us(path: str) -> str:
    return path.replace(".", "_")


def unet_spellings(d: str, l: str) -> List[str]:
    """Layer names a file may use for a UNet layer (diffusers name d, LDM name l)."""
    names = [f"unet.{d}", d, f"diffusion_model.{l}", f"model.diffusion_model.{l}"]
    for prefix in ("lora_unet_", "lycoris_", "oft_unet_"):
        names += [prefix + _us(d), prefix + _us(l)]
    return names


def text_spellings(component: str, hf: str) -> List[str]:
    """Layer names a file may use for a text-encoder layer (HF canonical name)."""
    full = "text_model." + hf
    if component == "te1":  # bare HF names too: a lone text-encoder file has no prefix
        kohya, peft, ckpt = ("lora_te_", "lora_te1_", "lycoris_te_", "lycoris_te1_"), \
            ("text_encoder.", ""), ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
    else:
        kohya, peft, ckpt = ("lora_te2_", "lycoris_te2_"), ("text_encoder_2.",), ()
    names = [k + _us(full) for k in kohya]
    names += [p + n for p in peft for n in (full, hf)]
    names += [c + full for c in ckpt]
    if component == "te1":  # ComfyUI's names for Flux's and SD3's CLIP-L
        names.append("text_encoders.clip_l.transformer." + full)
    else:  # and for SD3's CLIP-G
        names.append("text_encoders.clip_g.transformer." + full)
    openclip = _openclip_name(hf)
    if openclip:  # SD2's and SDXL-G's OpenCLIP in LDM checkpoints
        names.append(("cond_stage_model.model." if component == "te1" else
                      "conditioner.embedders.1.model.") + openclip)
    return names


_TENSOR_SUFFIXES = ("weight", "bias", "in_proj_weight", "in_proj_bias", "out_proj.weight",
                    "out_proj.bias", "scale")  # scale: an original DiT tree's RMSNorm
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


@dataclass(frozen=True)
class Piece:
    """Rows [src, src + length) of what a file's layer builds, at rows [dst, dst + length) of a
    target's weight. `src_rows`: how many rows the file's layer builds in all."""

    target: Target
    src: int
    dst: int
    length: int
    src_rows: int

    @property
    def whole(self) -> bool:
        return self.src == 0 and self.dst == 0 and \
            self.length == self.src_rows == int(self.target.shape[0])


def _with_quant(target: Target) -> Target:
    """The target with its quantized format noted, when its whole weight is stored so."""
    if target.param != "weight" or target.chunk is not None:
        return target
    kind = quantized.kind_of(target.module)
    return target if kind is None else replace(target, quant=kind)


def _joined(pieces: List[Piece]) -> List[Piece]:
    """Pieces with adjacent pieces of one target, in the same order, made one."""
    out: List[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if last is not None and last.target is p.target and p.src == last.src + last.length \
                and p.dst == last.dst + last.length:
            out[-1] = Piece(p.target, last.src, last.dst, last.length + p.length, p.src_rows)
        else:
            out.append(p)
    return out


def _transformer_keys(unet: Optional[nn.Module]) -> Optional[dit_keys.DitKeys]:
    """The transformer architecture whose tree `unet` is, or None (an SD UNet, or none)."""
    if unet is None:
        return None
    return next((keys for keys in ARCHES if keys.tree_layout(unet) is not None), None)


class KeyMap:
    """Every host target by every name a file may give it. Layers whose weight cannot take a
    merge (`frozen`) are kept apart: no file reaches them, `refused` says which keys meant to.
    Flux-family transformers map names to rows of targets (`pieces`, flux_keys.py): a fused
    layer in a file may reach several split layers of the host, and the other way round."""

    def __init__(self, trees: Mapping[str, nn.Module]):
        unknown = set(trees) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; use {COMPONENTS}")
        self.targets: List[Target] = []
        self._by_name: Dict[str, List[Target]] = {}
        self._views: Dict[str, List[Piece]] = {}  # transformer names -> rows of targets
        self._frozen: Dict[str, Tuple[Target, str]] = {}  # spelling -> (target, why)
        unet = trees.get("unet")
        keys = _transformer_keys(unet)
        self.family = Family(keys.arch) if keys is not None else \
            Family.FLUX if te_keys.kind_of(trees.get("te2", nn.Module())) is te_keys.Kind.T5 \
            else Family.SD
        # how the transformer lays out its tokens (None: an SD UNet, regions found by grid)
        self.tokens: Optional[TokenLayout] = None
        if keys is not None:
            self.tokens = keys.tokens[keys.tree_layout(unet)]
            self._add_transformer(unet, keys)
        elif unet is not None:
            for d, l, module in _unet_layers(unet):
                path = l if hasattr(unet, "input_blocks") else d
                self._add(Target("unet", d, path, module, block=unet_block(d)), unet_spellings(d, l))
        for component in ("te1", "te2", "te3"):
            if component in trees:
                self._add_text_encoder(component, trees[component])

    def _add_text_encoder(self, component: str, tree: nn.Module) -> None:
        """Targets of one text encoder, in the block its architecture gives it (blocks.py)."""
        arch = self.family.value
        block = TEXT_BLOCKS.get(arch, {}).get(component, "BASE")  # SD: every encoder BASE
        kind = te_keys.kind_of(tree)
        if kind is not None:
            names = te_keys.names_for(arch, component, kind)
            for name, path, module in te_keys.layers(kind, tree, patchable):
                self._add(Target(component, name, path, module, block=block), names.spellings(name))
            return
        for hf, path, module, param, chunk in _text_layers(tree):
            target = Target(component, hf, path, module, param, chunk, block=block)
            self._add(target, text_spellings(component, hf))

    def _add_transformer(self, root: nn.Module, keys: dit_keys.DitKeys) -> None:
        """Targets of a transformer and the rows every file name reaches."""
        covering: Dict[str, List[Tuple[Target, dit_keys.Segment, Optional[str]]]] = {}
        canonical: Dict[str, Tuple[int, int]] = {}
        for path, module, span in keys.host_layers(root, patchable):
            layer = span[0].layer
            target = _with_quant(Target("unet", path, path, module, block=keys.block_of(layer),
                                        tokens=keys.tokens_of(layer)))
            why = None if target.quant is not None else frozen(target.weight)
            if why is None:
                self.targets.append(target)
            for seg in span:
                covering.setdefault(seg.layer, []).append((target, seg, why))
                rows, width = canonical.get(seg.layer, (0, int(target.shape[1])))
                canonical[seg.layer] = (max(rows, seg.start + seg.length), width)
        for name, span in keys.file_spellings(canonical):
            src_rows = sum(seg.length for seg in span)
            pieces = []
            for seg in span:
                for target, host, why in covering.get(seg.layer, ()):
                    lo = max(seg.start, host.start)
                    hi = min(seg.start + seg.length, host.start + host.length)
                    if lo >= hi:
                        continue
                    if why is not None:
                        self._frozen.setdefault(name, (target, why))
                        continue
                    pieces.append(Piece(target, seg.offset + lo - seg.start,
                                        host.offset + lo - host.start, hi - lo, src_rows))
            if pieces:
                self._views.setdefault(name, _joined(pieces))
        for path, module, param, canonical in keys.norm_layers(root):  # one vector each
            self._add(Target("unet", path, path, module, param, block=keys.block_of(canonical)),
                      list(keys.norm_spellings(canonical)))

    def _add(self, target: Target, spellings: List[str]) -> None:
        target = _with_quant(target)
        try:
            why = None if target.quant is not None else frozen(target.weight)
        except AttributeError:  # no weight (a norm without affine): nothing a file could change
            why = None
        if why is not None:
            for name in spellings:
                self._frozen.setdefault(name, (target, why))
            return
        self.targets.append(target)
        for name in dict.fromkeys(spellings):
            bucket = self._by_name.setdefault(name, [])
            if target not in bucket:
                bucket.append(target)

    def lookup_tensor(self, key: str) -> List[Tuple[Piece, bool]]:
        """(piece, is_bias) for a checkpoint tensor key such as
        `model.diffusion_model.input_blocks.1.1.proj_in.weight`. An OpenCLIP
        `….attn.in_proj_weight` gives three: q, k and v are row thirds of that one tensor; an HF
        `….self_attn.q_proj.weight` on an OpenCLIP host gives the q chunk, whole; a Flux-family
        layer gives the rows of the host layers it holds."""
        for suffix in _TENSOR_SUFFIXES:
            if not key.endswith("." + suffix):
                continue
            layer, is_bias = key[:-len(suffix) - 1], suffix.endswith("bias")
            if layer in self._views and suffix in ("weight", "bias"):
                return [(p, is_bias) for p in self._views[layer]]
            targets = self.lookup(layer)
            if suffix.startswith("in_proj"):  # OpenCLIP's fused q, k, v: by canonical name
                found = []
                for t in targets:
                    if t.name[-6:] in _QKV:
                        n = int(t.shape[0])
                        found.append((Piece(t, _QKV[t.name[-6:]] * n, 0, n, 3 * n), is_bias))
            elif suffix.startswith("out_proj"):
                found = [(self._whole(t), is_bias) for t in targets if t.name.endswith("out_proj")]
            else:  # a plain layer name names exactly one target
                found = [(self._whole(targets[0]), is_bias)] if len(targets) == 1 else []
            if found:
                return found
        return []

    @staticmethod
    def _whole(target: Target) -> Piece:
        rows = int(target.shape[0])
        return Piece(target, 0, 0, rows, rows)

    def refused(self, keys) -> Dict[Target, str]:
        """{frozen target: why} for the file keys (`layer.part…`) that name a frozen layer."""
        found: Dict[Target, str] = {}
        if not self._frozen:
            return found
        for key in keys:
            head = key
            while "." in head:
                head = head.rsplit(".", 1)[0]
                if head in self._frozen:
                    target, why = self._frozen[head]
                    found[target] = why
                    break
        return found

    def pieces(self, layer: str) -> List[Piece]:
        """Where a file's layer lands: one whole target, or rows of one or more targets (a
        fused Flux layer in a file on a host that splits it, or the reverse)."""
        if layer in self._views:
            return self._views[layer]
        targets = self.lookup(layer)
        return [self._whole(targets[0])] if len(targets) == 1 else []

    def lookup(self, layer: str) -> List[Target]:
        """Targets of a layer name: one, or three for an OpenCLIP `attn` in a checkpoint
        (q, k, v are chunks of one fused weight); empty when the host has no such layer."""
        return self._by_name.get(layer, [])
