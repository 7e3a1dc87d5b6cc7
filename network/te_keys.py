"""Every name a file gives a layer of the text encoders that are not CLIP: T5-XXL (Flux's and
Chroma's te2, SD3.5's te3), umT5-XXL (Wan 2.2's te1), Qwen3-4B (Z-Image's te1) and the
language model of Qwen2.5-VL-7B (Qwen-Image's te1). CLIP's names are keymap.py's
(`text_spellings`); the layers themselves are found by t5_keys.py and lm_keys.py.

A file writes `<prefix><wrapper><canonical name>`: the prefix says the trainer — kohya
sd-scripts and OneTrainer `lora_teN_` (dots as underscores; N counts the pipeline's encoders,
so the same T5 is `lora_te3_` beside CLIP-L and CLIP-G), SimpleTuner `lycoris_teN_`, ComfyUI
`text_encoders.<its name>.transformer.`, Forge Neo `text_encoders.<its name>.` then the path
in its own tree (`qwen3` and `qwen25_7b` hold the language model as `model.`, no `transformer.`;
its `t5xxl`/`umt5xxl` are ComfyUI's), diffusers/PEFT the pipeline attribute
(`text_encoder.`, `text_encoder_3.`), DiffSynth and a lone encoder's file nothing; the wrapper
is the language model's class around its decoder (lm_keys.WRAPPERS; T5 has none).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterator, List, Optional, Tuple

from torch import nn

from . import lm_keys, t5_keys


class Kind(Enum):
    """How an encoder's layers are found and wrapped."""

    T5 = "t5"  # T5 and umT5: encoder.block.N.layer.*
    LM = "lm"  # decoder-only language models: layers.N.self_attn / mlp


@dataclass(frozen=True)
class EncoderNames:
    kind: Kind
    comfy: str  # ComfyUI's name of the encoder: text_encoders.<comfy>.transformer.
    dotted: Tuple[str, ...]  # diffusers/PEFT prefixes, "" for bare names
    underscored: Tuple[str, ...]  # kohya-style prefixes

    def spellings(self, name: str) -> List[str]:
        """Every name a file may give the canonical layer `name`."""
        inner = [w + name for w in (lm_keys.WRAPPERS if self.kind is Kind.LM else ("",))]
        dotted = self.dotted + (f"text_encoders.{self.comfy}.transformer.",)
        names = [p + n for p in dotted for n in inner]
        names += [u + n.replace(".", "_") for u in self.underscored for n in inner]
        return list(dict.fromkeys(names))


# A pipeline's only encoder: diffusers' `text_encoder`, kohya's `lora_te_`/`lora_te1_`.
_ONLY = dict(dotted=("text_encoder.", "base_model.model.", ""),
             underscored=("lora_te_", "lora_te1_", "lycoris_te_", "lycoris_te1_"))


def _only(neo: str) -> dict:
    """A pipeline's only encoder, which Forge Neo also names `neo` (its JointTextEncoder entry,
    `text_encoders.` before it; the wrapper `model.` follows)."""
    return dict(_ONLY, dotted=_ONLY["dotted"] + (neo,))


# Flux's T5: kohya `lora_te3_` (sd-scripts counts CLIP-L, CLIP-G, T5 as SD3 does), OneTrainer
# `lora_te2_` (its second encoder there), diffusers `text_encoder_2` (Chroma's pipeline:
# `text_encoder`, which on Flux is CLIP-L, whose layers have other names).
FLUX_T5 = EncoderNames(Kind.T5, "t5xxl", ("text_encoder_2.", "text_encoder.", ""),
                       ("lora_te3_", "lora_te2_", "lycoris_te3_"))
# {(architecture, component): names}; Chroma's T5 is the Flux family's te2.
ENCODERS = {
    ("flux", "te2"): FLUX_T5,
    ("sd3", "te3"): EncoderNames(Kind.T5, "t5xxl", ("text_encoder_3.", ""),
                                 ("lora_te3_", "lycoris_te3_")),
    ("wan22", "te1"): EncoderNames(Kind.T5, "umt5xxl", **_ONLY),
    ("zimage", "te1"): EncoderNames(Kind.LM, "qwen3_4b", **_only("text_encoders.qwen3.")),
    ("qwenimage", "te1"): EncoderNames(Kind.LM, "qwen25_7b", **_only("text_encoders.qwen25_7b.")),
}
# An encoder of an architecture that names none (a tree given without its denoiser).
FALLBACK = {Kind.T5: FLUX_T5, Kind.LM: EncoderNames(Kind.LM, "llm", **_ONLY)}


def names_for(arch: str, component: str, kind: Kind) -> EncoderNames:
    found: Optional[EncoderNames] = ENCODERS.get((arch, component))
    return found if found is not None and found.kind is kind else FALLBACK[kind]


_FINDERS = {Kind.T5: (t5_keys.t5_root, t5_keys.t5_layers),
            Kind.LM: (lm_keys.lm_root, lm_keys.lm_layers)}


def kind_of(tree: nn.Module) -> Optional[Kind]:
    """T5 or a language model; None for anything else (CLIP: keymap.py)."""
    for kind, (root, _) in _FINDERS.items():
        try:
            root(tree)
        except ValueError:
            continue
        return kind
    return None


def layers(kind: Kind, tree: nn.Module, patchable) -> Iterator[Tuple[str, str, nn.Module]]:
    """(canonical name, path in the component tree, module) of every layer of the encoder."""
    return _FINDERS[kind][1](tree, patchable)
