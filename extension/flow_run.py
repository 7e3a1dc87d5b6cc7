"""The engine through one call of a flow-matching transformer's pipeline — FluxPipeline,
ChromaPipeline, ZImagePipeline, QwenImagePipeline, StableDiffusion3Pipeline, WanPipeline (the
standalone host, SD.Next): what pipeline_run.py does for Stable Diffusion. What differs per
family is one entry of flow_families.py.

Why a forward pre-hook on the transformer instead of the step callback's tensors:

- the text changes where a text-encoder segment ends, but these pipelines' callbacks can hand
  back only `prompt_embeds`, not a pooled vector nor the negative prompt's embeddings, which
  they keep from their first step;
- with true CFG (Chroma, Qwen-Image, Wan, a Flux without distilled guidance) the pipeline calls
  the transformer twice per step, the prompt's rows, then the negative prompt's; SD3 and
  Z-Image call it once with both (SD3: negative rows first; Z-Image: a list, the prompt's
  first): the engine must know before each call which rows it gets (`neg=` acts on the
  negative ones).

So the pipeline is handed step 0's embeddings; before every transformer call the hook tells
which prompt each block of `batch` rows carries (by the tensors it was handed), sets the
engine's rows, puts in the current segment's embeddings and gives the engine the prompt's
encodings with each regional text-encoder network (which run as streams of their own:
network/blend.py). It goes before the engine's own pre-hooks (the streams repeat whatever this
one passes on). A model of two experts (Wan 2.2) gets the hook on both.
"""
from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from .flow_families import FAMILIES, Family, Schedule, family_of, has_experts
from .pipeline_run import segment_encodings

Embeds = Union[torch.Tensor, List[torch.Tensor]]  # Z-Image: one tensor per image


@dataclass
class Text:
    embeds: Embeds  # the text encoder's (rows, tokens, width), or one (tokens, width) per row
    pooled: Optional[torch.Tensor] = None  # Flux: CLIP-L's pooled vector; SD3: CLIP-L+G's
    mask: Optional[torch.Tensor] = None  # Chroma, Qwen-Image: which tokens the model attends to


def text_length(pipe, family: Optional[Family] = None) -> int:
    """Text tokens per prompt: the pipeline's default, or fewer where its tokenizer says so (a
    small model trained on short captions)."""
    family = family or family_of(pipe)
    tokenizer = getattr(pipe, family.tokenizer, None)
    return int(min(family.text_length, getattr(tokenizer, "model_max_length", family.text_length)))


def denoisers(pipe) -> list:
    """The transformers a pipeline calls: Wan 2.2's two experts, else its one."""
    return [pipe.transformer, pipe.transformer_2] if has_experts(pipe) else [pipe.transformer]


def _rows(x: Embeds) -> int:
    return len(x) if isinstance(x, list) else int(x.shape[0])


