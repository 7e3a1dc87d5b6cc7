"""modules/processing.py and the sampling path (Neo), reduced to what NetWeave sees.

process_images: `scripts.before_process(p)` with the raw prompt, then process_images_inner as
Forge 2's (tests/forge_host/modules/processing.py: forge_objects reset from
forge_objects_original before before_process_batch, from forge_objects_after_applying_lora
after the extra networks and again in `sample`, then process_before_every_sampling; twice
around the hires pass). Neo's CFGDenoiser.forward calls apply_refiner first
(modules/sd_samplers_common.py), then cfg_denoiser_callback before forge_sample;
backend/sampling/sampling_function.py @ 000feeed: sampling_prepare loads the UNet patcher
(load_models_gpu: its merges and weight wrappers); the uncond is skipped when the CFG scale is 1 (unless `disable_cfg1_optimization`); calc_cond_uncond_batch runs the chunks
unconds first, as many per call as free memory allows, and calls
`model_options["model_function_wrapper"](apply_model, {"input", "timestep", "c",
"cond_or_uncond"})` when a script set one, else apply_model(input, timestep, **c), with
c["transformer_options"] holding cond_or_uncond, sigmas, cond_mark, cond_indices and
uncond_indices. KModel.apply_model (backend/modules/k_model.py) calls
diffusion_model(x, t, context=…, control=…, transformer_options=…, **extra conds)."""
import math

import torch

from backend import memory_management

from . import same_as

same_as("forge_host", "processing", globals())

_forge_process_images = process_images  # noqa: F821 (Forge 2's, from same_as)


def process_images(p):
    """before_process, then process_images_inner, which first finds the refiner's checkpoint
    (p.refiner_checkpoint_info, before the scripts' process)."""
    from . import sd_models
    p.scripts.before_process(p)
    if p.refiner_checkpoint not in (None, "", "None", "none"):
        p.refiner_checkpoint_info = sd_models.get_closet_checkpoint_match(p.refiner_checkpoint)
        if p.refiner_checkpoint_info is None:
            raise Exception(f"Could not find checkpoint with name {p.refiner_checkpoint}")
    return _forge_process_images(p)


class CFGDenoiser(CFGDenoiser):  # noqa: F821
    """modules/sd_samplers_cfg_denoiser.py: forward first calls apply_refiner (a switch to
    the refiner makes the denoiser take the sampler's conds again), then builds the conds and
    fires cfg_denoiser_callback (Forge 2's); update_inner_model hands p.get_conds() to the
    sampler's extra args."""

    model_wrap = None
    total_steps = None

    def __call__(self, x, sigma, uncond, cond):
        from . import sd_samplers_common
        if sd_samplers_common.apply_refiner(self, x, sigma):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]
        return super().__call__(x, sigma, uncond, cond)

    def update_inner_model(self):
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def calc_cond_uncond_batch(self, params):
        unet = self.p.sd_model.forge_objects.unet
        memory_management.load_models_gpu([unet])  # sampling_prepare
        options = unet.model_options
        x, sigma = params.x, params.sigma
        to_run = [(params.text_cond, COND)]  # noqa: F821
        if not math.isclose(self.p.cfg_scale, 1.0) or options.get("disable_cfg1_optimization"):
            to_run.append((params.text_uncond, UNCOND))  # noqa: F821
        out = {COND: None, UNCOND: None}  # noqa: F821
        while to_run:
            picked = next_chunks(to_run, unet, x.shape[0])  # noqa: F821 (Forge 2's, the same)
            marks = [m for _, m in picked]
            transformer_options = dict(options["transformer_options"], cond_or_uncond=marks[:],
                                       sigmas=sigma)
            transformer_options["cond_mark"] = compute_cond_mark(marks, sigma)  # noqa: F821
            transformer_options["cond_indices"], transformer_options["uncond_indices"] = \
                compute_cond_indices(marks, sigma)  # noqa: F821
            self.calls.append(marks[:])
            c = model_conds([c for c, _ in picked])
            c["transformer_options"] = transformer_options
            x_in, t = torch.cat([x] * len(picked)), torch.cat([sigma] * len(picked))
            if "model_function_wrapper" in options:
                output = options["model_function_wrapper"](
                    unet.model.apply_model, {"input": x_in, "timestep": t, "c": c,
                                             "cond_or_uncond": marks})
            else:
                output = unet.model.apply_model(x_in, t, **c)
            for chunk, mark in zip(output.chunk(len(picked)), marks):
                out[mark] = chunk
        if out[UNCOND] is None:  # noqa: F821
            out[UNCOND] = out[COND]  # noqa: F821
        return out[COND], out[UNCOND]  # noqa: F821


def model_conds(conds):
    """The UNet's keyword arguments for the chunks' conditionings (cond_cat of their
    model_conds): SD's cross-attention tensor as `c_crossattn`; a dict (Flux: T5 `crossattn`,
    CLIP-L `vector`, `guidance`) gives `c_crossattn`, `y` and `guidance`."""
    if not isinstance(conds[0], dict):
        return {"c_crossattn": torch.cat(conds)}
    names = {"crossattn": "c_crossattn", "vector": "y", "guidance": "guidance"}
    return {names[k]: torch.cat([c[k] for c in conds]) for k in conds[0] if k in names}


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessingTxt2Img):  # noqa: F821
    """The hires pass's negative prompts and size, which A1111's txt2img (and Neo's) keep
    beside the hires prompts (NetWeave encodes the hires conds with them). Neo's `sd_model`
    is a property, always shared.sd_model (its setter does nothing); the refiner's fields
    `refiner_checkpoint`, `refiner_switch_at` (the Refiner script's, or the API's) and
    `refiner_checkpoint_info`; get_conds gives (c, uc)."""

    def __init__(self, *args, refiner_checkpoint=None, refiner_switch_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.refiner_checkpoint, self.refiner_switch_at = refiner_checkpoint, refiner_switch_at
        self.refiner_checkpoint_info = None

    @property
    def sd_model(self):
        from . import shared
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, _):
        pass

    def get_conds(self):
        return self.c, self.uc

    def setup_conds(self):
        """Dict conds (SDXL, Flux) reach the denoiser as prompt_parser's DictWithShape, as
        A1111's reconstruct_cond_batch makes them."""
        from .prompt_parser import DictWithShape
        super().setup_conds()
        if isinstance(self.c, dict):
            self.c, self.uc = DictWithShape(self.c), DictWithShape(self.uc)

    def parse_extra_network_prompts(self):
        super().parse_extra_network_prompts()
        self.hr_negative_prompts = list(self.negative_prompts)
        self.hr_upscale_to_x, self.hr_upscale_to_y = 2 * self.width, 2 * self.height


class SamplerConfig(SamplerConfig):  # noqa: F821
    """A1111's sampler data: `total_steps(steps)`, the denoiser calls a pass of `steps` makes
    (Euler: one per step)."""

    def total_steps(self, steps):
        return steps
