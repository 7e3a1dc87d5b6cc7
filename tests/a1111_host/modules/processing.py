"""modules/processing.py + the k-diffusion sampling loop, reduced to what NetWeave sees:
process_images_inner's call order (v1.10.1 processing.py L899–L1133), CFGDenoiser.forward's
row layout, callback and step counter (sd_samplers_cfg_denoiser.py), callback_state's lagging
state.sampling_step (sd_samplers_common.py), Euler (1 call per step) and Heun (2, the last 1).
Conds as the host makes them: prompt_parser schedules over the sampler's total steps, the
hires pass's own (hr_prompts, its size, hires_steps), rebuilt at the denoiser's call counter;
SDXL's dict conds concatenated key by key."""
import torch
from a1111_infotext import create_infotext  # noqa: F401  (tests/: A1111's, as Forge keeps it)

from . import extra_networks, prompt_parser, shared
from .script_callbacks import CFGDenoiserParams, cfg_denoiser_callback

SECOND_ORDER = {"Heun"}


class Processed:
    def __init__(self, p, images, infotexts):
        self.images, self.infotexts = images, infotexts
        self.extra_generation_params = dict(p.extra_generation_params)


class StableDiffusionProcessingTxt2Img:
    cached_c = [None, None]
    cached_uc = [None, None]

    def __init__(self, prompt="", negative_prompt="", steps=4, batch_size=1, n_iter=1,
                 cfg_scale=7.0, width=64, height=64, seed=1, sampler_name="Euler",
                 enable_hr=False, hr_second_pass_steps=0, hr_prompt="", hr_scale=2.0, script_args=(),
                 scripts=None, disable_extra_networks=False):
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.batch_size, self.n_iter = steps, batch_size, n_iter
        self.cfg_scale, self.width, self.height, self.seed = cfg_scale, width, height, seed
        self.sampler_name, self.enable_hr = sampler_name, enable_hr
        self.hr_second_pass_steps, self.hr_prompt = hr_second_pass_steps, hr_prompt
        self.script_args, self.scripts = tuple(script_args), scripts
        self.disable_extra_networks = disable_extra_networks
        self.extra_generation_params = {}
        self.is_hr_pass = False
        self.iteration = 0
        # the hires pass samples an upscaled latent (A1111's latent upscaler; hr_scale 2)
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(width * hr_scale), int(height * hr_scale)
        self.sd_model = shared.sd_model

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * n
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.all_seeds = [self.seed + i for i in range(len(self.all_prompts))]
        if self.enable_hr:  # an empty hires prompt is the prompt, tags and all
            self.all_hr_prompts = [self.hr_prompt] * n if self.hr_prompt else list(self.all_prompts)
            self.all_hr_negative_prompts = list(self.all_negative_prompts)

    def parse_extra_network_prompts(self):
        """As txt2img's: the batch's hires prompts are sliced by `iteration` here, after
        before_process_batch (which reads them from all_hr_prompts)."""
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        if self.enable_hr:
            bs, n = self.batch_size, self.iteration
            self.hr_prompts = self.all_hr_prompts[n * bs:(n + 1) * bs]
            self.hr_negative_prompts = self.all_hr_negative_prompts[n * bs:(n + 1) * bs]
            self.hr_prompts, self.hr_extra_network_data = \
                extra_networks.parse_prompts(self.hr_prompts)

    def get_conds_with_caching(self, function, required_prompts, steps, cache, hires_steps=None):
        key = (tuple(required_prompts), required_prompts.width, required_prompts.height,
               steps, hires_steps,
               repr({k: [v.items for v in vs] for k, vs in self.extra_network_data.items()}))
        if cache[0] == key:
            return cache[1]
        cache[0], cache[1] = key, function(self.sd_model, required_prompts, steps, hires_steps)
        return cache[1]

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative = prompt_parser.SdConditioning(self.negative_prompts, width=self.width,
                                                height=self.height, is_negative_prompt=True)
        total_steps = SamplerConfig(self.sampler_name).total_steps(self.steps)
        self.step_multiplier = total_steps // self.steps
        self.firstpass_steps = total_steps
        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negative,
                                              total_steps, self.cached_uc)
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning,
                                             prompts, total_steps, self.cached_c)
        if self.enable_hr:
            self.calculate_hr_conds()

    def calculate_hr_conds(self):
        size = dict(width=self.hr_upscale_to_x, height=self.hr_upscale_to_y)
        hr_prompts = prompt_parser.SdConditioning(self.hr_prompts, **size)
        hr_negative = prompt_parser.SdConditioning(self.hr_negative_prompts,
                                                   is_negative_prompt=True, **size)
        total = SamplerConfig(self.sampler_name).total_steps(self.hr_second_pass_steps or self.steps)
        self.hr_uc = prompt_parser.get_learned_conditioning(self.sd_model, hr_negative,
                                                            self.firstpass_steps, total)
        self.hr_c = prompt_parser.get_multicond_learned_conditioning(
            self.sd_model, hr_prompts, self.firstpass_steps, total)

    def sample(self, noise):
        self.scripts.process_before_every_sampling(self, x=noise, noise=noise, c=self.c, uc=self.uc)
        x = Sampler(self.sampler_name, self).sample(noise, self.c, self.uc, self.steps)
        if self.enable_hr:
            self.is_hr_pass = True
            extra_networks.activate(self, self.hr_extra_network_data)
            self.scripts.process_before_every_sampling(self, x=x, noise=noise, c=self.hr_c,
                                                       uc=self.hr_uc)
            x = torch.nn.functional.interpolate(
                x, size=(self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8), mode="nearest")
            x = Sampler(self.sampler_name, self).sample(x, self.hr_c, self.hr_uc,
                                                        self.hr_second_pass_steps or self.steps)
            self.is_hr_pass = False
        return x


