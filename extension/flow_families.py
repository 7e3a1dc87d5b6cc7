"""What differs between the diffusers pipelines of the transformer families NetWeave hosts
(the standalone host and SD.Next run the same pipelines): one entry per family, read by
flow_run.py (text, rows, schedule) and by each host's loader. Everything else — the engine,
the block lists, the token layout — comes from the architecture's key tables
(network/dit_arches.py, network/tokens.py).

Text arguments follow one naming rule in every one of these pipelines: `prompt_embeds`,
`pooled_prompt_embeds` and the family's mask argument, each with a `negative_` twin; the
transformer takes the text as `encoder_hidden_states` (Z-Image: its third positional argument,
a list of one caption tensor per image).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, Optional, Tuple

from ..network.blocks import TEXT_ENCODERS


class Guidance(Enum):
    """How the CFG field reaches the pipeline, and when it runs the negative prompt."""

    FLUX = "flux"  # distilled guidance (guidance_scale, no negative rows), else true_cfg_scale
    CFG = "cfg"  # guidance_scale; negative rows above 1 (Chroma, SD3, Wan)
    CFG_ABOVE_ZERO = "cfg above zero"  # Z-Image: guidance_scale s, pred = pos + s·(pos − neg)
    TRUE_CFG = "true cfg"  # Qwen-Image: true_cfg_scale above 1 with a negative prompt


class Schedule(Enum):
    """How the pipeline sets up its scheduler (flow_run.flow_schedule repeats it)."""

    SHIFTED = "shifted"  # sigmas 1 → 1/steps, shifted by mu from the image's token count
    OWN = "own"  # the scheduler's own timesteps (SD3: mu only when it shifts dynamically;
    #               Wan: UniPC with its flow_shift)


@dataclass(frozen=True)
class Family:
    arch: str  # NetWeave's architecture (network/blocks.py)
    pipelines: Tuple[str, ...]  # diffusers pipeline class names
    # (pipeline attribute, NetWeave's text-encoder name): the engine gets those the
    # architecture's key tables name (network/blocks.TEXT_ENCODERS)
    encoders: Tuple[Tuple[str, str], ...]
    # encode_prompt's return values by role ("embeds", "pooled", "mask"; None: not used)
    outputs: Tuple[Optional[str], ...]
    guidance: Guidance
    schedule: Schedule
    text_length: int  # the pipeline call's default max_sequence_length
    tokenizer: str  # the tokenizer whose model_max_length may shorten it (a small model)
    mask_arg: Optional[str] = None  # the pipeline's argument for the text's attention mask
    text_position: Optional[int] = None  # the transformer's text as a positional argument
    size: int = 1024  # the pipeline's default picture size (where it has no default_sample_size)
    text_arg: str = "encoder_hidden_states"  # the transformer's text argument
    sigmas: Optional[str] = None  # the pipeline module's function for its default sigmas

    def trees(self, pipe) -> Dict[str, object]:
        """The engine's components: "unet" is the (first) transformer; the text encoders
        under NetWeave's names, those the architecture maps."""
        known = TEXT_ENCODERS[self.arch]
        trees = {"unet": pipe.transformer}
        for attr, name in self.encoders:
            if name in known and getattr(pipe, attr, None) is not None:
                trees[name] = getattr(pipe, attr)
        return trees

    def pipeline_args(self, role: str, negative: bool = False) -> Optional[str]:
        """The pipeline's argument for a text tensor of `role`."""
        name = {"embeds": "prompt_embeds", "pooled": "pooled_prompt_embeds",
                "mask": self.mask_arg}[role]
        return None if name is None else ("negative_" + name if negative else name)

    def cfg(self, scale: float, distilled: bool = False) -> bool:
        """Whether the pipeline runs the negative prompt at this CFG field."""
        if self.guidance is Guidance.FLUX and distilled:
            return False
        return scale > 0 if self.guidance is Guidance.CFG_ABOVE_ZERO else scale > 1

    def guidance_args(self, scale: float, cfg: bool, distilled: bool = False) -> dict:
        """The CFG field as the pipeline's argument(s)."""
        if self.guidance is Guidance.TRUE_CFG or (self.guidance is Guidance.FLUX and not distilled):
            return {"true_cfg_scale": scale if cfg else 1.0}
        return {"guidance_scale": scale}


FAMILIES = {f.arch: f for f in (
    Family("flux", ("FluxPipeline",), (("text_encoder", "te1"), ("text_encoder_2", "te2")),
           ("embeds", "pooled", None), Guidance.FLUX, Schedule.SHIFTED, 512, "tokenizer_2"),
    Family("chroma", ("ChromaPipeline",), (("text_encoder", "te2"),), ("embeds", None, "mask"),
           Guidance.CFG, Schedule.SHIFTED, 512, "tokenizer", mask_arg="prompt_attention_mask"),
    Family("zimage", ("ZImagePipeline",), (("text_encoder", "te1"),), ("embeds", None),
           Guidance.CFG_ABOVE_ZERO, Schedule.SHIFTED, 512, "tokenizer", text_position=2,
           text_arg="cap_feats", sigmas="get_default_z_image_sigmas"),
    Family("qwenimage", ("QwenImagePipeline",), (("text_encoder", "te1"),), ("embeds", "mask"),
           Guidance.TRUE_CFG, Schedule.SHIFTED, 512, "tokenizer", mask_arg="prompt_embeds_mask"),
    Family("sd3", ("StableDiffusion3Pipeline",),
           (("text_encoder", "te1"), ("text_encoder_2", "te2"), ("text_encoder_3", "te3")),
           ("embeds", None, "pooled", None), Guidance.CFG, Schedule.OWN, 256, "tokenizer_3"),
    Family("wan22", ("WanPipeline",), (("text_encoder", "te1"),), ("embeds", None),
           Guidance.CFG, Schedule.OWN, 512, "tokenizer", size=480),
)}
PIPELINES = {name: f.arch for f in FAMILIES.values() for name in f.pipelines}


def family_of(pipe) -> Family:
    """The family of a pipeline by its class (or a base class: a host may subclass it)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINES:
            return FAMILIES[PIPELINES[cls.__name__]]
    raise ValueError(f"a {type(pipe).__name__}: NetWeave hosts " + ", ".join(PIPELINES))


def has_experts(pipe) -> bool:
    """Wan 2.2 A14B: a high-noise `transformer` and a low-noise `transformer_2`, switched at
    the pipeline's boundary_ratio."""
    return getattr(pipe, "transformer_2", None) is not None and \
        getattr(getattr(pipe, "config", None), "boundary_ratio", None) is not None
