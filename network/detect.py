"""Which architecture (SD1, SD2, SDXL, Flux, Chroma, Z-Image, Qwen-Image, SD3, Wan 2.2) a file
was made for, from its keys and shapes alone.

Z-Image, Qwen-Image and SD3 are told first, each by layers only it has (Z-Image's
`layers.N.attention` and refiners, Qwen-Image's `img_mlp`/`txt_mod`, SD3's `joint_blocks`,
`attn2` or patch embedder); a file in diffusers' names that holds only the attention of
`transformer_blocks.N` (the name Flux's double blocks share) by its deepest block (beyond
SD3's 38 only Qwen-Image has) or its width (SD3.5's 1536 or 2432; Flux and Qwen-Image are
3072 wide).

A file of text-encoder keys alone is told by the encoder: ComfyUI's names (`qwen3_4b`
Z-Image, `qwen25_7b` Qwen-Image, `umt5xxl` Wan), a language model's width (2560 Qwen3-4B,
3584 Qwen2.5-VL-7B) or Qwen2.5-VL's `language_model`/`visual`.

A T5 alone fits Flux, Chroma and SD3 (kohya's `lora_te3_`, ComfyUI's `t5xxl`) and is left
undecided: beside CLIP-G it is SD3's, as a pipeline's second encoder Flux's.

The Flux family is told next, by its blocks (double- and single-stream, in any naming);
Chroma from Flux by Chroma's distilled guidance layer, which Flux lacks, else Flux (a file
that changes only attention layers fits both, and loads on both).

Signals, strongest first: a second text encoder (SDXL only); the UNet's attention layout
(SD1/SD2 have attention in the first level and one transformer block per attention, SDXL none
in the first level and 2 or 10 in the others); the cross-attention width (768 SD1,
1024 SD2, 2048 SDXL) and text-encoder width (768 CLIP-L, 1024 OpenCLIP-H, 1280 OpenCLIP-G);
linear (SD2, SDXL) versus 1×1-conv (SD1) `proj_in`; the kohya metadata. Every signal names its
reason, so an error can say why a file was judged to be for another model.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

ARCHS = ("sd1", "sd2", "sdxl", "flux", "chroma", "zimage", "qwenimage", "sd3", "wan22")
FLUX_FAMILY = ("flux", "chroma")
TRANSFORMERS = FLUX_FAMILY + ("zimage", "qwenimage", "sd3", "wan22")
CONTEXT_WIDTH = {768: ("sd1",), 1024: ("sd2",), 2048: ("sdxl",)}
TEXT_WIDTH = {768: ("sd1", "sdxl"), 1024: ("sd2",), 1280: ("sdxl",)}

_TE2 = re.compile(r"^(lora_te2_|lycoris_te2_|text_encoder_2\.|conditioner\.embedders\.1\.)")
_OPENCLIP_CKPT = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks")
_HF_CKPT = re.compile(r"^cond_stage_model\.transformer\.text_model")
_FIRST_LEVEL_ATTN = re.compile(r"(down_blocks[._]0[._]attentions|input_blocks[._][12][._]1[._])")
_DEEP_TRANSFORMER = re.compile(r"transformer_blocks[._]([1-9]\d*)[._]")
_UP0_ATTN = re.compile(r"(up_blocks[._]0[._]attentions|output_blocks[._][0-2][._]1[._]"
                       r"(transformer|proj|norm))")
_CROSS_KV = re.compile(r"attn2[._]to_[kv]")
_TE_Q = re.compile(r"(lora_te1?_|text_encoder\.|cond_stage_model|embedders\.0).*(q_proj|in_proj)")
_PROJ_IN = re.compile(r"proj_in")
_DOWN_PARTS = ("lora_down.weight", "lora_A.weight", "diff", "weight")
_FLUX_BLOCKS = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d+[._]")
# T5 as a pipeline's third encoder (kohya, OneTrainer's SD3, ComfyUI): Flux's, Chroma's or
# SD3's; as its second (OneTrainer's and diffusers' Flux): only Flux's; as its only one
# (`text_encoder.`, `lora_te_`, bare): Chroma's or Wan's umT5.
_T5 = re.compile(r"^(lora_te3_|lycoris_te3_)|t5xxl")
_FLUX_T5 = re.compile(r"^(lora_te2_encoder_block|text_encoder_2\.encoder\.block)")
_ONLY_T5 = re.compile(r"^(text_encoder\.|lora_te1?_|lycoris_te1?_)?"
                      r"encoder[._]block[._]\d+[._]layer[._]")
_CLIP_G = re.compile(r"^(lora_te2_|lycoris_te2_|text_encoder_2\.)text_model|clip_g")
# ComfyUI's names of the encoders only one architecture has
_NAMED_TE = re.compile(r"(^|[._])(qwen3_4b|qwen25_7b|umt5xxl)[._]")
NAMED_TE = {"qwen3_4b": "zimage", "qwen25_7b": "qwenimage", "umt5xxl": "wan22"}
# a language model's decoder layer (CLIP's are `encoder.layers.N` with fc1/fc2, out_proj)
_LM = re.compile(r"(?<!encoder[._])layers[._]\d+[._]"
                 r"(self_attn[._][qkvo]_proj|mlp[._](gate|up|down)_proj)")
# the layers that read the hidden width
_LM_HIDDEN = re.compile(r"(self_attn[._][qkv]_proj|mlp[._](gate|up)_proj)")
_VL = re.compile(r"language_model|(^|[._])visual[._]")  # Qwen2.5-VL's wrappers and vision tower
LM_WIDTHS = {2560: "zimage", 3584: "qwenimage"}  # Qwen3-4B, Qwen2.5-VL-7B
_CHROMA = re.compile(r"distilled_guidance_layer")
_ZIMAGE = re.compile(r"(^|[._])((layers|noise_refiner|context_refiner)[._]\d+[._](attention|"
                     r"feed_forward)[._]|all_x_embedder|all_final_layer|cap_embedder)")
# `transformer_blocks` at the top of a transformer, not inside an SD UNet's attentions.N
_TOP_BLOCKS = r"(^|(?<![0-9][._])(?<=[._]))transformer_blocks"
_QWEN = re.compile(_TOP_BLOCKS + r"[._]\d+[._](img|txt)_(mlp|mod)[._]|(^|[._])txt_norm[._]")
_SD3 = re.compile(r"(^|[._])joint_blocks[._]\d+[._]|" + _TOP_BLOCKS + r"[._]\d+[._]attn2[._]|"
                  r"(^|[._])pos_embed[._]proj")
_WAN = re.compile(r"^(model[._])?(diffusion_model[._]|transformer[._]|lora_unet_+|lycoris_|"
                  r"lora_transformer_|base_model[._]model[._])?blocks[._]\d+[._]"
                  r"(self_attn|cross_attn|attn1|attn2|ffn)[._]")
_JOINT_LAYER = re.compile(_TOP_BLOCKS + r"[._](\d+)[._](attn[._](to_|add_)|ff|norm1)")
SD3_WIDTHS = (1536, 2432)  # SD3.5 Medium, Large: 64 per block
LAST_FLUX_DOUBLE, LAST_SD3_JOINT = 18, 37


def _dit(keys: Sequence[str], shape: Callable[[str], Sequence[int]]
         ) -> Optional[Tuple[Optional[str], List[str]]]:
    """Z-Image, Wan, Qwen-Image or SD3 by layers only they have; for diffusers names three
    trees share (`transformer_blocks.N.attn.to_q`), by block index and width; (None,
    reasons) when those say a transformer but not which."""
    if any(_ZIMAGE.search(k) for k in keys):
        return "zimage", ["it has Z-Image's layers (layers.N.attention, refiners, cap_embedder)"]
    if any(_WAN.search(k) for k in keys):  # before SD3: `lora_transformer_blocks_0_attn2`
        return "wan22", ["it has Wan's blocks (self- and cross-attention)"]
    if any(_QWEN.search(k) for k in keys):
        return "qwenimage", ["it has Qwen-Image's img/txt MLP or modulation layers"]
    if any(_SD3.search(k) for k in keys):
        return "sd3", ["it has SD3's joint blocks (MMDiT)"]
    if any(_FLUX_BLOCKS.search(k) for k in keys):
        return None  # Flux's single-stream blocks
    joint = [k for k in keys if _JOINT_LAYER.search(k)]
    if not joint:
        return None
    deepest = max(int(_JOINT_LAYER.search(k).group(2)) for k in joint)
    if deepest > LAST_SD3_JOINT:
        return "qwenimage", [f"it has a double-stream block {deepest} (Qwen-Image has 60)"]
    for k in joint:
        width = _input_width(k, shape)
        if width in SD3_WIDTHS:
            return "sd3", [f"its joint blocks are {width} wide (SD3.5)"]
    # Flux's double blocks and Qwen-Image's in diffusers' names: it loads on either
    return None, ["its transformer_blocks fit Flux and Qwen-Image alike"]


def _text_encoders(keys: Sequence[str], shape: Callable[[str], Sequence[int]]
                   ) -> Optional[Tuple[Optional[str], List[str]]]:
    """SD3, Flux, Z-Image, Qwen-Image or Wan by their text encoders' keys: ComfyUI's names
    for them, where a T5 sits, a language model's width; (None, reasons) when the keys are
    a text encoder two architectures share."""
    for k in keys:
        m = _NAMED_TE.search(k)
        if m:
            return NAMED_TE[m.group(2)], [f"its text-encoder keys name {m.group(2)}"]
    t5 = _t5(keys)
    if t5 is not None:
        return t5
    lm = [k for k in keys if _LM.search(k)]
    if lm:
        if any(_VL.search(k) for k in keys):
            return "qwenimage", ["its text encoder is Qwen2.5-VL (language_model, visual)"]
        for k in lm:
            width = _input_width(k, shape) if _LM_HIDDEN.search(k) else None
            if width in LM_WIDTHS:
                return LM_WIDTHS[width], [f"its language-model text encoder is {width} wide"]
        return None, ["its language-model text encoder's width says neither Z-Image (2560) "
                      "nor Qwen-Image (3584)"]
    if any(_ONLY_T5.match(k) for k in keys):
        return None, ["its T5 keys fit Chroma's T5 and Wan's umT5 alike"]
    return None


def _t5(keys: Sequence[str]) -> Optional[Tuple[Optional[str], List[str]]]:
    """SD3 or Flux by where a file puts its T5 and which CLIPs are beside it."""
    if any(k.startswith("text_encoder_3.") for k in keys):
        return "sd3", ["it has keys for diffusers' text_encoder_3 (SD3's T5)"]
    if any(_FLUX_T5.match(k) for k in keys):
        return "flux", ["it has keys for a T5 as the second text encoder (Flux's)"]
    if not any(_T5.search(k) for k in keys):
        return None
    if any(_CLIP_G.search(k) for k in keys):
        return "sd3", ["it has keys for a T5 beside CLIP-G (SD3's three text encoders)"]
    # beside CLIP-L alone it still fits SD3 (a file may train two of its three encoders)
    return None, ["its T5 keys fit Flux's, Chroma's and SD3's T5 alike"]


def _flux_family(keys: Sequence[str]) -> Optional[Tuple[str, List[str]]]:
    if not any(_FLUX_BLOCKS.search(k) for k in keys):
        return None
    reason = "its transformer blocks are the Flux family's (double- and single-stream)"
    if any(_CHROMA.search(k) for k in keys):
        return "chroma", [reason, "it has Chroma's distilled guidance layer"]
    return "flux", [reason]


def detect_architecture(keys: Iterable[str], shape: Callable[[str], Sequence[int]],
                        metadata_arch: Optional[str] = None) -> Tuple[Optional[str], List[str]]:
    """(architecture or None when the signals disagree or are absent, the reasons)."""
    keys = list(keys)
    dit = _dit(keys, shape)
    if dit is not None:
        return dit
    if not any(_FLUX_BLOCKS.search(k) for k in keys):  # Flux's own blocks decide first
        text = _text_encoders(keys, shape)
        if text is not None and (text[0] is not None or metadata_arch not in TRANSFORMERS):
            return text
    family = _flux_family(keys)
    if family is not None:
        return family
    if metadata_arch in TRANSFORMERS:
        return metadata_arch, [f"its metadata says {metadata_arch}"]
    votes: Dict[str, List[str]] = {a: [] for a in ARCHS if a not in TRANSFORMERS}

    def vote(archs: Sequence[str], reason: str):
        for a in archs:
            votes[a].append(reason)

    if any(_TE2.match(k) for k in keys):
        vote(("sdxl",), "it has keys for a second text encoder")
    if any(_OPENCLIP_CKPT.match(k) for k in keys):
        vote(("sd2",), "its text encoder is OpenCLIP (cond_stage_model.model)")
    if any(_HF_CKPT.match(k) for k in keys):
        vote(("sd1",), "its text encoder is CLIP (cond_stage_model.transformer)")
    if any(_FIRST_LEVEL_ATTN.search(k) for k in keys):
        vote(("sd1", "sd2"), "it has attention in the UNet's first level")
    deep = [k for k in keys if _DEEP_TRANSFORMER.search(k)]
    if deep or any(_UP0_ATTN.search(k) for k in keys):
        vote(("sdxl",), "its UNet attention layout is SDXL's")
    for k in keys:
        width = _input_width(k, shape)
        if width is None:
            continue
        if _CROSS_KV.search(k) and width in CONTEXT_WIDTH:
            vote(CONTEXT_WIDTH[width], f"its cross-attention reads {width}-wide text")
            break
    for k in keys:
        width = _input_width(k, shape)
        if width is not None and _TE_Q.search(k) and width in TEXT_WIDTH:
            vote(TEXT_WIDTH[width], f"its text encoder is {width} wide")
            break
    proj = next((k for k in keys if _PROJ_IN.search(k) and k.endswith(_DOWN_PARTS)), None)
    if proj is not None and proj.endswith(("lora_down.weight", "lora_A.weight", "diff")):
        if len(shape(proj)) == 4:
            vote(("sd1",), "its proj_in layers are convolutions")
        else:
            vote(("sd2", "sdxl"), "its proj_in layers are linear")
    if metadata_arch in ARCHS:
        vote((metadata_arch,), f"its metadata says {metadata_arch.upper()}")

    strongest = max(len(v) for v in votes.values())
    if strongest == 0:
        return None, []
    best = [a for a, v in votes.items() if len(v) == strongest]
    if len(best) > 1:
        return None, sorted({r for a in best for r in votes[a]})
    return best[0], votes[best[0]]


def _input_width(key: str, shape: Callable[[str], Sequence[int]]) -> Optional[int]:
    """The input width of the layer a down-projection or full weight belongs to (LoHa's
    w_b shows it for linear layers, where the kernel is 1)."""
    if key.endswith(("lora_down.weight", "lora_A.weight", "hada_w1_b", "hada_w2_b")):
        s = shape(key)
        return int(s[1]) if len(s) >= 2 else None
    if key.endswith(("in_proj_weight", ".weight")) and not re.search(r"lora_|hada_|lokr_", key):
        s = shape(key)
        return int(s[1]) if len(s) == 2 else None
    return None