def _same(a: Embeds, b: Embeds) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            x is y or (x.shape == y.shape and torch.equal(x, y)) for x, y in zip(a, b))
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _joined(parts: List[Embeds]) -> Embeds:
    """Blocks of rows as the pipeline joins them (a list for Z-Image, else one tensor)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], list):
        return [t for p in parts for t in p]
    return torch.cat(parts)


class FlowRun:
    def __init__(self, engine, pipe, arch: str, device, prompt: str, negative: str,
                 batch: int, cfg: bool, steps: int):
        """`cfg`: the pipeline runs the negative prompt too."""
        self.engine, self.pipe, self.arch, self.device = engine, pipe, arch, device
        self.family = FAMILIES[arch]
        self.batch, self.cfg, self.steps = batch, cfg, steps
        self.prompt, self.negative = prompt, negative
        self.length = text_length(pipe, self.family)
        self.embeds = self._encodings()
        self._joined: Dict[Tuple[int, Tuple[bool, ...]], tuple] = {}  # _texts, made once
        self.segment = engine.segment_at(0)
        self.given = self.embeds[self.segment]  # what the pipeline holds for every step
        engine.set_rows([0] * batch, [False] * batch)
        engine.set_step(0)
        self.handles = [m.register_forward_pre_hook(self._before_call, with_kwargs=True,
                                                    prepend=True) for m in denoisers(pipe)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def first_args(self) -> dict:
        """The pipeline's text arguments (step 0's segment)."""
        args = {}
        for negative in (False, True) if self.cfg else (False,):
            text = self.given["neg" if negative else "pos"]
            for role in ("embeds", "pooled", "mask"):
                name = self.family.pipeline_args(role, negative)
                if name is not None and role in self.family.outputs:
                    args[name] = getattr(text, role)
        return args

    def step_end(self, i: int) -> Dict[str, torch.Tensor]:
        """After step i: the weights for step i+1 (the text follows in the hook)."""
        k = i + 1
        if k < self.steps:
            self.engine.set_step(k)
            self.segment = self.engine.segment_at(k)
        return {}

    # ---- each transformer call ---------------------------------------------------------
    def _before_call(self, module, args, kwargs):
        family = self.family
        positional = family.text_arg not in kwargs and family.text_position is not None \
            and len(args) > family.text_position
        text = args[family.text_position] if positional else kwargs.get(family.text_arg)
        if not isinstance(text, (torch.Tensor, list)) or not _rows(text) \
                or _rows(text) % self.batch:
            return None
        kinds = self._kinds(text)  # per block of `batch` rows: the negative prompt's?
        self.engine.set_rows([0] * _rows(text), [u for u in kinds for _ in range(self.batch)])
        e = self.embeds[self.segment]
        base, pooled, variants, pooled_variants = self._texts(e, kinds)
        # Z-Image's captions as its list holds them, each of its own length: the engine
        # matches each row with its own (network/bypass.py, Runtime.variant_text)
        self.engine.set_text_variants(base, variants, pooled, pooled_variants)
        if e is self.given:
            return None  # step 0's segment: the pipeline's own tensors
        if positional:
            args = args[:family.text_position] + (base,) + args[family.text_position + 1:]
        else:
            kwargs = dict(kwargs, **{family.text_arg: base})
        if pooled is not None and "pooled_projections" in kwargs:
            kwargs["pooled_projections"] = pooled
        return args, kwargs

    def _texts(self, e: dict, kinds: List[bool]):
        """(text, pooled, {j: text with network j}, {j: its pooled}) of a call whose blocks of
        rows are `kinds`, for segment encodings `e`: joined once per segment and layout, not
        at every call."""
        key = (id(e), tuple(kinds))
        if key not in self._joined:
            now = [e["neg" if u else "pos"] for u in kinds]
            base = _joined([t.embeds for t in now])
            pooled = None if now[0].pooled is None else torch.cat([t.pooled for t in now])
            variants, pooled_variants = {}, {}
            if not all(kinds):  # the negative prompt's rows have none
                for j, v in e["variants"].items():
                    rows = [e["neg"] if u else v for u in kinds]
                    variants[j] = _joined([t.embeds for t in rows])
                    if pooled is not None:
                        pooled_variants[j] = torch.cat([t.pooled for t in rows])
            self._joined[key] = (base, pooled, variants, pooled_variants)
        return self._joined[key]

    def _kinds(self, text: Embeds) -> List[bool]:
        """Which blocks of `batch` rows are the negative prompt's: by the very tensors handed
        to the pipeline, else by value (the prompt's, when both are the same text)."""
        b = self.batch
        blocks = [text[i:i + b] for i in range(0, _rows(text), b)]
        if not self.cfg:
            return [False] * len(blocks)
        pos, neg = self.given["pos"].embeds, self.given["neg"].embeds
        if len(blocks) == 1 and (text is neg or text is pos):
            return [text is neg]
        return [not _same(x, pos) and _same(x, neg) for x in blocks]

    # ---- text ----------------------------------------------------------------------------
    def _encode(self, text: str) -> Text:
        """The pipeline's own encode_prompt, called with what its signature takes: one text
        for `batch` rows (a list of `batch` texts where it takes no count per prompt), the
        same text for every encoder (prompt_2/_3 None, as the pipelines read it)."""
        encode = self.pipe.encode_prompt
        params = inspect.signature(encode).parameters
        kw = {"prompt": text, "prompt_2": None, "prompt_3": None, "device": self.device,
              "do_classifier_free_guidance": False, "max_sequence_length": self.length}
        count = next((n for n in ("num_images_per_prompt", "num_videos_per_prompt")
                      if n in params), None)
        if count is None:
            kw["prompt"] = [text] * self.batch
        else:
            kw[count] = self.batch
        with torch.no_grad():
            out = encode(**{k: v for k, v in kw.items() if k in params})
        roles = {role: value for role, value in zip(self.family.outputs, out) if role}
        return Text(roles["embeds"], roles.get("pooled"), roles.get("mask"))

    def _encodings(self) -> dict:
        """Per text-encoder segment: the prompt's text, the negative prompt's with each
        network's `neg` when the pipeline runs it, and the prompt's with each regional
        network acting on the text encoders."""
        return {seg: {"pos": pos, "neg": neg, "variants": variants}
                for seg, (pos, neg, variants) in segment_encodings(
                    self.engine, "base", self._encode, self.prompt, self.negative, self.cfg).items()}


def _twin(pipe, steps: int, latent: Tuple[int, int]):
    """(scheduler, mu): a fresh twin of the pipeline's scheduler set up exactly as the pipeline
    sets its own for `steps` at a VAE latent (h, w), with the pipeline module's own
    calculate_shift and retrieve_timesteps: shifted families from sigmas 1 → 1/steps (or the
    module's own default sigmas) by mu from the image's packed token count; the others by the
    scheduler's own timesteps (mu where it shifts dynamically)."""
    import numpy as np

    family = family_of(pipe)
    module = sys.modules[type(pipe).__module__]
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    config = scheduler.config
    mu = None
    if family.schedule is Schedule.SHIFTED or config.get("use_dynamic_shifting"):
        seq = (latent[0] // 2) * (latent[1] // 2)
        mu = module.calculate_shift(seq, config.get("base_image_seq_len", 256),
                                    config.get("max_image_seq_len", 4096),
                                    config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    extra = {} if mu is None else {"mu": mu}
    if family.schedule is Schedule.SHIFTED:
        sigmas = getattr(module, family.sigmas)(steps) if family.sigmas \
            else np.linspace(1.0, 1 / steps, steps)
        module.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, **extra)
    elif hasattr(module, "retrieve_timesteps"):
        module.retrieve_timesteps(scheduler, steps, "cpu", **extra)
    else:  # WanPipeline calls set_timesteps itself
        scheduler.set_timesteps(steps, device="cpu", **extra)
    return scheduler, mu


def flow_schedule(pipe, steps: int, latent: Tuple[int, int]):
    """(sigmas, shift): the sigma the pipeline calls its transformer with at each step, and
    the shift that schedule amounts to (exp(mu) when dynamic, else the config's), what
    `explain --shift` takes."""
    scheduler, mu = _twin(pipe, steps, latent)
    config = scheduler.config
    values = tuple(float(v) for v in scheduler.sigmas[:steps])
    shift = math.exp(mu) if mu is not None and config.get("use_dynamic_shifting", True) \
        else float(config.get("shift", config.get("flow_shift", 1.0)))
    return (values if len(values) == steps else None), shift


def high_noise_steps(pipe, steps: int, latent: Tuple[int, int]) -> Optional[int]:
    """How many steps a two-expert pipeline runs on its high-noise expert (its timesteps at or
    above boundary_ratio × the training timesteps, as WanPipeline switches); None for one."""
    if not has_experts(pipe):
        return None
    scheduler, _ = _twin(pipe, steps, latent)
    boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
    return int(sum(float(t) >= boundary for t in scheduler.timesteps[:steps]))
