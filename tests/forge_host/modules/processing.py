"""modules/processing.py + the sampling path at Forge dfdcbab, reduced to what NetWeave sees.

process_images_inner (L852–L1140): scripts.process outside inference mode; then inside
torch.inference_mode(), per batch: forge_objects = forge_objects_original.shallow_copy();
before_process_batch; parse and activate extra networks; forge_objects =
forge_objects_after_applying_lora.shallow_copy(); process_batch; setup_conds; sample.
sample (L1342–L1390): forge_objects reset again, process_before_every_sampling(p, x=…,
noise=…, c=…, uc=…), sampling. sample_hr_pass (L1430–L1539): is_hr_pass, activate the hires
networks, process_before_every_sampling(p=self, …), forge_objects reset,
process_before_every_sampling(self, …) again, sampling on the upscaled latent.
modules/sd_samplers_cfg_denoiser.py: CFGDenoiserParams(x, image_cond, sigma, …, cond, uncond,
self), the callback, sampling_function, then `self.step += 1`.
backend/sampling/sampling_function.py: sampling_prepare loads the UNet (refresh_loras);
calc_cond_uncond_batch runs one chunk per condition, each the whole image batch, reversed
(unconds first), as many per call as free memory allows, with
transformer_options['cond_or_uncond'] (0 cond, 1 uncond), 'sigmas' (one chunk's), and the
per-row 'cond_mark', 'cond_indices', 'uncond_indices' made from them (L129–L151, L253–L257)."""
import torch
from a1111_infotext import create_infotext  # noqa: F401  (tests/: A1111's, as Forge keeps it)

from backend import memory_management

from . import extra_networks, shared
from .script_callbacks import CFGDenoiserParams, cfg_denoiser_callback

COND, UNCOND = 0, 1


class Processed:
    def __init__(self, p, images, infotexts):
        self.images, self.infotexts = images, infotexts
        self.extra_generation_params = dict(p.extra_generation_params)


class StableDiffusionProcessingTxt2Img:
    def __init__(self, prompt="", negative_prompt="", steps=4, batch_size=1, n_iter=1,
                 cfg_scale=7.0, width=64, height=64, seed=1, sampler_name="Euler",
                 enable_hr=False, hr_second_pass_steps=0, hr_prompt="", script_args=(), scripts=None,
                 disable_extra_networks=False, fail_at_step=None):
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.batch_size, self.n_iter = steps, batch_size, n_iter
        self.cfg_scale, self.width, self.height, self.seed = cfg_scale, width, height, seed
        self.sampler_name, self.enable_hr = sampler_name, enable_hr
        self.hr_second_pass_steps, self.hr_prompt = hr_second_pass_steps, hr_prompt
        # the hires pass samples the latent upscaled 2× (as sample() does): A1111's hr_scale 2
        self.hr_upscale_to_x, self.hr_upscale_to_y = width * 2, height * 2
        self.script_args, self.scripts = tuple(script_args), scripts
        self.disable_extra_networks = disable_extra_networks
        self.fail_at_step = fail_at_step  # tests: an exception inside sampling
        self.extra_generation_params = {}
        self.is_hr_pass = False
        self.iteration = 0
        self.sd_model = shared.sd_model

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * n
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.all_seeds = [self.seed + i for i in range(len(self.all_prompts))]
        self.all_hr_prompts = [self.hr_prompt] * n if self.hr_prompt else list(self.all_prompts)
        self.all_hr_negative_prompts = list(self.all_negative_prompts)

    def parse_extra_network_prompts(self):
        """A1111's txt2img: the batch's hires prompts are sliced by `iteration` here, after
        before_process_batch (which reads them from all_hr_prompts)."""
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        bs, n = self.batch_size, self.iteration
        self.hr_negative_prompts = self.all_hr_negative_prompts[n * bs:(n + 1) * bs]
        self.hr_prompts, self.hr_extra_network_data = \
            extra_networks.parse_prompts(self.all_hr_prompts[n * bs:(n + 1) * bs])

    def setup_conds(self):
        self.uc = self.sd_model.get_learned_conditioning(self.negative_prompts)
        self.c = self.sd_model.get_learned_conditioning(self.prompts)

    def sample(self, noise):
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self.scripts.process_before_every_sampling(self, x=noise, noise=noise, c=self.c, uc=self.uc)
        x = Sampler(self.sampler_name, self).sample(noise, self.c, self.uc, self.steps)
        if self.enable_hr:
            self.is_hr_pass = True
            x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            extra_networks.activate(self, self.hr_extra_network_data)
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=self.c, uc=self.uc)
            self.sd_model.forge_objects = \
                self.sd_model.forge_objects_after_applying_lora.shallow_copy()
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=self.c, uc=self.uc)
            x = Sampler(self.sampler_name, self).sample(x, self.c, self.uc,
                                                        self.hr_second_pass_steps or self.steps)
            self.is_hr_pass = False
        return x


