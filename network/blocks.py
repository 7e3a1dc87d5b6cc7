"""Block lists per architecture and lora-block-weight (LBW) vectors and presets.

Block names follow LBW. SD UNets: BASE is the text encoder(s), INxx/M00/OUTxx the LDM input,
middle and output blocks. The Flux family (Flux, Chroma): CLIP and T5 the text encoders, IN the
layers before the blocks (img_in, txt_in, the time, vector and guidance embedders), D00–D18 the
double-stream and S00–S37 the single-stream blocks, OUT the final layer. Z-Image, Qwen-Image, SD3
and Wan are named after their own structure, each text encoder a block of its own before the
denoiser's (docs/design.md §3). LBW vectors name a subset of blocks
by their length; blocks a vector does not name get 0, exactly as LBW's `to26` does.
"""
from __future__ import annotations

import random
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from ..parser import BlockWeights, VectorEntry, parse_weights


def _names(prefix: str, indices) -> Tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in indices)


SD1_BLOCKS = ("BASE",) + _names("IN", range(12)) + ("M00",) + _names("OUT", range(12))
SDXL_BLOCKS = ("BASE",) + _names("IN", range(9)) + ("M00",) + _names("OUT", range(9))
FLUX_DOUBLE, FLUX_SINGLE = 19, 38  # Flux.1's and Chroma's blocks
# LBW's BLOCKIDFLUX, the 61 blocks of its Flux vectors.
FLUX_BLOCKS = ("CLIP", "T5", "IN") + _names("D", range(FLUX_DOUBLE)) + \
    _names("S", range(FLUX_SINGLE)) + ("OUT",)
# Z-Image: QWEN3 (its text encoder), IN (the embedders), its noise refiner (image tokens) and
# context refiner (caption tokens), the 30 single-stream layers, OUT (the final layer).
ZIMAGE_REFINERS, ZIMAGE_LAYERS = 2, 30
ZIMAGE_BLOCKS = ("QWEN3", "IN") + _names("NR", range(ZIMAGE_REFINERS)) + \
    _names("CR", range(ZIMAGE_REFINERS)) + _names("S", range(ZIMAGE_LAYERS)) + ("OUT",)
# Qwen-Image: QWENVL (Qwen2.5-VL's language model), IN (img_in, txt_in, the time embedder),
# 60 double-stream blocks, OUT.
QWEN_DOUBLE = 60
QWEN_BLOCKS = ("QWENVL", "IN") + _names("D", range(QWEN_DOUBLE)) + ("OUT",)
# SD3.5: BASE (CLIP-L and CLIP-G), T5 (its T5-XXL), IN (patch, caption and time/pooled
# embedders), the joint (MMDiT, double-stream) blocks — 38 in Large, 24 in Medium — and OUT.
SD3_JOINT = 38
SD3_BLOCKS = ("BASE", "T5", "IN") + _names("D", range(SD3_JOINT)) + ("OUT",)
# Wan 2.2 (each expert): UMT5 (its text encoder), IN (text and time embedders), its 40
# blocks, OUT (the head).
WAN_BLOCKS = ("UMT5", "IN") + _names("B", range(40)) + ("OUT",)
BLOCKS = {"sd1": SD1_BLOCKS, "sd2": SD1_BLOCKS, "sdxl": SDXL_BLOCKS, "flux": FLUX_BLOCKS,
          "chroma": FLUX_BLOCKS, "zimage": ZIMAGE_BLOCKS, "qwenimage": QWEN_BLOCKS,
          "sd3": SD3_BLOCKS, "wan22": WAN_BLOCKS}
ARCH_TITLES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux", "chroma": "Chroma",
               "zimage": "Z-Image", "qwenimage": "Qwen-Image", "sd3": "SD3",
               "wan22": "Wan 2.2"}
# Chroma has Flux's T5 and no CLIP: T5 is te2 on both, so one file's keys mean one encoder.
# SD3.5's T5 is te3 (`te3=` sets it alone, `te=` with the others; its block T5 scales it); a
# model of one encoder has it as te1. The text-encoder block names are parser.TEXT_ENCODER_BLOCKS.
TEXT_ENCODERS = {"sd1": ("te1",), "sd2": ("te1",), "sdxl": ("te1", "te2"), "flux": ("te1", "te2"),
                 "chroma": ("te2",), "zimage": ("te1",), "qwenimage": ("te1",),
                 "sd3": ("te1", "te2", "te3"), "wan22": ("te1",)}
TEXT_ENCODER_TITLES = {"sd1": {"te1": "CLIP-L"}, "sd2": {"te1": "OpenCLIP-H"},
                       "sdxl": {"te1": "CLIP-L", "te2": "OpenCLIP-G"},
                       "flux": {"te1": "CLIP-L", "te2": "T5-XXL"}, "chroma": {"te2": "T5-XXL"},
                       "zimage": {"te1": "Qwen3-4B"}, "qwenimage": {"te1": "Qwen2.5-VL-7B"},
                       "sd3": {"te1": "CLIP-L", "te2": "CLIP-G", "te3": "T5-XXL"},
                       "wan22": {"te1": "umT5-XXL"}}
# The block a text-encoder layer belongs to.
TEXT_BLOCKS = {"sd1": {"te1": "BASE"}, "sd2": {"te1": "BASE"}, "sdxl": {"te1": "BASE", "te2": "BASE"},
               "flux": {"te1": "CLIP", "te2": "T5"}, "chroma": {"te2": "T5"},
               "zimage": {"te1": "QWEN3"}, "qwenimage": {"te1": "QWENVL"},
               "sd3": {"te1": "BASE", "te2": "BASE", "te3": "T5"}, "wan22": {"te1": "UMT5"}}
