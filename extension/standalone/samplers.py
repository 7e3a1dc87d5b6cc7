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
