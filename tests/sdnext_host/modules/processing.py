"""modules/processing.py + processing_diffusers.process_base + processing_args (SD.Next):
per batch before_process_batch (tags in the prompts) → parse_prompts → process_batch →
process_base: parse again (the stripped prompts keep p.network_data), activate_filtered,
encode the prompt through the prompt-embedding cache, the pipeline call with
diffusers_callback, p.task_args merged last; the hires pass encodes again (through the cache)
and calls the pipeline again with the same arguments; deactivate (no force) before decode;
postprocess. Images come back as float arrays (output_type "np") so tests compare them
exactly."""
import inspect

import torch

from . import extra_networks, prompt_parser_diffusers, shared
from .processing_callbacks import diffusers_callback


class Processed:
    def __init__(self, p, images):
        self.images = images
        self.extra_generation_params = dict(p.extra_generation_params)


class StableDiffusionProcessing:
    def __init__(self, prompt="", negative_prompt="", steps=4, cfg_scale=6.0, width=64,
                 height=64, seed=1, batch_size=1, script_args=(), scripts=None,
                 enable_hr=False, hr_second_pass_steps=0, lora_apply_te=None, clip_skip=1):
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.cfg_scale, self.width, self.height = steps, cfg_scale, width, height
        self.seed, self.batch_size = seed, batch_size
        self.script_args, self.per_script_args, self.scripts = tuple(script_args), {}, scripts
        self.task_args, self.network_data, self.extra_generation_params = {}, {}, {}
        self.enable_hr, self.hr_second_pass_steps = enable_hr, hr_second_pass_steps
        self.lora_apply_te, self.clip_skip = lora_apply_te, clip_skip
        self.disable_extra_networks, self.ops = False, ['txt2img']


def process_images(p):
    p.scripts.process(p)
    p.all_prompts = [p.prompt] * p.batch_size
    p.prompts, p.negative_prompts = list(p.all_prompts), [p.negative_prompt] * p.batch_size
    p.seeds = [p.seed + i for i in range(p.batch_size)]
    p.scripts.before_process_batch(p, batch_number=0, prompts=p.prompts, seeds=p.seeds,
                                   subseeds=p.seeds)
    p.prompts, p.network_data = extra_networks.parse_prompts(p.prompts)
    p.scripts.process_batch(p, batch_number=0, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
    images = process_base(p)
    processed = Processed(p, images)
    p.scripts.postprocess(p, processed)
    return processed


def process_base(p):
    pipe = shared.sd_model
    p.prompts, p.network_data = extra_networks.parse_prompts(p.prompts, p.network_data)
    extra_networks.activate_filtered(p)  # networks patch weights before the prompt is encoded
    args = set_pipeline_args(p, pipe)
    out = pipe(**args)
    if p.enable_hr:  # no re-activation without a refiner prompt: the same networks, callback
        args = set_pipeline_args(p, pipe, steps=p.hr_second_pass_steps or p.steps)
        out = pipe(**args)
    extra_networks.deactivate(p)
    return list(out.images)


def set_pipeline_args(p, pipe, steps=None):
    possible = set(inspect.signature(type(pipe).__call__).parameters)
    cfg = p.cfg_scale > 1
    embeds, negative_embeds = prompt_parser_diffusers.encode(pipe, p, p.prompts,
                                                             p.negative_prompts, p.steps, cfg)
    args = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds,
            "num_inference_steps": steps or p.steps, "guidance_scale": p.cfg_scale,
            "height": p.height, "width": p.width, "output_type": "np",
            "generator": torch.Generator("cpu").manual_seed(p.seeds[0]),
            "callback_on_step_end": diffusers_callback,
            "callback_on_step_end_tensor_inputs": list(pipe._callback_tensor_inputs)}
    args.update({k: v for k, v in p.task_args.items() if k in possible})
    return args
