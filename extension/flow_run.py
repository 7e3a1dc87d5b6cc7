"""The engine through one FluxPipeline / ChromaPipeline call (the standalone host, SD.Next):
what pipeline_run.py does for Stable Diffusion, for the pipelines of flow-matching transformers.

Why a forward pre-hook on the transformer instead of the step callback's tensors:

- the text changes where a text-encoder segment ends, but a Flux pipeline's callback can hand
  back only `prompt_embeds`, not CLIP's pooled vector nor the negative prompt's embeddings,
  which it keeps from its first step;
- with true CFG (Chroma, a Flux without distilled guidance) the pipeline calls the transformer
  twice per step, the prompt's rows, then the negative prompt's, each `batch` rows: the engine
  must know before each call which rows it gets (`neg=` acts on the negative ones).

So the pipeline is handed step 0's embeddings; before every transformer call the hook tells
which prompt the call carries (by the embeddings tensor it was handed), sets the engine's rows,
puts in the current segment's embeddings and gives the engine the prompt's encodings with each
regional text-encoder network (which run as streams of their own: network/blend.py). It goes
before the engine's own pre-hooks (the streams repeat whatever this one passes on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .pipeline_run import segment_encodings

MAX_T5_TOKENS = 512  # the pipelines' default max_sequence_length


@dataclass
class Text:
    embeds: torch.Tensor  # T5's (rows, tokens, width)
    pooled: Optional[torch.Tensor] = None  # Flux: CLIP-L's pooled vector (rows, width)
    mask: Optional[torch.Tensor] = None  # Chroma: which T5 tokens the transformer attends to


def text_length(pipe) -> int:
    """T5 tokens per prompt: the pipeline's default, or fewer where the tokenizer says so (a
    small model trained on short captions)."""
    tokenizer = pipe.tokenizer_2 if hasattr(pipe, "tokenizer_2") else pipe.tokenizer
    return int(min(MAX_T5_TOKENS, getattr(tokenizer, "model_max_length", MAX_T5_TOKENS)))


class FlowRun:
    def __init__(self, engine, pipe, arch: str, device, prompt: str, negative: str,
                 batch: int, cfg: bool, steps: int):
        """`cfg`: the pipeline runs the negative prompt too (true CFG)."""
        self.engine, self.pipe, self.arch, self.device = engine, pipe, arch, device
        self.batch, self.cfg, self.steps = batch, cfg, steps
        self.prompt, self.negative = prompt, negative
        self.length = text_length(pipe)
        self.embeds = self._encodings()
        self.segment = engine.segment_at(0)
        self.given = self.embeds[self.segment]  # what the pipeline holds for every step
        engine.set_rows([0] * batch, [False] * batch)
        engine.set_step(0)
        self.handle = pipe.transformer.register_forward_pre_hook(
            self._before_call, with_kwargs=True, prepend=True)

    def close(self) -> None:
        self.handle.remove()

    def first_args(self) -> dict:
        """The pipeline's text arguments (step 0's segment)."""
        pos, neg = self.given["pos"], self.given["neg"]
        if self.arch == "flux":
            args = {"prompt_embeds": pos.embeds, "pooled_prompt_embeds": pos.pooled}
            if self.cfg:
                args.update(negative_prompt_embeds=neg.embeds,
                            negative_pooled_prompt_embeds=neg.pooled)
            return args
        args = {"prompt_embeds": pos.embeds, "prompt_attention_mask": pos.mask}
        if self.cfg:
            args.update(negative_prompt_embeds=neg.embeds,
                        negative_prompt_attention_mask=neg.mask)
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
        text = kwargs.get("encoder_hidden_states")
        if not isinstance(text, torch.Tensor):
            return None
        uncond = self._is_negative(text)
        rows = int(text.shape[0])
        self.engine.set_rows([0] * rows, [uncond] * rows)
        e = self.embeds[self.segment]
        now = e["neg" if uncond else "pos"]
        variants = {} if uncond else e["variants"]  # the negative prompt's rows have none
        self.engine.set_text_variants(
            now.embeds, {j: v.embeds for j, v in variants.items()}, now.pooled,
            {j: v.pooled for j, v in variants.items() if v.pooled is not None})
        if now is self.given["neg" if uncond else "pos"]:
            return None  # step 0's segment: the pipeline's own tensors
        kwargs = dict(kwargs, encoder_hidden_states=now.embeds)
        if now.pooled is not None and "pooled_projections" in kwargs:
            kwargs["pooled_projections"] = now.pooled
        return args, kwargs

    def _is_negative(self, text: torch.Tensor) -> bool:
        if not self.cfg:
            return False
        pos, neg = self.given["pos"].embeds, self.given["neg"].embeds
        if text is neg or text is pos:  # the tensors handed to the pipeline, passed on
            return text is neg
        # a pipeline that copies them: by value (the prompt's, when both are the same text)
        return text.shape == neg.shape and not torch.equal(text, pos) and torch.equal(text, neg)

    # ---- text ----------------------------------------------------------------------------
    def _encode(self, text: str) -> Text:
        with torch.no_grad():
            if self.arch == "flux":
                embeds, pooled, _ = self.pipe.encode_prompt(
                    prompt=text, prompt_2=None, device=self.device,
                    num_images_per_prompt=self.batch, max_sequence_length=self.length)
                return Text(embeds, pooled=pooled)
            embeds, _, mask, *_ = self.pipe.encode_prompt(
                prompt=text, device=self.device, num_images_per_prompt=self.batch,
                do_classifier_free_guidance=False, max_sequence_length=self.length)
            return Text(embeds, mask=mask)

    def _encodings(self) -> dict:
        """Per text-encoder segment: the prompt's text, the negative prompt's with each
        network's `neg` when the pipeline runs it, and the prompt's with each regional
        network acting on the text encoders."""
        return {seg: {"pos": pos, "neg": neg, "variants": variants}
                for seg, (pos, neg, variants) in segment_encodings(
                    self.engine, "base", self._encode, self.prompt, self.negative, self.cfg).items()}


def flow_schedule(pipe, steps: int, latent: Tuple[int, int]):
    """(sigmas, shift): a fresh twin of a Flux/Chroma pipeline's scheduler set up exactly as
    the pipeline sets its own for `steps` at a VAE latent (h, w): time 1 → 1/steps, shifted by
    mu from the image's packed token count (the pipeline module's own calculate_shift and
    retrieve_timesteps, with its scheduler config's bounds). `shift` is the shift that schedule
    amounts to (exp(mu) when dynamic, else the config's), what `explain --shift` takes."""
    import math
    import sys

    import numpy as np

    module = sys.modules[type(pipe).__module__]  # FluxPipeline's or ChromaPipeline's
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    config = scheduler.config
    seq = (latent[0] // 2) * (latent[1] // 2)
    mu = module.calculate_shift(seq, config.get("base_image_seq_len", 256),
                                config.get("max_image_seq_len", 4096),
                                config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    module.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    values = tuple(float(v) for v in scheduler.sigmas[:steps])
    shift = math.exp(mu) if config.get("use_dynamic_shifting") else float(config.get("shift", 1.0))
    return (values if len(values) == steps else None), shift