def process_images(p):
    p.setup_prompts()
    p.scripts.process(p)
    images, infotexts = [], []
    with torch.inference_mode():
        for n in range(p.n_iter):
            p.iteration = n
            bs = p.batch_size
            p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            p.prompts = p.all_prompts[n * bs:(n + 1) * bs]
            p.negative_prompts = p.all_negative_prompts[n * bs:(n + 1) * bs]
            p.seeds = p.all_seeds[n * bs:(n + 1) * bs]
            p.subseeds = p.seeds
            p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                           subseeds=p.subseeds)
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                    subseeds=p.subseeds)
            p.setup_conds()
            gen = torch.Generator().manual_seed(p.seeds[0])
            noise = torch.randn(len(p.prompts), 4, p.height // 8, p.width // 8, generator=gen)
            samples = p.sample(noise)
            images += list(samples)
            p.prompts = p.all_prompts[n * bs:(n + 1) * bs]  # tags again, for the infotext
            infotexts += [create_infotext(p, i) for i in range(len(samples))]
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    processed = Processed(p, images, infotexts)
    p.scripts.postprocess(p, processed)
    return processed




def compute_cond_mark(cond_or_uncond, sigmas):
    """backend/sampling/sampling_function.py L129: each chunk's mark on each of its rows."""
    size = int(sigmas.shape[0])
    cond_mark = []
    for cx in cond_or_uncond:
        cond_mark += [cx] * size
    return torch.Tensor(cond_mark).to(sigmas)


def compute_cond_indices(cond_or_uncond, sigmas):
    """sampling_function.py L140: the batch rows of the cond chunks and of the uncond ones."""
    cl = int(sigmas.shape[0])
    cond_indices, uncond_indices = [], []
    for i, cx in enumerate(cond_or_uncond):
        if cx == 0:
            cond_indices += list(range(i * cl, (i + 1) * cl))
        else:
            uncond_indices += list(range(i * cl, (i + 1) * cl))
    return cond_indices, uncond_indices


def next_chunks(to_run, unet, rows):
    """calc_cond_uncond_batch's pick: the last chunks first (unconds before conds), as many as
    the free memory takes for `rows` images each (at least one); taken out of `to_run`."""
    order = list(range(len(to_run)))
    order.reverse()
    batch = order[:1]
    for i in range(1, len(order) + 1):
        amount = order[:len(order) // i]
        if unet.memory_required([len(amount) * rows]) < memory_management.get_free_memory():
            batch = amount
            break
    return [to_run.pop(i) for i in batch]


class SamplerConfig:
    def __init__(self, name):
        self.name = name
        self.options = {"second_order": False}

    def total_steps(self, steps):  # sd_samplers_common: a first-order sampler's steps
        return steps


class Sampler:
    """Euler: one denoiser call per step (sigmas 8 → 0.5, linear), the conds read from
    `sampler_extra_args` at each call, as k-diffusion passes its extra_args."""

    def __init__(self, name, p):
        self.config = SamplerConfig(name)
        self.p = p
        self.model_wrap_cfg = CFGDenoiser(self, p)

    def sample(self, x, c, uc, steps):
        self.model_wrap_cfg.step, self.model_wrap_cfg.steps = 0, steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        self.sampler_extra_args = {"cond": c, "uncond": uc}  # k-diffusion's extra_args
        shared.state.sampling_steps, shared.state.sampling_step = steps, 0
        sigmas = torch.cat([torch.linspace(8.0, 0.5, steps), torch.zeros(1)])
        x = x * sigmas[0]
        for i in range(steps):
            if self.p.fail_at_step == i:
                raise RuntimeError("interrupted inside sampling")
            s, s_next = sigmas[i], sigmas[i + 1]
            args = self.sampler_extra_args
            d = (x - self.model_wrap_cfg(x, s, args["uncond"], args["cond"])) / s
            shared.state.sampling_step = i
            x = x + d * (s_next - s)
        return x


class CFGDenoiser:
    def __init__(self, sampler, p):
        self.sampler, self.p = sampler, p
        self.step, self.steps = 0, 0
        self.calls = []  # cond_or_uncond of every UNet call (tests read it)

    def __call__(self, x, sigma, uncond, cond):
        params = CFGDenoiserParams(x, None, torch.full((x.shape[0],), float(sigma)),
                                   shared.state.sampling_step, shared.state.sampling_steps,
                                   cond, uncond, self)
        cfg_denoiser_callback(params)
        cond_pred, uncond_pred = self.calc_cond_uncond_batch(params)
        denoised = uncond_pred + (cond_pred - uncond_pred) * self.p.cfg_scale
        self.step += 1
        return denoised

    def calc_cond_uncond_batch(self, params):
        unet = self.p.sd_model.forge_objects.unet
        memory_management.load_models_gpu([unet])  # sampling_prepare
        x, sigma = params.x, params.sigma
        to_run = [(params.text_cond, COND), (params.text_uncond, UNCOND)]
        out = {COND: None, UNCOND: None}
        while to_run:
            picked = next_chunks(to_run, unet, x.shape[0])
            marks = [m for _, m in picked]
            x_in = torch.cat([x] * len(picked))
            t = (torch.cat([sigma] * len(picked)) * 100).long().clamp(0, 999)
            options = dict(unet.model_options["transformer_options"], cond_or_uncond=marks[:],
                           sigmas=sigma)
            options["cond_mark"] = compute_cond_mark(marks, sigma)
            options["cond_indices"], options["uncond_indices"] = compute_cond_indices(marks, sigma)
            self.calls.append(marks[:])
            eps = unet.model.apply_model(x_in, t, c_crossattn=torch.cat([c for c, _ in picked]),
                                         transformer_options=options)
            for chunk, mark in zip((x_in - sigma.view(-1, 1, 1, 1).repeat(len(picked), 1, 1, 1)
                                    * eps).chunk(len(picked)), marks):
                out[mark] = chunk
        return out[COND], out[UNCOND]
