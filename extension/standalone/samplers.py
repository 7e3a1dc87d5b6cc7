"""The samplers the standalone host offers, by the names A1111 users know, each a diffusers
scheduler built from the model's own scheduler config. Only samplers that evaluate the UNet
once per step: the pipeline's step callback, which moves the engine, then fires once per step
(a second-order sampler such as Heun would call it twice per step)."""
from __future__ import annotations

from enum import Enum
from typing import Optional, Tuple


class Sampler(str, Enum):
    EULER = "Euler"
    EULER_A = "Euler a"
    DPMPP_2M = "DPM++ 2M"
    DPMPP_2M_KARRAS = "DPM++ 2M Karras"
    DDIM = "DDIM"
    UNIPC = "UniPC"

    def __str__(self) -> str:
        return self.value


def sampler_named(name: str) -> Sampler:
    """A1111's `sampler_name` (case-insensitive); ValueError naming the choices otherwise."""
    for s in Sampler:
        if s.value.lower() == str(name).strip().lower():
            return s
    raise ValueError(f"unknown sampler {name!r}; choose one of "
                     + ", ".join(s.value for s in Sampler))


def scheduler_for(sampler: Sampler, config):
    """A new diffusers scheduler for `sampler`, from a pipeline's scheduler config."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           UniPCMultistepScheduler)
    kinds = {Sampler.EULER: (EulerDiscreteScheduler, {}),
             Sampler.EULER_A: (EulerAncestralDiscreteScheduler, {}),
             Sampler.DPMPP_2M: (DPMSolverMultistepScheduler, {}),
             Sampler.DPMPP_2M_KARRAS: (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
             Sampler.DDIM: (DDIMScheduler, {}),
             Sampler.UNIPC: (UniPCMultistepScheduler, {})}
    cls, extra = kinds[sampler]
    return cls.from_config(config, **extra)


def step_sigmas(scheduler, steps: int) -> Optional[Tuple[float, ...]]:
    """The sigma the model is called with at each of `steps` steps, as `scheduler` schedules
    them once set up for `steps` as the pipeline sets it up (so pass a fresh one: this sets
    its timesteps). The k-diffusion-style schedulers keep them (`sigmas`, one more than the
    steps: the final 0); DDIM keeps ᾱ instead, and sigma = sqrt((1 − ᾱ_t) / ᾱ_t) at each of
    its timesteps. None when the scheduler says neither."""
    scheduler.set_timesteps(steps)
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None:
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            return None
        a = alphas[scheduler.timesteps.long()].double()
        sigmas = ((1 - a) / a).sqrt()
    values = tuple(float(v) for v in sigmas[:steps])
    return values if len(values) == steps else None


# ---- flow-matching pipelines (Flux, Chroma) ------------------------------------------------
FLOW_SAMPLERS = (Sampler.EULER,)  # the pipelines' own FlowMatchEulerDiscreteScheduler


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