def process_images(p):
    p.setup_prompts()
    p.scripts.process(p)
    images, infotexts = [], []
    for n in range(p.n_iter):
        p.iteration = n
        bs = p.batch_size
        p.prompts = p.all_prompts[n * bs:(n + 1) * bs]
        p.negative_prompts = p.all_negative_prompts[n * bs:(n + 1) * bs]
        p.seeds = p.all_seeds[n * bs:(n + 1) * bs]
        p.subseeds = p.seeds
        p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                       subseeds=p.subseeds)
        p.parse_extra_network_prompts()
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                subseeds=p.subseeds)
        p.setup_conds()
        gen = torch.Generator().manual_seed(p.seeds[0])
        noise = torch.randn(len(p.prompts), 4, p.height // 8, p.width // 8, generator=gen)
        with torch.no_grad():
            samples = p.sample(noise)
        images += list(samples)
        p.prompts = p.all_prompts[n * bs:(n + 1) * bs]  # tags again, for the infotext
        infotexts += [create_infotext(p, i) for i in range(len(samples))]
    if p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    processed = Processed(p, images, infotexts)
    p.scripts.postprocess(p, processed)
    return processed




class SamplerConfig:
    def __init__(self, name):
        self.name = name
        self.options = {"second_order": name in SECOND_ORDER}

    def total_steps(self, steps):
        return steps * 2 if self.options["second_order"] else steps


class Sampler:
    def __init__(self, name, p):
        self.config = SamplerConfig(name)
        self.p = p
        self.model_wrap_cfg = CFGDenoiser(self, p)

    def callback_state(self, i):
        shared.state.sampling_step = i

    def launch_sampling(self, steps):
        self.model_wrap_cfg.steps = steps
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0

    def sample(self, x, c, uc, steps):
        self.model_wrap_cfg.step = 0  # Sampler.initialize
        self.launch_sampling(steps)
        sigmas = torch.cat([torch.linspace(8.0, 0.5, steps), torch.zeros(1)])
        x = x * sigmas[0]
        model = self.model_wrap_cfg
        for i in range(steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            d = (x - model(x, s, c, uc)) / s
            self.callback_state(i)
            if self.config.options["second_order"] and s_next > 0:
                x2 = x + d * (s_next - s)
                d2 = (x2 - model(x2, s_next, c, uc)) / s_next
                d = (d + d2) / 2
            x = x + d * (s_next - s)
        return x


class CFGDenoiser:
    def __init__(self, sampler, p):
        self.sampler, self.p = sampler, p
        self.step, self.steps = 0, 0

    def __call__(self, x, sigma, cond, uncond):
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        b = x.shape[0]
        repeats = [len(c) for c in conds_list]  # AND: one row per sub-prompt
        x_in = torch.cat([x[i:i + 1].expand(n, -1, -1, -1) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.full((x_in.shape[0],), float(sigma))
        params = CFGDenoiserParams(x_in, None, sigma_in, shared.state.sampling_step,
                                   shared.state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        x_in, sigma_in = params.x, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        assert tensor.shape[1] == uncond.shape[1]  # the host pads otherwise (not stood in)
        t = (sigma_in * 100).long().clamp(0, 999)
        eps = self.p.sd_model.apply_model(x_in, t, catenate_conds([tensor, uncond]))
        out = x_in - sigma_in.view(-1, 1, 1, 1) * eps
        denoised = out[-b:].clone()  # combine_denoised: uncond + Σ weight·(cond − uncond)·scale
        for i, conds in enumerate(conds_list):
            for row, weight in conds:
                denoised[i] += (out[row] - out[-b + i]) * weight * self.p.cfg_scale
        self.step += 1
        return denoised


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