GROUPS = ("in", "mid", "out", "double", "single")  # the group keys of a tag

# LBW's vector layouts by length (its BLOCKID17/26 for SD1 and SD2, BLOCKID12/20 for SDXL).
LBW_LAYOUTS: Dict[str, Dict[int, Tuple[str, ...]]] = {
    "sd1": {
        17: ("BASE",) + _names("IN", (1, 2, 4, 5, 7, 8)) + ("M00",) + _names("OUT", range(3, 12)),
        26: SD1_BLOCKS,
    },
    "sdxl": {
        12: ("BASE",) + _names("IN", (4, 5, 7, 8)) + ("M00",) + _names("OUT", range(6)),
        20: SDXL_BLOCKS,
    },
}
LBW_LAYOUTS["sd2"] = LBW_LAYOUTS["sd1"]
LBW_LAYOUTS["flux"] = LBW_LAYOUTS["chroma"] = {len(FLUX_BLOCKS): FLUX_BLOCKS}
# LBW has no list for these: a vector names every block, in BLOCKS order.
for _arch in ("zimage", "qwenimage", "sd3", "wan22"):
    LBW_LAYOUTS[_arch] = {len(BLOCKS[_arch]): BLOCKS[_arch]}

# LBW's default presets (its DEF_WEIGHT_PRESET, 17 values in SD1 order).
_SD1_PRESETS = {
    "NONE": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "ALL": (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5),
}
# LBW ships SD1 presets only. These are the same presets for SDXL's 12 attention blocks
# (BASE, IN04 IN05 | IN07 IN08, M00, OUT00-02 | OUT03-05): "shallow" and "deep" halves
# of the in and out sides, so each name keeps its meaning.
_SDXL_PRESETS = {
    "NONE": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "ALL": (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "INS": (1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5),
}
# LBW's one Flux preset; its other defaults are SD's 17-value lists.
_FLUX_PRESETS = {"FLUXALL": (1,) * len(FLUX_BLOCKS)}
PRESETS = {"sd1": _SD1_PRESETS, "sd2": _SD1_PRESETS, "sdxl": _SDXL_PRESETS,
           "flux": _FLUX_PRESETS, "chroma": _FLUX_PRESETS,  # name -> values
           **{a: {"ALL": (1,) * len(BLOCKS[a])} for a in ("zimage", "qwenimage", "sd3", "wan22")}}


def group_of(block: str) -> Optional[str]:
    """The group (GROUPS) a block belongs to; None for the text encoders (BASE, CLIP, T5,
    QWEN3, QWENVL, UMT5)."""
    if block.startswith(("IN", "NR", "CR")):  # Z-Image's refiners run before its layers
        return "in"
    if block == "M00":
        return "mid"
    if block.startswith("OUT"):
        return "out"
    if block[0] in "DS" and block[1:].isdigit():
        return "double" if block[0] == "D" else "single"
    return None


def parse_preset_file(text: str) -> Dict[str, str]:
    """Read LBW's lbwpresets.txt format: one `NAME:v,v,...` per line, `#` comments."""
    presets = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            name, values = line.split(":", 1)
            presets[name.strip()] = values.strip()
    return presets


def resolve_weights(weights: BlockWeights, arch: str, x: Optional[float], rng: random.Random,
                    user_presets: Mapping[str, str] = ()) -> Tuple[Optional[np.ndarray],
                                                                   Tuple[float, ...], str]:
    """LBW vector or preset → (one value per block of BLOCKS[arch], the vector's values, error)."""
    if weights.preset is None:
        entries = weights.entries
    elif weights.preset in user_presets:  # a user's text may hold R, U and X: parse it
        vector, _ = parse_weights(user_presets[weights.preset])
        if vector is None or vector.preset is not None:
            return None, (), (f"lbw preset '{weights.preset}' is not a vector: "
                              f"'{user_presets[weights.preset]}'")
        entries = vector.entries
    elif weights.preset in PRESETS[arch]:
        entries = tuple(VectorEntry("num", float(v)) for v in PRESETS[arch][weights.preset])
    else:
        known = ", ".join(sorted(set(PRESETS[arch]) | set(user_presets)))
        return None, (), f"unknown lbw preset '{weights.preset}'; presets: {known}"
    values = tuple(_entry_value(e, x, rng) for e in entries)
    layouts = LBW_LAYOUTS[arch]
    if len(values) not in layouts:
        lengths = " or ".join(str(n) for n in layouts)
        what = f"preset '{weights.preset}'" if weights.preset else "lbw"
        return None, values, (f"{what} has {len(values)} values; {ARCH_TITLES[arch]} takes "
                              f"{lengths} (lora-block-weight's block lists)")
    table = dict(zip(layouts[len(values)], values))
    return np.array([table.get(b, 0.0) for b in BLOCKS[arch]]), values, ""


def _entry_value(entry, x: Optional[float], rng: random.Random) -> float:
    # R, U and X as lora-block-weight defines them (random values rounded to 3 places).
    if entry.kind == "R":
        return round(rng.random(), 3)
    if entry.kind == "U":
        return round(rng.uniform(-0.5, 1.5), 3)
    if entry.kind == "X":
        return (1.0 if x is None else x) + entry.value
    return entry.value

